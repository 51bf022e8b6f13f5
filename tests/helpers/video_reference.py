"""qwen-vl-utils' real video code runnable here, and transformers' video patching written out.

qwen-vl-utils imports torchvision at module level and reads videos with decord/torchcodec/
torchvision, none of which is installed here. Its real code runs anyway with two stand-ins made
below: `torchvision.transforms.functional.resize` re-derived from torchvision's
_functional_tensor.resize (float32 bicubic interpolate with antialias, clamp, round, uint8), and a
`decord.VideoReader` that decodes every frame with PyAV the naive way. Everything else (frame
range, smart_nframes, linspace indices, the pixel budget, smart_resize) is qwen-vl-utils' own.
The last step, transformers' Qwen2VLVideoProcessor, needs torchvision too: its fused
normalize and the REFERENCE.md §3.3 patch order are written out below with numpy.
"""

import enum
import importlib.util
import sys
import types

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qwen2vl.processing.vision_config import VisionProcessingConfig

MEAN, STD = VisionProcessingConfig().image_mean, VisionProcessingConfig().image_std


def tv_resize(img, size, interpolation=None, antialias=True):
    x = F.interpolate(img.to(torch.float32), size=list(size), mode="bicubic", align_corners=False,
                      antialias=antialias)
    return x.clamp(0, 255).round().to(img.dtype) if img.dtype == torch.uint8 else x


def load_qwen_vl_utils():
    """qwen_vl_utils.vision_process imported with the torchvision stand-in, or None if not installed."""
    if importlib.util.find_spec("qwen_vl_utils") is None:  # not importorskip: it needs the stand-in first
        return None
    InterpolationMode = enum.Enum("InterpolationMode", {"BICUBIC": "bicubic"})
    tv = types.ModuleType("torchvision")
    tv.__version__ = "0.28.0"
    tv.io = types.ModuleType("torchvision.io")
    tv.transforms = types.ModuleType("torchvision.transforms")
    tv.transforms.InterpolationMode = InterpolationMode
    tv.transforms.functional = types.SimpleNamespace(resize=tv_resize)
    stubs = {"torchvision": tv, "torchvision.io": tv.io, "torchvision.transforms": tv.transforms}
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        import qwen_vl_utils.vision_process as vp
    finally:  # keep the stand-in out of everyone else's way (transformers probes for torchvision)
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return vp


def qwen_vl_utils_or_skip():
    """load_qwen_vl_utils(), or the test skipped with the install line."""
    vp = load_qwen_vl_utils()
    if vp is None:
        pytest.skip("test oracle missing: pip install qwen-vl-utils==0.0.14")
    return vp


def reading_with_naive_decoder(vp, monkeypatch):
    """qwen-vl-utils `vp` reading videos through NaiveVideoReader (as its decord backend) for one test."""
    monkeypatch.setitem(sys.modules, "decord", types.SimpleNamespace(VideoReader=NaiveVideoReader))
    monkeypatch.setattr(vp, "get_video_reader_backend", lambda: "decord")
    return vp


class NaiveVideoReader:
    """decord.VideoReader's interface over a full PyAV decode of the file."""

    def __init__(self, path):
        with av.open(path) as container:
            stream = container.streams.video[0]
            self.fps = float(stream.average_rate)
            self.frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]

    def __len__(self):
        return len(self.frames)

    def get_avg_fps(self):
        return self.fps

    def get_batch(self, idx):
        batch = np.stack([self.frames[i] for i in idx])
        return types.SimpleNamespace(asnumpy=lambda: batch)


def make_video(path, n=30, fps=10, width=64, height=48, codec="libx264", gop=None):
    """Frame i is gray level 8*(i % 32) on the left half and 8*(i // 32) on the right, so the index
    of a decoded frame can be read back."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if gop:
            stream.codec_context.gop_size = gop
        for i in range(n):
            a = np.zeros((height, width, 3), np.uint8)
            a[:, : width // 2], a[:, width // 2:] = 8 * (i % 32), 8 * (i // 32)
            for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def hf_video_patches(video: torch.Tensor):
    """transformers' Qwen2VLVideoProcessor after resizing: pad to even frames with the last one,
    fused rescale+normalize in float32, then REFERENCE.md §3.3's patch order, in numpy."""
    if video.shape[0] % 2:
        video = torch.cat([video, video[-1:]])
    mean = torch.tensor(MEAN) * (1.0 / (1 / 255))
    std = torch.tensor(STD) * (1.0 / (1 / 255))
    x = ((video.to(torch.float32) - mean[:, None, None]) / std[:, None, None]).numpy()[None]
    B, T, C, H, W = x.shape
    gt, gh, gw = T // 2, H // 14, W // 14
    x = x.reshape(B, gt, 2, C, gh // 2, 2, 14, gw // 2, 2, 14).transpose(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return torch.from_numpy(x.reshape(gt * gh * gw, C * 2 * 14 * 14).copy()), (gt, gh, gw)
