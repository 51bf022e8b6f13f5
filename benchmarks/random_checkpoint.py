"""Random-weight checkpoints at the real Qwen2-VL shapes, built once with transformers and cached.

The config is the published flat config.json of Qwen2-VL-2B-Instruct (REFERENCE §1.1), so the
benchmarks also exercise the flat-layout loader. Building takes ~1 minute and ~9 GB of RAM; the
folder is cached under .cache/ and reused by every benchmark (a lock keeps parallel runs apart).
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

PREPROCESSOR = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
}


def random_checkpoint(name: str = "2b", tokenizer_dir: Path | None = None) -> Path:
    """Folder of a random-weight checkpoint (bf16 safetensors, hub names, flat config)."""
    folder = CACHE / f"qwen2vl-{name}-random"
    CACHE.mkdir(exist_ok=True)
    with open(CACHE / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "model.safetensors.index.json").is_file():
            from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

            cfg_dict = {"2b": CONFIG_2B, "7b": CONFIG_7B}[name]
            tmp = folder.with_suffix(".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            torch.manual_seed(0)
            model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**cfg_dict)).to(torch.bfloat16)
            model.save_pretrained(tmp, max_shard_size="2GB")
            del model
            (tmp / "config.json").write_text(json.dumps(cfg_dict, indent=2))  # the published flat layout
            (tmp / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
            tmp.rename(folder)
        if tokenizer_dir is not None:
            for f in Path(tokenizer_dir).iterdir():
                if f.is_file() and not (folder / f.name).exists():
                    shutil.copy(f, folder / f.name)
    return folder
