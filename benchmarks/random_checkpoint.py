"""Random-weight checkpoints at the real Qwen2-VL and Qwen2.5-VL shapes, built once with transformers
and cached.

The configs are the published flat config.json files (Qwen2-VL-2B/7B-Instruct: REFERENCE §1.1;
Qwen2.5-VL-3B/7B-Instruct from memory, the same layout with `out_hidden_size`, `window_size`,
`fullatt_block_indexes` and `tokens_per_second` in the vision config), so the benchmarks also
exercise the flat-layout loader. Names: "2b", "7b", "2.5-3b", "2.5-7b". The weights are made in
bfloat16 (peak RAM about one copy: ~4.5 GB for the 2B, ~7.5 GB for the 2.5-3B, ~16.5 GB for a 7B);
the folder is cached under .cache/ and reused by every benchmark (a lock keeps parallel runs apart).
`layers=N` builds the same widths with N decoder and N vision layers: a quick run of a script at
real widths without the build time and memory of the whole model.
"""

from __future__ import annotations

import fcntl
import json
import shutil
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"

CONFIG_2B = {
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "model_type": "qwen2_vl",
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 1536,
    "initializer_range": 0.02,
    "intermediate_size": 8960,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "num_attention_heads": 12,
    "num_hidden_layers": 28,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
        "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 151936,
}

CONFIG_7B = {
    **CONFIG_2B,
    "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28, "num_key_value_heads": 4,
    "tie_word_embeddings": False, "vocab_size": 152064,
    "vision_config": {**CONFIG_2B["vision_config"], "hidden_size": 3584},
}

# Qwen2.5-VL-3B-Instruct's config.json (from memory: read real values from the checkpoint itself)
CONFIG_25_3B = {
    **{k: v for k, v in CONFIG_2B.items() if k != "vision_config"},
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "hidden_size": 2048, "intermediate_size": 11008, "num_attention_heads": 16, "num_hidden_layers": 36,
    "num_key_value_heads": 2, "max_position_embeddings": 128000, "max_window_layers": 70,
    "tie_word_embeddings": True, "vocab_size": 151936,
    "vision_config": {
        "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
        "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
        "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
}

CONFIG_25_7B = {
    **CONFIG_25_3B,
    "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "max_window_layers": 28, "tie_word_embeddings": False, "vocab_size": 152064,
    "vision_config": {**CONFIG_25_3B["vision_config"], "out_hidden_size": 3584},
}

CONFIGS = {"2b": CONFIG_2B, "7b": CONFIG_7B, "2.5-3b": CONFIG_25_3B, "2.5-7b": CONFIG_25_7B}

PREPROCESSOR = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
}


def reference_class(config: dict):
    """transformers' model class for a config.json dict (Qwen2-VL or Qwen2.5-VL)."""
    import transformers

    return getattr(transformers, config["architectures"][0])


def with_layers(config: dict, layers: int) -> dict:
    """`config` with `layers` decoder and vision layers (full-attention vision blocks kept where they fit)."""
    vision = {**config["vision_config"], "depth": layers}
    if "fullatt_block_indexes" in vision:
        vision["fullatt_block_indexes"] = [i for i in vision["fullatt_block_indexes"] if i < layers] or [layers - 1]
    return {**config, "num_hidden_layers": layers, "max_window_layers": layers, "vision_config": vision}


def random_checkpoint(name: str = "2b", tokenizer_dir: Path | None = None, layers: int | None = None) -> Path:
    """Folder of a random-weight checkpoint (bf16 safetensors, hub names, flat config)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown random checkpoint {name!r}; choose among {', '.join(CONFIGS)}")
    tag = name if layers is None else f"{name}-{layers}layers"
    folder = CACHE / f"qwen2vl-{tag}-random"
    CACHE.mkdir(exist_ok=True)
    with open(CACHE / f".{tag}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not folder.is_dir():  # written whole under another name, then renamed
            cfg_dict = CONFIGS[name] if layers is None else with_layers(CONFIGS[name], layers)
            cls = reference_class(cfg_dict)
            tmp = folder.parent / (folder.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            torch.manual_seed(0)
            default = torch.get_default_dtype()
            torch.set_default_dtype(torch.bfloat16)  # made in bf16: one copy of the weights at peak
            try:
                model = cls(cls.config_class(**cfg_dict))
            finally:
                torch.set_default_dtype(default)
            model.save_pretrained(tmp, max_shard_size="2GB")
            del model
            (tmp / "config.json").write_text(json.dumps(cfg_dict, indent=2))  # the published flat layout
            processor = "Qwen2_5_VLProcessor" if cfg_dict["model_type"] == "qwen2_5_vl" else "Qwen2VLProcessor"
            (tmp / "preprocessor_config.json").write_text(json.dumps({**PREPROCESSOR, "processor_class": processor},
                                                                     indent=2))
            tmp.rename(folder)
        if tokenizer_dir is not None:
            for f in Path(tokenizer_dir).iterdir():
                if f.is_file() and not (folder / f.name).exists():
                    shutil.copy(f, folder / f.name)
    return folder
