"""Qwen2.5-VL through our loader against transformers' Qwen2_5_VLForConditionalGeneration on random
checkpoints: window attention (images inside one window, across several with odd merged sizes),
videos placed in absolute time, both config layouts and a sharded checkpoint."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qwen2vl import Qwen2VL
from qwen2vl.positions import mrope_positions
from tests.helpers.checkpoints import build_reference, save_checkpoint
from tests.helpers.prompts import Seq, reference_logits
from tests.helpers.rope_index import original_rope_index

Q25 = dict(family="qwen2_5_vl", vision_depth=3)
CONFIGS = {  # (transformers config, checkpoint layout, shards)
    "hub_window112": (dict(Q25, window_size=112, fullatt=(1,)), "hub", 1),
    "flat_window56_untied": (dict(Q25, hidden_size=48, num_heads=3, num_kv_heads=1, vision_heads=4, window_size=56,
                                  fullatt=(0, 2), tie=False), "flat", 1),
    "v5_sharded": (dict(Q25, hidden_size=128, num_heads=4, num_kv_heads=1, mrope_section=(4, 6, 6), layers=3,
                        window_size=56, fullatt=(2,)), "v5", 3),
}

PROMPTS = {
    "text": lambda s: s.text(17),
    "image_inside_one_window": lambda s: s.text(5).vision((1, 4, 6)).text(6),
    "image_many_windows_odd": lambda s: s.text(3).vision((1, 18, 22)).text(3),  # 9 x 11 merged tokens
    "two_images": lambda s: s.text(3).vision((1, 4, 6)).text(2).vision((1, 10, 6)).text(4),
    # time 0, 0, 1 (0.25 s a grid step x 2 tokens a second): the text resumes where transformers 5 has it too
    "video_fractional_time": lambda s: s.text(4).vision((3, 4, 8), video=True, seconds=0.25).text(5),
    # time 0, 4, 8, 12: the text resumes at 13 past the video's start, transformers 5 puts it at 3
    "video_absolute_time": lambda s: s.text(4).vision((4, 6, 4), video=True, seconds=2.0).text(5),
    "image_and_video": lambda s: s.text(2).vision((2, 6, 10), video=True, seconds=0.5).text(3).vision((1, 6, 4))
                                  .text(2),
}
TRANSFORMERS_5_DEPARTS = {"video_absolute_time"}  # docs/parity.md


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    config, layout, shards = CONFIGS[request.param]
    hf = build_reference(**config)
    folder = save_checkpoint(hf, tmp_path_factory.mktemp(request.param), layout=layout, shards=shards)
    return hf, Qwen2VL.from_pretrained(folder, dtype=torch.float32, device="cpu")


def original_positions(seq: Seq, config):
    inputs = seq.inputs()
    return original_rope_index(seq.ids, seq.image_grids, seq.video_grids, inputs.get("second_per_grid_ts"), config)


def test_config_is_read_as_qwen2_5(pair):
    hf, ours = pair
    v, ref = ours.config.vision, hf.config.vision_config
    assert ours.config.model_type == v.family == "qwen2_5_vl"
    assert (v.embed_dim, v.mlp_dim, v.hidden_size) == (ref.hidden_size, ref.intermediate_size, ref.out_hidden_size)
    assert (v.window_size, v.fullatt_block_indexes, v.tokens_per_second) == (
        ref.window_size, tuple(ref.fullatt_block_indexes), ref.tokens_per_second)


@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_logits_match_reference(pair, prompt):
    hf, ours = pair
    seq = PROMPTS[prompt](Seq(ours.config))
    inputs = seq.inputs()
    extra = {k: v for k, v in inputs.items() if k == "second_per_grid_ts"}
    if prompt in TRANSFORMERS_5_DEPARTS:  # transformers 5 would place the text after the video elsewhere
        extra["position_ids"] = original_positions(seq, ours.config)[0][:, None]
    want = reference_logits(hf, inputs, seq.types, **extra)
    torch.testing.assert_close(ours.logits(**inputs), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prompt", [p for p in PROMPTS if p != "text"])
def test_positions_follow_the_original_rule(pair, prompt):
    hf, ours = pair
    seq = PROMPTS[prompt](Seq(ours.config))
    inputs = seq.inputs()
    seconds = inputs.get("second_per_grid_ts")
    pos, delta = mrope_positions(inputs["input_ids"], inputs["image_grid_thw"], inputs["video_grid_thw"], ours.config,
                                 seconds)
    want_pos, want_delta = original_positions(seq, ours.config)
    assert torch.equal(pos, want_pos) and delta == want_delta
    ref_pos, ref_delta = hf.model.get_rope_index(inputs["input_ids"][None], torch.tensor([seq.types]),
                                                 inputs["image_grid_thw"], inputs["video_grid_thw"], seconds)
    agrees = torch.equal(pos, ref_pos[:, 0]) and delta == int(ref_delta)
    assert agrees == (prompt not in TRANSFORMERS_5_DEPARTS)


def test_windows_matter(pair):
    """The windowed blocks see only their window: running every block over the whole frame changes
    the image's features (so the window tests above can fail)."""
    _, ours = pair
    grid = torch.tensor([[1, 18, 22]])
    pixels = torch.randn(18 * 22, 1176, generator=torch.Generator().manual_seed(1))
    windowed, cfg = ours.visual(pixels, grid), ours.visual.cfg
    try:
        ours.visual.cfg = dataclasses.replace(cfg, fullatt_block_indexes=tuple(range(cfg.depth)))
        assert not torch.allclose(ours.visual(pixels, grid), windowed, atol=1e-3)
    finally:
        ours.visual.cfg = cfg


def test_bfloat16_close_to_float32(pair):
    hf, ours = pair
    seq = PROMPTS["image_and_video"](Seq(ours.config))
    inputs = seq.inputs()
    want = reference_logits(hf, inputs, seq.types, second_per_grid_ts=inputs["second_per_grid_ts"])
    try:
        got = ours.to(torch.bfloat16).logits(**inputs)
        err = (got - want).abs().max() / want.abs().max()
        assert err < 0.05, f"bf16 relative error {err:.3g}"
    finally:
        ours.to(torch.float32)


@pytest.mark.parametrize("name", ["2.5-3b", "2.5-7b"])
def test_published_shapes_give_transformers_tensors(name):
    """The published flat configs (benchmarks/random_checkpoint.py) build, on the meta device, a model
    whose tensors are transformers' by name and shape, as the loader maps them."""
    from benchmarks.random_checkpoint import CONFIGS, reference_class
    from qwen2vl.config import Qwen2VLConfig
    from qwen2vl.loader import canonical_name

    cls, config = reference_class(CONFIGS[name]), CONFIGS[name]
    with torch.device("meta"):
        hf = cls(cls.config_class(**config))
        ours = Qwen2VL(Qwen2VLConfig.from_dict(config))
    want = {canonical_name(k): v.numel() for k, v in hf.state_dict().items()}
    got = {k: v.numel() for k, v in ours.state_dict().items()}  # patch_embed flattened: compare sizes
    assert got == want
    assert ours.config.vision.window_tokens == 4 and ours.config.vision.fullatt_block_indexes == (7, 15, 23, 31)
