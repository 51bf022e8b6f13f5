"""Embeddings at the edge: what to pool (the checkpoint's own settings), inputs into prompts, and
the finishing of vectors (Matryoshka truncation, L2 norm).

Pooling. A sentence-transformers checkpoint states it in files: `modules.json` lists its modules
in order (a `...Pooling` module with its folder, optionally a `...Normalize`), and that folder's
`config.json` sets one `pooling_mode_*` flag. A checkpoint without `modules.json` (plain Qwen2-VL;
GME-Qwen2-VL as published, whose files are the Qwen2-VL ones plus `gme_inference.py`, which pools
the last token of the final hidden state and L2-normalizes) gets last-token pooling, normalized.

Inputs. A string is tokenized as it is (no template); a list of ints is used as token ids; a dict
`{"messages": [...]}` (vLLM's chat-style input, images and videos allowed) is rendered with the chat
template, the assistant's turn opened, and `<|endoftext|>` appended: the token GME pools, as its
`gme_inference.py` builds `...<|im_start|>assistant\\n<|endoftext|>`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from qwen2vl.engine.prompt import Prompt

END_TOKEN = "<|endoftext|>"  # appended to chat-style inputs: the pooled token (see above)
# sentence-transformers' Pooling flags -> our modes (engine/embed.py)
ST_MODES = {"pooling_mode_lasttoken": "last", "pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "first"}


@dataclass(frozen=True)
class Pooling:
    mode: str = "last"  # engine.embed.POOLING_MODES
    normalize: bool = True  # the default of `embed(normalize=None)`
    source: str = "default: no modules.json"  # where the settings came from, for messages and logs


def read_pooling(folder: str | Path) -> Pooling:
    """The checkpoint's pooling (module docstring). A mode we don't pool by is kept by name:
    embedding then fails with a message naming it, generation is unaffected."""
    folder = Path(folder)
    path = folder / "modules.json"
    if not path.is_file():
        return Pooling()
    modules = json.loads(path.read_text())
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    normalize = "Normalize" in kinds
    if "Pooling" not in kinds:
        return Pooling("last", normalize, "modules.json (no Pooling module: last token)")
    sub = modules[kinds.index("Pooling")].get("path", "")
    config_path = folder / sub / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    on = [k for k, v in config.items() if k.startswith("pooling_mode") and v is True]
    mode = ST_MODES.get(on[0], on[0]) if len(on) == 1 else "+".join(on) or "none set"
    return Pooling(mode, normalize, f"modules.json and {sub}/config.json")


def check_dimensions(dimensions, hidden_size: int) -> None:
    if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int)
                                   or not 1 <= dimensions <= hidden_size):
        raise ValueError(f"dimensions: must be an integer from 1 to {hidden_size} (the model's hidden size), "
                         f"got {dimensions!r}")


def finish(vectors: torch.Tensor, normalize: bool, dimensions: int | None = None) -> torch.Tensor:
    """[B, D] -> [B, dimensions or D]: truncated first, then L2-normalized (Matryoshka)."""
    if dimensions is not None:
        vectors = vectors[:, :dimensions]
    return F.normalize(vectors, dim=-1) if normalize else vectors


def as_inputs(inputs) -> list:
    """One input (a string, a list of token ids, a {"messages": ...} dict, a Prompt) or a list of them."""
    if isinstance(inputs, (str, dict, Prompt)) or (isinstance(inputs, list) and inputs
                                                    and isinstance(inputs[0], int)):
        return [inputs]
    return list(inputs)


def embedding_prompt(item, processor, model_config, **processor_args) -> Prompt:
    """One input -> the Prompt the engine embeds (module docstring); ValueError for a bad one."""
    if isinstance(item, Prompt):
        return item
    if isinstance(item, str):
        ids = processor.tokenizer.encode(item)
        if not ids:
            raise ValueError("an empty string has no tokens to embed")
        return Prompt.from_inputs({"input_ids": ids}, model_config)
    if isinstance(item, dict):
        if set(item) != {"messages"} or not isinstance(item["messages"], list) or not item["messages"]:
            raise ValueError('a chat-style input is {"messages": [...]} with a non-empty list of messages')
        inputs = processor(item["messages"], add_generation_prompt=True, **processor_args)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([end_token_id(processor)])])
        return Prompt.from_inputs(inputs, model_config)
    if isinstance(item, (list, tuple)) and item and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
        return Prompt.from_inputs({"input_ids": list(item)}, model_config)
    raise ValueError(f"an input must be a string, a non-empty list of token ids or {{\"messages\": [...]}}, "
                     f"got {type(item).__name__}")


def end_token_id(processor) -> int:
    return processor.tokenizer.token_to_id(END_TOKEN)
