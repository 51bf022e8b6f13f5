"""A new demo checkpoint folder without weights: what `qwen2vl train --init-random` starts from.

    python -m qwen2vl.demo.blank OUT

writes config.json (the published flat layout, every token id taken from the tokenizer),
tokenizer.json + tokenizer_config.json (the reduced vocabulary of vocab.py, with the Qwen2-VL chat
template), preprocessor_config.json and generation_config.json (greedy).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qwen2vl.demo import vocab
from qwen2vl.processing.chat_template import BUILTIN_TEMPLATE

# Sizes: a 4-block, 192-wide ViT and a 4-layer, 256-wide decoder (~6 M parameters) train on these
# tasks in 1-3 CPU hours and keep the file well under 25 MB.
TEXT = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, mrope_section=[8, 12, 12], rope_theta=10000.0, max_position_embeddings=4096)
VISION = dict(depth=4, embed_dim=192, num_heads=3, mlp_ratio=4)
VOCAB_MULTIPLE = 64  # the embedding is padded past the tokenizer's ids, as Qwen pads 151,657 to 151,936
# Images up to 336x336 px keep their size (rounded to 28), larger ones shrink to that area: at most
# 144 visual tokens, and 18 px type stays >= 13 px. Video frames (112-224 px) keep theirs.
PREPROCESSOR = {
    "min_pixels": 56 * 56, "max_pixels": 336 * 336, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "video_min_pixels": 56 * 56, "video_max_pixels": 224 * 224, "fps": 2.0, "min_frames": 4, "max_frames": 16,
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
}


def config_dict(ids: dict[str, int], vocab_size: int, text: dict = TEXT, vision: dict = VISION) -> dict:
    """config.json in the published flat layout, every token id taken from the tokenizer (`ids`)."""
    text = dict(text)
    mrope, theta = text.pop("mrope_section"), text.pop("rope_theta")
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
        "vocab_size": vocab_size, **text, "hidden_act": "silu", "rms_norm_eps": 1e-6,
        "rope_theta": theta, "rope_scaling": {"type": "mrope", "mrope_section": mrope},
        "attention_dropout": 0.0, "use_sliding_window": False, "sliding_window": text["max_position_embeddings"],
        "max_window_layers": text["num_hidden_layers"], "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"], "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_config": {**vision, "hidden_size": text["hidden_size"], "in_chans": 3, "patch_size": 14,
                          "spatial_patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2,
                          "hidden_act": "quick_gelu"},
    }


def write_blank(out: str | Path, text: dict = TEXT, vision: dict = VISION) -> Path:
    """All files of a demo checkpoint but its weights, in `out`; returns the folder."""
    from tokenizers import Tokenizer

    out = Path(out)
    vocab.build_tokenizer(out, BUILTIN_TEMPLATE.read_text(encoding="utf-8"))
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = {s: tok.token_to_id(s) for s in vocab.SPECIAL_TOKENS}
    size = -(-tok.get_vocab_size(with_added_tokens=True) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    config = config_dict(ids, size, text, vision)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2) + "\n")
    generation = {"bos_token_id": ids["<|endoftext|>"], "pad_token_id": ids["<|endoftext|>"],
                  "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "do_sample": False,
                  "max_new_tokens": 64}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder to write")
    print(write_blank(parser.parse_args().out))
