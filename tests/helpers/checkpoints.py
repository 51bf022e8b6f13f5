"""Random-weight Qwen2-VL and Qwen2.5-VL checkpoints built with transformers (the oracle), saved as
real folders.

`build_reference(**overrides)` makes a transformers model from a tiny config (`family="qwen2_5_vl"`
for Qwen2.5-VL, with `window_size`, `fullatt` and `tokens_per_second`) with every tensor
randomized (biases and norm weights too, so a forgotten bias shows up); `save_checkpoint` writes it
in one of the layouts found in the wild:
- "hub":  what the published checkpoints and transformers' save_pretrained write (`model.layers.*`,
          `visual.*`, nested transformers-5 config),
- "v5":   the in-memory names (`model.language_model.*`, `model.visual.*`),
- "flat": hub weight names with the published flat config.json (`rope_scaling`, `in_chans`),
optionally sharded with an index.

`tiny_checkpoint()` is the one most tests share: random weights with the real Qwen tokenizer (vocab
151936, so its ids fit), built once into .cache/ (transformers is the oracle that writes it; the
engine and server never import transformers). Its pixel budget is small (at most 64 tokens per
image) so tests stay fast; tests that need big images raise the server's --max-pixels ceiling.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.helpers.qwen_tokenizer import CACHE, qwen_tokenizer_dir

# small ids inside a small vocab: tests must not depend on the published ids being hard-coded
TINY_IDS = dict(image_token_id=250, video_token_id=251, vision_start_token_id=252, vision_end_token_id=253)
QWEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)


def tiny_config(
    *,
    vocab_size=256,
    hidden_size=64,
    num_heads=4,
    num_kv_heads=2,
    layers=2,
    intermediate_size=96,
    mrope_section=(2, 3, 3),
    vision_depth=2,
    vision_dim=32,
    vision_heads=2,
    tie=True,
    ids=None,
    family="qwen2_vl",
    window_size=112,
    fullatt=(1,),
    tokens_per_second=2,
):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    ids = ids or (TINY_IDS if vocab_size < 151657 else QWEN_IDS)
    if family == "qwen2_5_vl":
        vision_config = dict(depth=vision_depth, hidden_size=vision_dim, intermediate_size=vision_dim + 16,
                             num_heads=vision_heads, out_hidden_size=hidden_size, window_size=window_size,
                             fullatt_block_indexes=list(fullatt), tokens_per_second=tokens_per_second)
    else:
        vision_config = dict(depth=vision_depth, embed_dim=vision_dim, num_heads=vision_heads, mlp_ratio=2,
                             hidden_size=hidden_size)
    vision_config.update(patch_size=14, temporal_patch_size=2, spatial_merge_size=2)
    return (Qwen2_5_VLConfig if family == "qwen2_5_vl" else Qwen2VLConfig)(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            rope_parameters={"rope_type": "default", "mrope_section": list(mrope_section), "rope_theta": 10000.0},
            rms_norm_eps=1e-6,
            tie_word_embeddings=tie,
            bos_token_id=None,
            eos_token_id=None,
        ),
        vision_config=vision_config,
        tie_word_embeddings=tie,
        **ids,
    )


def build_reference(seed=0, **config_kwargs):
    """A transformers Qwen2VLForConditionalGeneration (or Qwen2_5_VL...) in float32 with all tensors random."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    config = tiny_config(**config_kwargs)
    cls = Qwen2_5_VLForConditionalGeneration if config.model_type == "qwen2_5_vl" else Qwen2VLForConditionalGeneration
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p)) if name.endswith("weight") else p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.08)
    return model


def _hub_state_dict(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in model.state_dict().items():
        name = name.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        out[name] = t.contiguous()
    if model.config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def _flat_config(config_dict: dict) -> dict:
    """The published layout: text keys at the top, rope_scaling for M-RoPE, vision in_chans."""
    text = dict(config_dict.pop("text_config"))
    rope = text.pop("rope_parameters")
    flat = {**text, **config_dict}  # the outer model_type wins
    flat["rope_theta"] = rope["rope_theta"]
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    vision = dict(flat["vision_config"])
    vision["in_chans"] = vision.pop("in_channels")
    vision.pop("rope_parameters", None)
    vision.pop("model_type", None)
    flat["vision_config"] = vision
    return flat


def save_checkpoint(model, folder, layout="hub", shards=1, dtype=torch.float32, tokenizer_dir=None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(dtype) for k, v in _hub_state_dict(model).items()}
    if layout == "v5":
        rename = lambda k: "model.language_model." + k[6:] if k.startswith("model.") else k
        state = {("model." + k if k.startswith("visual.") else rename(k)): v for k, v in state.items()}
    config_dict = model.config.to_dict()
    config_dict["dtype"] = str(dtype).removeprefix("torch.")
    if layout == "flat":
        config_dict = _flat_config(config_dict)
    (folder / "config.json").write_text(json.dumps(config_dict, indent=2))
    names = sorted(state)
    if shards == 1:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            part = names[i::shards]
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: state[k] for k in part}, str(folder / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file():
                shutil.copy(f, folder / f.name)
    return folder


TINY_CHECKPOINT = CACHE / "server_tiny_qwen2vl"
TINY_BUILD = "2"  # bump when what tiny_checkpoint writes changes, to force a rebuild
TINY_PREPROCESSOR = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 64, "patch_size": 14,
                     "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                     "image_std": [0.26862954, 0.26130258, 0.27577711]}


def tiny_checkpoint() -> Path:
    """Folder with config, random weights, tokenizer files and a small-budget
    preprocessor_config.json; built once under a file lock, renamed into place when complete."""
    stamp = TINY_CHECKPOINT / "BUILD"
    if stamp.is_file() and stamp.read_text() == TINY_BUILD:
        return TINY_CHECKPOINT
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "server_tiny_qwen2vl.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (stamp.is_file() and stamp.read_text() == TINY_BUILD):
            tmp = Path(tempfile.mkdtemp(dir=CACHE))
            save_checkpoint(build_reference(vocab_size=151936), tmp, tokenizer_dir=qwen_tokenizer_dir())
            (tmp / "preprocessor_config.json").write_text(json.dumps(TINY_PREPROCESSOR))
            (tmp / "BUILD").write_text(TINY_BUILD)
            shutil.rmtree(TINY_CHECKPOINT, ignore_errors=True)
            tmp.rename(TINY_CHECKPOINT)
    return TINY_CHECKPOINT
