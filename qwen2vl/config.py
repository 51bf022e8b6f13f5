"""Model configuration read from a checkpoint's own config.json.

Two families share these dataclasses, told apart by `model_type`: Qwen2-VL (`qwen2_vl`) and
Qwen2.5-VL (`qwen2_5_vl`), whose vision tower differs (RMSNorm, a gated SiLU MLP, window attention;
vision_window.py) and whose video positions count absolute time (`tokens_per_second`).

Two layouts exist in the wild for each and both are read here:
- the published hub files: text keys at the top level, `rope_scaling: {type: mrope, mrope_section}`,
  a `vision_config` with `in_chans`;
- what transformers 5 writes: `text_config` / `vision_config` nested, `rope_parameters` holding
  `rope_theta` and `mrope_section`, vision `in_channels`.
Unknown keys are ignored; every id and size the checkpoint states is read from it, never assumed.
The vision keys mean different things in the two families: Qwen2-VL's `embed_dim` is the tower's
width and `hidden_size` the merger's output; Qwen2.5-VL's `hidden_size` is the width and
`out_hidden_size` the merger's output. Defaults for keys a file leaves out are transformers 5.24's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path


def _pick(d: dict, *keys, default=None):
    for k in keys:
        if k in d and d[k] is not None:
            return d[k]
    return default


MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


@dataclass(frozen=True)
class VisionConfig:
    depth: int = 32
    embed_dim: int = 1280  # the tower's width
    num_heads: int = 16
    mlp_dim: int = 5120  # each block's MLP width (Qwen2-VL: embed_dim * mlp_ratio)
    hidden_size: int = 3584  # merger output width = the LLM's hidden size
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-6
    # Qwen2.5-VL only: the block variant, windows and absolute video time (left at these for Qwen2-VL)
    family: str = "qwen2_vl"  # the checkpoint's model_type
    window_size: int = 0  # side of an attention window in pixels (112: 4x4 merged tokens); 0: no windows
    fullatt_block_indexes: tuple[int, ...] = ()  # blocks attending over whole frames despite windows
    tokens_per_second: float | None = None  # temporal positions per second of video; None: one per grid step

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def patch_dim(self) -> int:  # one flattened patch: C * tp * p * p (1176 for the released models)
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def window_tokens(self) -> int:
        """Side of an attention window in merged tokens (4 for the released Qwen2.5-VL)."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @classmethod
    def from_dict(cls, d: dict, family: str = "qwen2_vl") -> VisionConfig:
        rope = d.get("rope_parameters") or {}
        shared = dict(
            depth=_pick(d, "depth", default=32),
            num_heads=_pick(d, "num_heads", default=16),
            in_channels=_pick(d, "in_channels", "in_chans", default=3),
            patch_size=_pick(d, "patch_size", "spatial_patch_size", default=14),
            temporal_patch_size=_pick(d, "temporal_patch_size", default=2),
            spatial_merge_size=_pick(d, "spatial_merge_size", default=2),
            rope_theta=_pick(rope, "rope_theta", default=10000.0),
            family=family,
        )
        if family == "qwen2_vl":
            embed_dim = _pick(d, "embed_dim", default=1280)
            return cls(embed_dim=embed_dim, mlp_dim=int(embed_dim * _pick(d, "mlp_ratio", default=4.0)),
                       hidden_size=_pick(d, "hidden_size", default=3584), **shared)
        act = _pick(d, "hidden_act", default="silu")
        if act != "silu":
            raise ValueError(f"config: vision hidden_act {act!r}; the Qwen2.5-VL tower's gated MLP runs 'silu'")
        cfg = cls(
            embed_dim=_pick(d, "hidden_size", default=3584),
            mlp_dim=_pick(d, "intermediate_size", default=3420),
            hidden_size=_pick(d, "out_hidden_size", default=3584),
            window_size=_pick(d, "window_size", default=112),
            fullatt_block_indexes=tuple(_pick(d, "fullatt_block_indexes", default=(7, 15, 23, 31))),
            tokens_per_second=_pick(d, "tokens_per_second", default=4),
            **shared,
        )
        if cfg.window_tokens < 1:
            raise ValueError(f"config: vision window_size {cfg.window_size} is smaller than one merged token "
                             f"({cfg.spatial_merge_size * cfg.patch_size} px)")
        return cfg


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    max_position_embeddings: int = 32768
    # hidden_size // num_attention_heads, fixed once: a tensor-parallel rank's config keeps it while
    # holding only its share of the heads (parallel/plan.py)
    head_dim: int = 0

    def __post_init__(self):
        if not self.head_dim and self.num_attention_heads:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)

    @classmethod
    def from_dict(cls, d: dict) -> TextConfig:
        # hub: rope_scaling {"type": "mrope", "mrope_section": [...]}, rope_theta at top level;
        # transformers 5: rope_parameters {"rope_theta": ..., "mrope_section": [...]}
        rope = {**(d.get("rope_scaling") or {}), **(d.get("rope_parameters") or {})}
        num_heads = _pick(d, "num_attention_heads", default=28)
        cfg = cls(
            vocab_size=_pick(d, "vocab_size", default=152064),
            hidden_size=_pick(d, "hidden_size", default=3584),
            intermediate_size=_pick(d, "intermediate_size", default=18944),
            num_hidden_layers=_pick(d, "num_hidden_layers", default=28),
            num_attention_heads=num_heads,
            num_key_value_heads=_pick(d, "num_key_value_heads", default=num_heads),
            rms_norm_eps=_pick(d, "rms_norm_eps", default=1e-6),
            rope_theta=_pick(rope, "rope_theta", default=_pick(d, "rope_theta", default=1000000.0)),
            mrope_section=tuple(_pick(rope, "mrope_section", default=(16, 24, 24))),
            max_position_embeddings=_pick(d, "max_position_embeddings", default=32768),
        )
        if cfg.hidden_size % cfg.num_attention_heads or cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ValueError(
                f"config: hidden_size {cfg.hidden_size}, num_attention_heads {cfg.num_attention_heads} and "
                f"num_key_value_heads {cfg.num_key_value_heads} must divide evenly"
            )
        if 2 * sum(cfg.mrope_section) != cfg.head_dim:
            raise ValueError(
                f"config: mrope_section {list(cfg.mrope_section)} must sum to head_dim/2 = {cfg.head_dim // 2}"
            )
        return cfg


@dataclass(frozen=True)
class Qwen2VLConfig:
    text: TextConfig
    vision: VisionConfig
    tie_word_embeddings: bool = False
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645
    model_type: str = "qwen2_vl"

    @classmethod
    def from_dict(cls, d: dict) -> Qwen2VLConfig:
        model_type = d.get("model_type") or "qwen2_vl"
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type is {model_type!r}; this package runs {' and '.join(map(repr, MODEL_TYPES))} "
                             "checkpoints")
        text_d = {**d, **(d.get("text_config") or {})}
        tie = d.get("tie_word_embeddings")
        if tie is None:
            tie = (d.get("text_config") or {}).get("tie_word_embeddings", False)
        # transformers 5 also honours a tie flag left inside text_config by older saves
        tie = bool(tie) or bool((d.get("text_config") or {}).get("tie_word_embeddings", False))
        ids = {f.name: _pick(d, f.name, default=_pick(text_d, f.name)) for f in fields(cls) if "token_id" in f.name}
        ids = {k: v for k, v in ids.items() if v is not None or k in ("bos_token_id", "eos_token_id")}
        return cls(
            text=TextConfig.from_dict(text_d),
            vision=VisionConfig.from_dict(d.get("vision_config") or {}, model_type),
            tie_word_embeddings=tie,
            model_type=model_type,
            **ids,
        )

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> Qwen2VLConfig:
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{folder}: no config.json; is this a Qwen2-VL or Qwen2.5-VL checkpoint folder?")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
