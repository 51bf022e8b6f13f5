"""LLM.chat (greedy) on a Qwen2.5-VL checkpoint against transformers' Qwen2_5_VL, token for token, on
the CPU (QWEN2VL_TEST_DEVICE=cuda: the engine on a GPU, its CUDA graphs and Triton ops, against the
CPU oracle), alone and batched, chunked prefill, prefix and vision caches.

float32: the tokens equal transformers' greedy `generate` and their logprobs its logits. bfloat16:
both implementations round differently and a random model's top two logits are often within
0.02 nats, so a near-tie may go either way; each of our tokens must be transformers' greedy choice
or within BF16_TIE nats of it under transformers' bf16 logits for our own prefix (one forward over
prompt + completion), which still checks every step's positions and cache.

Videos here are ones where transformers 5 places the text after a video where the original rule
does (docs/parity.md), so transformers is the oracle; they still run on absolute time (two
positions a grid step at the sampled 2 fps)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from qwen2vl.engine.llm import LLM
from qwen2vl.engine.sampling_params import SamplingParams
from tests.helpers.checkpoints import build_reference, save_checkpoint
from tests.helpers.parity import DEVICE, MAX_TOKENS, PREPROCESSOR, check, image, img, reference, user
from tests.helpers.qwen_tokenizer import qwen_tokenizer_dir

CONVERSATIONS = {
    "text": [user("Hello, tell me a story about a cat.")],
    "image_over_windows": [user(img(1, 168, 112), "What is in this image?")],  # 4 x 6 tokens, windows of 2 x 2
    "two_images": [user(img(2, 84, 56), "and", img(3, 112, 56), "compare them")],
    # 4 frames at 2 fps -> grid (2, 4, 6), time 0, 2: text resumes 3 on, as transformers 5 has it too
    "video": [user({"type": "video", "video": [image(10 + i, 84, 56) for i in range(4)], "sample_fps": 2.0,
                    "resized_height": 56, "resized_width": 84}, "What happens?")],
    "video_4fps_and_image": [user({"type": "video", "video": [image(20 + i, 56, 56) for i in range(4)],
                                   "sample_fps": 4.0, "resized_height": 56, "resized_width": 56}, img(5), "Same?")],
}
FRAMES = [image(30 + i, 84, 56) for i in range(4)]
SAME_FRAMES = {  # one clip said to be sampled at two rates: the same pixels at other times
    f"frames_at_{fps:g}fps": [user({"type": "video", "video": FRAMES, "sample_fps": fps, "resized_height": 56,
                                    "resized_width": 84}, "And now?")] for fps in (2.0, 4.0)
}
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=0)
BF16_TIE = 0.1  # nats: logit noise of one bf16 implementation against another, with room


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("engine25")
    hf = build_reference(family="qwen2_5_vl", vocab_size=151936, tie=False, vision_depth=3, window_size=56,
                         fullatt=(1,))
    save_checkpoint(hf, folder, tokenizer_dir=qwen_tokenizer_dir())
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    return folder, hf


@pytest.fixture(scope="module")
def expected(setup):
    """transformers' float32 greedy tokens and logprobs for every conversation."""
    folder, hf = setup
    llm = LLM(str(folder), dtype="float32", device="cpu", kv_cache_gib=0.02)
    return {name: reference(hf, llm, conv) for name, conv in {**CONVERSATIONS, **SAME_FRAMES}.items()}


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def run(request, setup, expected):
    """(llm, check(name, output)) in one dtype."""
    folder, hf = setup
    llm = LLM(str(folder), dtype=request.param, device=DEVICE, kv_cache_gib=0.02, block_size=4)
    if request.param == "float32":
        return llm, lambda name, out: check(out, expected[name])
    ref = copy.deepcopy(hf).to(torch.bfloat16)
    return llm, lambda name, out: check_bf16(ref, llm, CONVERSATIONS[name], out)


def check_bf16(hf, llm, conversation, out):
    """Each generated token is transformers' greedy choice or within BF16_TIE of it, under its bf16
    logits for the prompt + our completion; our logprobs within BF16_TIE of its."""
    inputs = llm.processor(conversation, add_generation_prompt=True)
    prompt = inputs["input_ids"]
    ids = torch.cat([prompt, torch.tensor(out.token_ids)])[None]
    types = torch.zeros_like(ids)
    types[ids == llm.model.config.image_token_id] = 1
    types[ids == llm.model.config.video_token_id] = 2
    vision = {k: v for k, v in inputs.items() if k != "input_ids" and v is not None}
    with torch.no_grad():
        logits = hf(input_ids=ids, mm_token_type_ids=types, **vision).logits[0, len(prompt) - 1:-1]
    logprobs = torch.log_softmax(logits.float(), -1)
    chosen = logprobs[torch.arange(len(out.token_ids)), out.token_ids]
    assert len(out.token_ids) == MAX_TOKENS
    assert bool((chosen >= logprobs.max(-1).values - BF16_TIE).all()), (chosen, logprobs.max(-1))
    ours = torch.tensor([lp.logprob for lp in out.logprobs])
    torch.testing.assert_close(ours, chosen, atol=BF16_TIE, rtol=0)


def test_videos_carry_seconds_and_run_on_absolute_time(run):
    llm, _ = run
    prompt = llm.prompt(CONVERSATIONS["video"])
    assert llm.model.config.model_type == "qwen2_5_vl"
    video = prompt.vision[0]
    start = video.offset
    assert prompt.positions[0, start:video.end].unique().tolist() == [start, start + 2]  # 1 s a step x 2 tokens/s


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_single_request_matches_transformers(run, name):
    llm, check_output = run
    (out,) = llm.chat(CONVERSATIONS[name], GREEDY)
    check_output(name, out)


def test_batch_matches_transformers(run):
    llm, check_output = run
    names = list(CONVERSATIONS)
    for name, out in zip(names, llm.chat([CONVERSATIONS[n] for n in names], GREEDY)):
        check_output(name, out)


def test_chunked_prefill_and_caches_keep_tokens(setup, expected):
    """Prompt chunks of 5 tokens (cutting through windows and videos) with the prefix and vision caches
    on: the same clip at another sampled fps is encoded once but never served another time's blocks."""
    folder, _ = setup
    llm = LLM(str(folder), dtype="float32", device=DEVICE, kv_cache_gib=0.02, block_size=4,
              max_num_batched_tokens=5)
    names = list(CONVERSATIONS)
    for name, out in zip(names, llm.chat([CONVERSATIONS[n] for n in names], GREEDY)):
        check(out, expected[name])
    (slow,) = llm.chat(SAME_FRAMES["frames_at_2fps"], GREEDY)
    hits = llm.engine.stats().vision_cache_hits
    (fast,) = llm.chat(SAME_FRAMES["frames_at_4fps"], GREEDY)
    check(slow, expected["frames_at_2fps"])
    check(fast, expected["frames_at_4fps"])
    assert llm.engine.stats().vision_cache_hits == hits + 1
    video = llm.prompt(SAME_FRAMES["frames_at_4fps"]).vision[0]
    first_step = video.num_tokens // video.grid_thw[0]  # time 0 at both rates: the same positions, the same k/v
    assert 0 < fast.usage.cached_tokens <= video.offset + first_step
