"""Image preprocessing against transformers' Qwen2VLImageProcessorPil (the oracle), built with the
hub preprocessor_config.json values of REFERENCE.md §3.2."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from qwen2vl.processing.image import image_token_count, load_image, preprocess_image, smart_resize
from qwen2vl.processing.vision_config import VisionProcessingConfig

HUB = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
       "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
       "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"}
CFG = VisionProcessingConfig.from_dict(HUB)


def hf_processor(**overrides):
    kwargs = {k: v for k, v in HUB.items() if not k.endswith(("_type", "_class"))}
    return Qwen2VLImageProcessorPil(**{**kwargs, **overrides})


def reference(image, **overrides):
    out = hf_processor(**overrides)(image, return_tensors="pt")
    return out["pixel_values"], tuple(out["image_grid_thw"][0].tolist())


def noise(width, height, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (height, width, Image.getmodebands(mode)), dtype=np.uint8)
    return Image.frombytes(mode, (width, height), data.tobytes())


def assert_matches(ours, ref):
    (pv, grid), (ref_pv, ref_grid) = ours, ref
    assert grid == ref_grid
    assert pv.dtype == torch.float32 and pv.shape == ref_pv.shape == (grid[0] * grid[1] * grid[2], 1176)
    assert torch.equal(pv, ref_pv), (pv - ref_pv).abs().max()


@pytest.mark.parametrize("width,height", [(20, 20), (28, 28), (1, 1), (3, 5), (100, 150), (150, 100), (37, 1000),
                                          (1000, 37), (10, 2000), (2000, 10), (1, 150), (448, 448), (333, 251)])
def test_sizes_match_transformers(width, height):
    image = noise(width, height, seed=width * 7 + height)
    assert_matches(preprocess_image(image, CFG), reference(image))


def test_large_image_is_downscaled_by_max_pixels():
    image = noise(1300, 1000, seed=3)  # 1.3 MP, over transformers' code default of 28*28*1280
    ours = preprocess_image(image, CFG, max_pixels=28 * 28 * 1280)
    assert_matches(ours, reference(image, max_pixels=28 * 28 * 1280))
    assert ours[1][1] * ours[1][2] * 14 * 14 <= 28 * 28 * 1280


@pytest.mark.parametrize("min_pixels,max_pixels", [(3136, 28 * 28 * 64), (28 * 28 * 300, 12845056),
                                                   (28 * 28 * 16, 28 * 28 * 16), (784, 784 * 4)])
def test_per_item_min_max_pixels(min_pixels, max_pixels):
    image = noise(241, 163, seed=5)
    ours = preprocess_image(image, CFG, min_pixels=min_pixels, max_pixels=max_pixels)
    assert_matches(ours, reference(image, min_pixels=min_pixels, max_pixels=max_pixels))


@pytest.mark.parametrize("rh,rw", [(280, 420), (100, 50), (29, 1000)])
def test_resized_height_width_as_qwen_vl_utils(rh, rw):
    # qwen-vl-utils' fetch_image: snap the requested size with smart_resize, PIL-bicubic resize to
    # it, then hand the image to the HF processor (whose own resize is then a no-op).
    image = noise(211, 97, seed=6)
    h, w = hf_smart_resize(rh, rw, 28, HUB["min_pixels"], HUB["max_pixels"])
    ref = reference(image.resize((w, h), Image.Resampling.BICUBIC))
    assert_matches(preprocess_image(image, CFG, resized_height=rh, resized_width=rw), ref)


def palette_image(transparent: bool):
    image = noise(90, 61, seed=8).quantize(colors=16)
    if transparent:
        image.info["transparency"] = 3
    return image


@pytest.mark.parametrize("make", [
    lambda: noise(90, 61, "L"), lambda: noise(90, 61, "LA"), lambda: noise(90, 61, "RGBA"),
    lambda: noise(90, 61, "CMYK"), lambda: palette_image(False), lambda: palette_image(True),
    lambda: noise(90, 61, "L").convert("1"),
    lambda: noise(90, 61, "RGBA").convert("PA"),
], ids=["L", "LA", "RGBA", "CMYK", "P", "P-transparency", "1", "PA"])
def test_modes_match_transformers(make):
    image = make()
    assert_matches(preprocess_image(image, CFG), reference(image))


def test_16_bit_keeps_top_bits_where_transformers_clips():
    # Deliberate deviation: both references convert I;16 with PIL, which clips every value > 255 to
    # white. We keep the top 8 bits; the rest of the pipeline still matches transformers exactly.
    raw = np.random.default_rng(9).integers(0, 65536, (61, 90), dtype=np.uint16)
    image = Image.fromarray(raw)
    assert image.mode == "I;16"
    assert_matches(preprocess_image(image, CFG), reference(Image.fromarray((raw >> 8).astype(np.uint8))))
    clipped, _ = reference(image)
    assert (clipped > 1.5).float().mean() > 0.9  # what the reference does: nearly all white


def test_aspect_ratio_over_200_is_a_clear_error():
    image = noise(2010, 10)
    with pytest.raises(ValueError, match="aspect ratio"):
        reference(image)
    with pytest.raises(ValueError, match="aspect ratio must be at most 200"):
        preprocess_image(image, CFG)
    with pytest.raises(ValueError, match="resized_height"):
        preprocess_image(noise(30, 30), CFG, resized_height=56)
    with pytest.raises(ValueError, match="min_pixels"):
        preprocess_image(noise(30, 30), CFG, min_pixels=5000, max_pixels=4000)


def test_smart_resize_table_matches_transformers():
    for h, w in [(1, 1), (13, 13), (14, 14), (20, 2000), (448, 448), (1080, 1920), (3000, 4000), (37, 1000),
                 (7, 1400), (999, 5), (60000, 300)]:
        for lo, hi in [(3136, 12845056), (3136, 1003520), (100352, 602112)]:
            assert smart_resize(h, w, 28, lo, hi) == hf_smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)


@pytest.mark.parametrize("height,width,options", [
    (448, 448, {}), (100, 150, {}), (3000, 4000, {}), (20, 20, {}), (1080, 1920, {"max_pixels": 1003520}),
    (500, 700, {"min_pixels": 28 * 28 * 1000}), (57, 91, {"resized_height": 300, "resized_width": 200})])
def test_image_token_count_without_decoding(height, width, options):
    counted = image_token_count(height, width, CFG, **options)
    if "resized_height" in options:
        h, w = hf_smart_resize(options["resized_height"], options["resized_width"], 28, 3136, 12845056)
        patches = (h // 14) * (w // 14)
    else:
        patches = hf_processor(**options).get_number_of_image_patches(height, width, {})
    assert counted.grid_thw[1] * counted.grid_thw[2] == patches
    assert counted.num_tokens == patches // 4
    assert (counted.height, counted.width) == (counted.grid_thw[1] * 14, counted.grid_thw[2] * 14)


def test_reference_token_table():
    # REFERENCE.md §3.2: input (h x w) -> grid -> tokens with the hub max_pixels.
    table = [(448, 448, (1, 32, 32), 256), (100, 150, (1, 8, 10), 20), (37, 1000, (1, 2, 72), 36),
             (1080, 1920, (1, 78, 138), 2691), (3000, 4000, (1, 214, 286), 15301), (20, 20, (1, 4, 4), 4)]
    for h, w, grid, tokens in table:
        counted = image_token_count(h, w, CFG)
        assert (counted.grid_thw, counted.num_tokens) == (grid, tokens)


def test_load_image_applies_exif_orientation(tmp_path):
    image = noise(40, 20, seed=11)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    loaded = load_image(str(path))
    assert loaded.mode == "RGB" and loaded.size == (20, 40)
    with Image.open(path) as raw:
        assert np.array_equal(np.asarray(loaded), np.asarray(ImageOps.exif_transpose(raw).convert("RGB")))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_header_size_is_the_size_the_processor_sees(tmp_path, orientation):
    """The one header probe (token counts, server, CLI) reads the size load_image decodes to."""
    from qwen2vl.processing.headers import image_header, media_header

    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "photo.jpg"
    noise(64, 20, seed=orientation).save(path, exif=exif)
    assert image_header(path) == media_header(path) == load_image(str(path)).size


def test_load_image_converts_formats_to_rgb(tmp_path):
    rgba = noise(33, 17, "RGBA", seed=12)
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    loaded = load_image(buf.getvalue())
    assert loaded.mode == "RGB"
    expected = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    assert np.array_equal(np.asarray(loaded), np.asarray(expected))
    assert load_image(noise(5, 5, "L")).mode == "RGB"


def test_config_reads_hub_and_transformers5_files(tmp_path):
    hub_dir, v5_dir, empty = tmp_path / "hub", tmp_path / "v5", tmp_path / "empty"
    for d in (hub_dir, v5_dir, empty):
        d.mkdir()
    (hub_dir / "preprocessor_config.json").write_text(json.dumps({**HUB, "max_pixels": 1003520, "new_key": 1}))
    hf_processor(max_pixels=1003520).save_pretrained(v5_dir)  # writes size={shortest,longest}_edge
    hub, v5 = VisionProcessingConfig.from_pretrained(hub_dir), VisionProcessingConfig.from_pretrained(v5_dir)
    assert hub == v5
    assert (hub.min_pixels, hub.max_pixels, hub.patch_size, hub.merge_size) == (3136, 1003520, 14, 2)
    assert hub.image_mean == tuple(HUB["image_mean"]) and hub.image_std == tuple(HUB["image_std"])
    default = VisionProcessingConfig.from_pretrained(empty)
    assert (default.min_pixels, default.max_pixels) == (3136, 12845056) and default == CFG
    assert (default.fps, default.min_frames, default.max_frames) == (2.0, 4, 768)
    with pytest.raises(FileNotFoundError):
        VisionProcessingConfig.from_pretrained(tmp_path / "missing")
