"""Qwen2.5-VL's processor against transformers' Qwen2_5_VLProcessor fed by qwen-vl-utils: input ids,
pixels, and each video's second_per_grid_ts (temporal_patch_size / the sampled fps).

transformers' video processor needs torchvision, which can't import here (REFERENCE.md §4): the
reference below runs Qwen2_5_VLProcessor's own code (chat template, pad expansion, token types,
second_per_grid_ts from the video metadata) with the one torchvision-bound step, patching frames
already sampled and resized by qwen-vl-utils, written out (tests/helpers/video_reference.py).
"""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from qwen2vl import Processor
from tests.helpers.qwen_tokenizer import OFFICIAL_CHAT_TEMPLATE, qwen_tokenizer_dir
from tests.helpers.video_reference import (
    hf_video_patches,
    make_video,
    qwen_vl_utils_or_skip,
    reading_with_naive_decoder,
)

transformers = pytest.importorskip("transformers")

PREPROCESSOR = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711], "image_processor_type": "Qwen2VLImageProcessor",
                "processor_class": "Qwen2_5_VLProcessor"}


class VideoPatches:
    """transformers' Qwen2VLVideoProcessor on frames qwen-vl-utils already sampled and resized
    (do_sample_frames off, sizes already multiples of 28): normalize and patch, metadata passed on."""

    merge_size, temporal_patch_size = 2, 2

    def __call__(self, videos, video_metadata=None, return_metadata=False, **kwargs):
        patched = [hf_video_patches(v) for v in videos]
        out = {"pixel_values_videos": torch.cat([p for p, _ in patched]),
               "video_grid_thw": torch.tensor([g for _, g in patched])}
        if return_metadata:
            from transformers.video_utils import VideoMetadata

            out["video_metadata"] = [VideoMetadata(**m) for m in video_metadata]
        return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("proc25")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(qwen_tokenizer_dir() / name, d / name)
    (d / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    (d / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    return d


@pytest.fixture(scope="module")
def ref(folder):
    from transformers import AutoTokenizer, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class Reference(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, name, arg):
            return None if name == "video_processor" else super().check_argument_for_proper_class(name, arg)

    image_processor = Qwen2VLImageProcessorPil(min_pixels=PREPROCESSOR["min_pixels"],
                                               max_pixels=PREPROCESSOR["max_pixels"])
    return Reference(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(folder),
                     video_processor=VideoPatches(), chat_template=OFFICIAL_CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def qvu():
    return qwen_vl_utils_or_skip()


@pytest.fixture
def sampler(qvu, monkeypatch):
    return reading_with_naive_decoder(qvu, monkeypatch)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_video(tmp_path_factory.mktemp("clip25") / "a.mp4", n=30, fps=10)


def _image(h, w, seed):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


def reference(ref, sampler, messages):
    """transformers' processor output for `messages`, videos read by qwen-vl-utils with their metadata."""
    images, videos = [], []
    for m in messages:
        for item in m["content"] if isinstance(m["content"], list) else []:
            if "image" in item:
                images.append(item["image"])
            elif "video" in item:
                videos.append(sampler.fetch_video(item, return_video_metadata=True))
    text = ref.apply_chat_template(messages, add_generation_prompt=True)
    return ref(text=[text], images=images or None, videos=[v for v, _ in videos] or None,
               video_metadata=[m for _, m in videos] or None, return_tensors="pt")


def check(out, want, videos: bool):
    assert out["input_ids"].tolist() == want["input_ids"][0].tolist()
    for key in ("pixel_values", "image_grid_thw") if "pixel_values" in want else ():
        torch.testing.assert_close(out[key], want[key], rtol=0, atol=1e-6)
    if videos:
        torch.testing.assert_close(out["pixel_values_videos"], want["pixel_values_videos"], rtol=0, atol=1e-6)
        assert out["video_grid_thw"].tolist() == want["video_grid_thw"].tolist()
        assert out["second_per_grid_ts"].dtype == torch.float32
        assert out["second_per_grid_ts"].tolist() == want["second_per_grid_ts"].tolist()
    else:
        assert out["pixel_values_videos"] is None and out["second_per_grid_ts"] is None


def test_images_match_transformers(folder, ref, sampler):
    msgs = [{"role": "user", "content": [{"type": "image", "image": _image(100, 150, 0)},
                                         {"type": "text", "text": "and"}, {"type": "image", "image": _image(60, 40, 1)},
                                         {"type": "text", "text": "Compare."}]}]
    check(Processor.from_pretrained(folder)(msgs, add_generation_prompt=True), reference(ref, sampler, msgs), False)


SAMPLING = [{}, {"fps": 1.0}, {"fps": 4.5}, {"nframes": 6}, {"video_start": 0.55, "video_end": 2.0},
            {"fps": 10.0, "min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 20}]


@pytest.mark.parametrize("options", SAMPLING, ids=[str(o) for o in SAMPLING])
def test_video_file_matches_qwen_vl_utils_then_transformers(folder, ref, sampler, clip, options):
    msgs = [{"role": "user", "content": [{"type": "video", "video": clip, **options},
                                         {"type": "image", "image": _image(56, 84, 2)},
                                         {"type": "text", "text": "What happens?"}]}]
    out = Processor.from_pretrained(folder)(msgs, add_generation_prompt=True)
    want = reference(ref, sampler, msgs)
    check(out, want, True)
    _, fps = sampler.fetch_video(msgs[0]["content"][0], return_video_sample_fps=True)
    assert out["second_per_grid_ts"].item() == pytest.approx(2 / fps)  # qwen-vl-utils' own sampled fps


def test_frame_list_rate_is_sample_fps(folder, ref, sampler):
    # qwen-vl-utils 0.0.14 first resizes each listed frame as an image to multiples of 56 (it passes
    # its 28-px factor where fetch_image takes the 14-px patch size): frames already at such sizes
    # keep that step a no-op (docs/parity.md)
    frames = [_image(112, 168, 10 + i) for i in range(5)]  # 5 frames -> padded to 6 -> t = 3
    for rate in (None, 4.0):
        item = {"type": "video", "video": frames, **({"sample_fps": rate} if rate else {})}
        msgs = [{"role": "user", "content": [item, {"type": "text", "text": "Explain."}]}]
        (video, meta), fps = sampler.fetch_video(item, return_video_sample_fps=True, return_video_metadata=True)
        out = Processor.from_pretrained(folder)(msgs, add_generation_prompt=True)
        check(out, reference(ref, sampler, msgs), True)
        assert out["second_per_grid_ts"].tolist() == [2 / (rate or 2.0)] == [2 / fps]


def test_qwen2_vl_folders_give_no_seconds(folder, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        shutil.copy(folder / name, tmp_path / name)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    msgs = [{"role": "user", "content": [{"type": "video", "video": [_image(56, 56, 3)] * 2}]}]
    assert "second_per_grid_ts" not in Processor.from_pretrained(tmp_path)(msgs)
    assert Processor.from_pretrained(folder)(msgs)["second_per_grid_ts"].tolist() == [1.0]
