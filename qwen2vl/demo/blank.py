"""A new, untrained demo checkpoint folder: the files a Qwen2-VL checkpoint has, random weights.

    python -m qwen2vl.demo.blank OUT [--seed 0]

writes config.json (the published flat layout), tokenizer.json + tokenizer_config.json (the
reduced vocabulary of vocab.py, with the Qwen2-VL chat template), preprocessor_config.json,
generation_config.json and model.safetensors. Training starts from this folder; `save_weights`
writes trained weights back in the hub layout (the patch embedding as a Conv3d weight), so
transformers loads the result too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from qwen2vl.demo import vocab
from qwen2vl.processing.chat_template import BUILTIN_TEMPLATE

# Sizes: a 4-block, 192-wide ViT and a 4-layer, 256-wide decoder (~6 M parameters) train on these
# tasks in 1-3 CPU hours and keep the file well under 25 MB.
TEXT = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, mrope_section=[8, 12, 12], rope_theta=10000.0, max_position_embeddings=4096)
VISION = dict(depth=4, embed_dim=192, num_heads=3, mlp_ratio=4)
VOCAB_MULTIPLE = 64  # the embedding is padded past the tokenizer's ids, as Qwen pads 151,657 to 151,936
# Images keep their size (112-448 px sides, rounded to 28): shrinking them would make 18 px text
# unreadable. Video frames (112-224 px) too.
PREPROCESSOR = {
    "min_pixels": 56 * 56, "max_pixels": 448 * 448, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
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


def write_blank(out: str | Path, seed: int = 0, text: dict = TEXT, vision: dict = VISION) -> Path:
    """All files of an untrained demo checkpoint in `out`; returns the folder."""
    from tokenizers import Tokenizer

    from qwen2vl.config import Qwen2VLConfig
    from qwen2vl.model import Qwen2VL

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
    torch.manual_seed(seed)
    model = Qwen2VL(Qwen2VLConfig.from_dict(config))
    init_weights(model)
    save_weights(model, out, torch.float32)
    return out


def init_weights(model: torch.nn.Module, std: float = 0.02) -> None:
    """GPT-2/Qwen style: linears and embeddings N(0, std), biases 0, norms 1; the projections that
    write into a residual stream scaled by 1/sqrt(2 * layers), as in GPT-2, so the stream does
    not grow with depth."""
    layers = {"visual": model.config.vision.depth, "model": model.config.text.num_hidden_layers}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if "norm" in name or "ln_q" in name else 0.0)
                continue
            scale = 1.0
            if name.endswith(("o_proj.weight", "down_proj.weight", "attn.proj.weight", "fc2.weight")):
                scale = (2 * layers[name.split(".")[0]]) ** -0.5
            p.normal_(0.0, std * scale)


def save_weights(model: torch.nn.Module, folder: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """model.safetensors in the hub layout; the tied head is not written (the embedding is it)."""
    folder = Path(folder)
    state = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        if name == "visual.patch_embed.proj.weight":  # Linear (E, C*T*P*P) -> Conv3d (E, C, T, P, P)
            v = model.config.vision
            t = t.reshape(t.shape[0], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
        state[name] = t.detach().to(dtype).contiguous()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = folder / "config.json"
    cfg = json.loads(config.read_text())
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    config.write_text(json.dumps(cfg, indent=2) + "\n")
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_blank(args.out, args.seed))
