"""The conversations and the checkpoint of the engine's parity tests (tests/test_engine_parity.py),
shared with the LLM and CUDA tests.

The checkpoint has an untied head: a tied random model repeats one token, which would hide
position or cache mistakes.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from PIL import Image

from qwen2vl.engine.llm import LLM
from tests.helpers.checkpoints import build_reference, save_checkpoint
from tests.helpers.qwen_tokenizer import qwen_tokenizer_dir

DEVICE = os.environ.get("QWEN2VL_TEST_DEVICE", "cpu")  # "cuda" runs the engine on a GPU against the CPU oracle
PREPROCESSOR = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
}


def image(seed: int, w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def user(*content) -> dict:
    return {"role": "user", "content": [c if isinstance(c, dict) else {"type": "text", "text": c} for c in content]}


def img(seed, w=56, h=84) -> dict:
    return {"type": "image", "image": image(seed, w, h)}


CONVERSATIONS = {
    "text": [user("Hello, tell me a story about a cat.")],
    "one_image": [user(img(1), "What is in this image?")],
    "two_images": [user(img(2, 84, 56), "and", img(3, 112, 56), "compare them")],
    # 4 frames -> grid (2, 4, 6): t <= max(h, w)/2, where transformers 5 positions agree (REFERENCE 2.4)
    "video": [user({"type": "video", "video": [image(10 + i, 84, 56) for i in range(4)],
                    "resized_height": 56, "resized_width": 84}, "What happens?")],
    "multi_turn": [user(img(4), "Describe it."), {"role": "assistant", "content": "A noisy square."},
                   user("Are you sure?")],
}


def make_checkpoint(folder, **config):
    """`config`: tiny_config overrides (e.g. num_kv_heads=1)."""
    hf = build_reference(vocab_size=151936, tie=False, **config)
    save_checkpoint(hf, folder, tokenizer_dir=qwen_tokenizer_dir())
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    return hf


MAX_TOKENS = 8


def reference(hf, llm: LLM, conversation) -> tuple[list[int], list[float]]:
    """transformers' greedy tokens and the logprob of each under its raw logits."""
    inputs = llm.processor(conversation, add_generation_prompt=True)
    ids = inputs["input_ids"][None]
    types = torch.zeros_like(ids)
    types[ids == llm.model.config.image_token_id] = 1
    types[ids == llm.model.config.video_token_id] = 2
    vision = {k: v for k, v in inputs.items() if k != "input_ids" and v is not None}
    if vision:  # transformers 5 wants the token types whenever grids are given
        vision["mm_token_type_ids"] = types
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), **vision,
            max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=sorted(llm.engine.scheduler.eos_token_ids),
            pad_token_id=0, output_logits=True, return_dict_in_generate=True,
        )
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    logprobs = [torch.log_softmax(lg[0].float(), -1)[t].item() for lg, t in zip(out.logits, tokens)]
    return tokens, logprobs


def check(out, want):
    tokens, logprobs = want
    assert out.token_ids == tokens
    got = [lp.logprob for lp in out.logprobs]
    np.testing.assert_allclose(got, logprobs, atol=2e-4, rtol=0)
