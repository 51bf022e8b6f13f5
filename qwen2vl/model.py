"""Qwen2-VL and Qwen2.5-VL: vision tower + text decoder, glued by scattering visual tokens into the
embeddings. The checkpoint's config picks the family (config.py); the glue is the same."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from qwen2vl.attention import causal_attend
from qwen2vl.backends.reference import TorchBackend
from qwen2vl.config import Qwen2VLConfig
from qwen2vl.hub import resolve_model_path
from qwen2vl.loader import checkpoint_dtype, load_weights
from qwen2vl.positions import mrope_positions
from qwen2vl.text import Attend, TextModel
from qwen2vl.vision import VisionTower


class Qwen2VL(nn.Module):
    def __init__(self, config: Qwen2VLConfig):
        super().__init__()
        self.config = config
        self.visual = VisionTower(config.vision)
        self.model = TextModel(config.text)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        self.backend = TorchBackend()  # the torch code; backends.prepare swaps in the device's speed-ups

    @classmethod
    def from_pretrained(cls, name_or_path, dtype: torch.dtype | None = None, device="cpu",
                        map_linears: bool = False) -> Qwen2VL:
        """Load a checkpoint folder (or hub repo id) straight into `dtype` on `device`.

        `map_linears`: the linears' weights are maps of the file (loader.py), for a caller that
        replaces every one by a copy (the CPU backend's repacking or quantization)."""
        folder = resolve_model_path(name_or_path)
        config = Qwen2VLConfig.from_pretrained(folder)
        with torch.device("meta"):
            model = cls(config)
        linears = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        load_weights(model, Path(folder), dtype or checkpoint_dtype(folder), device, config.tie_word_embeddings,
                     mapped=linears.__contains__ if map_linears else lambda name: False)
        return model.eval()

    # read from the final norm: a tensor-parallel rank other than 0 holds no embedding (parallel/plan.py)
    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def embed(self, input_ids: torch.Tensor, vision_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings [N, D] with vision_embeds rows placed, in order, at the image/video pads."""
        x = self.model.embed_tokens(input_ids)
        is_pad = (input_ids == self.config.image_token_id) | (input_ids == self.config.video_token_id)
        num_pads = int(is_pad.sum())
        num_rows = 0 if vision_embeds is None else vision_embeds.shape[0]
        if num_pads != num_rows:
            raise ValueError(f"{num_pads} image/video pad tokens but {num_rows} vision embeddings to place")
        if num_pads:
            x[is_pad] = vision_embeds.to(x.dtype)
        return x

    def encode_vision(self, input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw):
        """Vision embeddings for every pad token of `input_ids`, in sequence order, or None."""
        pad_ids = input_ids[(input_ids == self.config.image_token_id) | (input_ids == self.config.video_token_id)]
        if pad_ids.numel() == 0:
            return None
        out = torch.empty(pad_ids.numel(), self.config.text.hidden_size, dtype=self.dtype, device=self.device)
        for pixels, grid, token in (
            (pixel_values, image_grid_thw, self.config.image_token_id),
            (pixel_values_videos, video_grid_thw, self.config.video_token_id),
        ):
            if pixels is not None:
                rows = pad_ids == token
                feats = self.visual(pixels.to(self.device), grid)
                if feats.shape[0] != int(rows.sum()):
                    raise ValueError(f"{int(rows.sum())} pad tokens (id {token}) but {feats.shape[0]} vision tokens")
                out[rows] = feats.to(out.dtype)  # differs only under training's autocast
        return out

    def fuse_qkv(self) -> None:
        """Each decoder layer computes q, k and v with one linear (see text.Attention.fuse_qkv)."""
        for layer in self.model.layers:
            layer.self_attn.fuse_qkv()

    def fuse_gate_up(self) -> None:
        """Each decoder layer computes gate and up with one linear (see text.MLP.fuse_gate_up)."""
        for layer in self.model.layers:
            layer.mlp.fuse_gate_up()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attend: Attend = causal_attend) -> torch.Tensor:
        return self.model(x, positions, attend)

    @torch.inference_mode()
    def logits(
        self, input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None,
        second_per_grid_ts=None,
    ) -> torch.Tensor:
        """Logits [L, vocab] (float32) of one whole sequence, no cache: for tests and tools.
        `second_per_grid_ts` (one per video) places Qwen2.5-VL's videos in time (positions.py)."""
        input_ids = torch.as_tensor(input_ids, device=self.device).long()
        assert input_ids.dim() == 1, "logits() takes one sequence: a 1-D tensor of token ids"
        positions, _ = mrope_positions(input_ids.cpu(), image_grid_thw, video_grid_thw, self.config,
                                       second_per_grid_ts)
        vis = self.encode_vision(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        x = self.embed(input_ids, vis)
        return self.compute_logits(self.model(x, positions.to(self.device), causal_attend))
