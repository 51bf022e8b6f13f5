"""Our model, loaded through our loader, against transformers on the same random checkpoints."""

from __future__ import annotations

import pytest
import torch

from qwen2vl import Qwen2VL
from qwen2vl.positions import mrope_positions
from tests.helpers.checkpoints import build_reference, save_checkpoint
from tests.helpers.prompts import Seq, reference_logits

CONFIGS = {
    "gqa2": dict(),
    "gqa3_odd_heads": dict(hidden_size=48, num_heads=3, num_kv_heads=1, mrope_section=(2, 3, 3), vision_depth=1),
    "mha_untied": dict(hidden_size=96, num_heads=6, num_kv_heads=6, mrope_section=(2, 3, 3), vision_depth=3,
                       vision_heads=4, tie=False),
    "gqa4_wide_head": dict(hidden_size=128, num_heads=4, num_kv_heads=1, mrope_section=(4, 6, 6), layers=3),
}


PROMPTS = {
    "text": lambda s: s.text(17),
    "one_image": lambda s: s.text(5).vision((1, 8, 8)).text(6),
    "two_images_sizes": lambda s: s.text(3).vision((1, 4, 6)).text(2).vision((1, 8, 4)).text(4),
    "video": lambda s: s.text(4).vision((3, 4, 8), video=True).text(5),
    "image_and_video": lambda s: s.text(2).vision((2, 4, 4), video=True).text(3).vision((1, 6, 4)).text(2),
    "odd_merged_rows": lambda s: s.text(3).vision((1, 6, 10)).text(3),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    hf = build_reference(**CONFIGS[request.param])
    layout = {"gqa2": "hub", "gqa3_odd_heads": "v5", "mha_untied": "flat", "gqa4_wide_head": "hub"}[request.param]
    shards = 3 if request.param == "gqa4_wide_head" else 1
    folder = save_checkpoint(hf, tmp_path_factory.mktemp(request.param), layout=layout, shards=shards)
    return hf, Qwen2VL.from_pretrained(folder, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_logits_match_reference(pair, prompt):
    hf, ours = pair
    seq = PROMPTS[prompt](Seq(ours.config))
    inputs = seq.inputs()
    torch.testing.assert_close(ours.logits(**inputs), reference_logits(hf, inputs, seq.types), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prompt", [p for p in PROMPTS if p != "text"])
def test_positions_match_reference(pair, prompt):
    hf, ours = pair
    seq = PROMPTS[prompt](Seq(ours.config))
    inputs = seq.inputs()
    ref_pos, ref_delta = hf.model.get_rope_index(
        inputs["input_ids"][None], torch.tensor([seq.types]), inputs["image_grid_thw"], inputs["video_grid_thw"]
    )
    pos, delta = mrope_positions(inputs["input_ids"], inputs["image_grid_thw"], inputs["video_grid_thw"], ours.config)
    assert torch.equal(pos, ref_pos[:, 0]) and delta == int(ref_delta)


def test_bfloat16_close_to_float32(pair):
    hf, ours = pair
    seq = PROMPTS["image_and_video"](Seq(ours.config))
    inputs = seq.inputs()
    folder_model_bf16 = ours.to(torch.bfloat16)
    try:
        got = folder_model_bf16.logits(**inputs)
        want = reference_logits(hf, inputs, seq.types)
        assert got.dtype == torch.float32
        err = (got - want).abs().max() / want.abs().max()
        assert err < 0.05, f"bf16 relative error {err:.3g}"
    finally:
        ours.to(torch.float32)
