"""One training row -> what the model learns from: input ids, labels, pixels and M-RoPE positions, built
by the inference processor, so training sees exactly what inference sees.

Which tokens are trained: only the assistant's answers. For the k-th message, an assistant turn, the ids
of messages[:k] with the generation prompt (ending `<|im_start|>assistant\\n`, what inference encodes
before it generates) must be a prefix of the whole conversation's ids; the answer is what follows, up
to and including the end token the template closes the turn with (`<|im_end|>`: trained, so the model
learns to stop). The newline the template writes after it is not: generation stops at `<|im_end|>`.
Everything else (system, user turns, pictures, the template's markup) is -100.

    tokens: <|im_start|>user\\n <image pads> What?<|im_end|>\\n<|im_start|>assistant\\n A cat. <|im_end|> \\n
    labels:  -100 ...............................................................  A cat. <|im_end|> -100

Special-token strings in an answer (grounding markup: `<|object_ref_start|>`, `<|box_start|>`, ...) are
the tokens themselves, as Qwen2-VL writes them; in user and system text they stay plain text.

Labels are not shifted (transformers' convention): labels[t] is the token at t, predicted from t - 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwen2vl.positions import mrope_positions
from qwen2vl.train.data import DataError, Row

IGNORE = -100  # the label of a token that is not trained (cross_entropy's ignore_index)


@dataclass
class Example:
    where: str  # "data.jsonl:12"
    input_ids: torch.Tensor  # [L] long
    labels: torch.Tensor  # [L] long: the id where trained, IGNORE elsewhere
    positions: torch.Tensor  # [3, L] M-RoPE positions
    pixel_values: torch.Tensor | None = None  # [patches, patch_dim] of the row's images, in order
    image_grid_thw: torch.Tensor | None = None  # [images, 3]
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.numel()


def encode_row(row: Row, processor, config) -> Example:
    """`row` through `processor` (the checkpoint's Processor) for a model with `config`."""
    try:
        return _encode(row.messages, processor, config, row.where)
    except DataError:
        raise
    except (ValueError, OSError) as e:  # MediaError and template errors are ValueErrors
        raise DataError(f"{row.where}: {' '.join(str(e).split())}") from None


def _encode(messages: list, processor, config, where: str) -> Example:
    short = processor.encode_text(messages, answers_hold_special_tokens=True)  # one pad per picture
    trained = answer_mask(messages, short, processor, where)
    inputs = processor(messages, answers_hold_special_tokens=True)
    ids = inputs["input_ids"].tolist()
    labels = _expand_labels(short, trained, ids, {processor.image_token_id, processor.video_token_id})
    positions, _ = mrope_positions(ids, inputs["image_grid_thw"], inputs["video_grid_thw"], config,
                                   inputs.get("second_per_grid_ts"))
    return Example(where, inputs["input_ids"], torch.tensor(labels, dtype=torch.long), positions,
                   inputs["pixel_values"], inputs["image_grid_thw"], inputs["pixel_values_videos"],
                   inputs["video_grid_thw"])


def answer_mask(messages: list, ids: list[int], processor, where: str) -> list[bool]:
    """Which of the conversation's `ids` (pads not expanded) are assistant answers (module docstring)."""
    trained = [False] * len(ids)
    ends = set(processor.eos_token_ids)
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if k == 0:
            raise DataError(f"{where}: message 0 is an assistant answer to nothing; start with a user message")
        start = _prefix_length(processor.encode_text(messages[:k], add_generation_prompt=True,
                                                     answers_hold_special_tokens=True), ids, where, k)
        stop = _prefix_length(processor.encode_text(messages[: k + 1], answers_hold_special_tokens=True), ids, where, k)
        closing = [i for i in range(start, stop) if ids[i] in ends]
        if not closing:
            raise DataError(f"{where}: message {k}: the chat template closes this answer with none of the "
                            f"end tokens {sorted(ends)}, so the model could not learn to stop")
        trained[start : closing[-1] + 1] = [True] * (closing[-1] + 1 - start)
    return trained


def _prefix_length(prefix: list[int], ids: list[int], where: str, k: int) -> int:
    if ids[: len(prefix)] != prefix:
        raise DataError(f"{where}: message {k}: the conversation up to this answer tokenizes differently "
                        "alone than inside the whole conversation (the chat template rewrites earlier turns?)")
    return len(prefix)


def _expand_labels(short: list[int], trained: list[bool], ids: list[int], pads: set[int]) -> list[int]:
    """Labels for the expanded ids: each pad of `short` stands for a run of pads in `ids` (never trained)."""
    labels, j = [], 0
    for token, keep in zip(short, trained):
        if token in pads:
            run = 0
            while j + run < len(ids) and ids[j + run] == token:
                run += 1
            assert run > 0, "a picture's pad run is missing from the processor's ids"
            labels += [IGNORE] * run
            j += run
        else:
            assert ids[j] == token, "the processor's ids differ from its text encoding"
            labels.append(token if keep else IGNORE)
            j += 1
    assert j == len(ids)
    return labels
