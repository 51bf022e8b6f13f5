"""Training rows: JSONL in LLaMA-Factory's multimodal "sharegpt" layout or our Qwen/OpenAI message form,
checked line by line and turned into Qwen-form conversations (what the processor reads).

One conversation per line, in either layout:

    {"messages": [{"role": "user", "content": "<image>What is this?"},
                  {"role": "assistant", "content": "A cat."}],
     "images": ["cat.png"], "videos": ["clip.mp4", ["f0.png", "f1.png", "f2.png", "f3.png"]]}

    {"messages": [{"role": "user", "content": [{"type": "image", "image": "cat.png"},
                                               {"type": "text", "text": "What is this?"}]},
                  {"role": "assistant", "content": "A cat."}]}

In the first, each `<image>` / `<video>` tag in a message's text takes the next entry of `images` /
`videos`, in order; a video is a file or a list of frame images. ShareGPT's own spelling
(`conversations` with `from: human/gpt/system` and `value`) is read too. Relative paths are relative
to the JSONL file. Anything wrong is a DataError naming the file, the line and the field.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from qwen2vl.processing.messages import SOURCE_KEYS, check_messages, from_openai

TAG = re.compile(r"<(image|video)>")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "observation": "tool", "tool": "tool"}


class DataError(ValueError):
    """A training row that can't be used; the message names the file, line and problem."""


@dataclass(frozen=True)
class Row:
    where: str  # "data.jsonl:12", for errors raised later (tokenizing, image decoding)
    messages: list  # Qwen form, media paths absolute


def read_rows(path: str | Path, *, min_pixels: int | None = None, max_pixels: int | None = None) -> list[Row]:
    """Every row of a JSONL file, checked; per-item pixel limits are added where a row sets none."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    options = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            rows.append(Row(where, parse_row(obj, where, path.parent, options)))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def parse_row(obj, where: str, base: Path, options: dict | None = None) -> list:
    """One JSON row -> Qwen-form messages, or a DataError saying what is wrong where."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with 'messages', got {type(obj).__name__}")
    key = "messages" if "messages" in obj else "conversations" if "conversations" in obj else None
    if key is None:
        raise DataError(f"{where}: missing 'messages' (a list of {{'role', 'content'}})")
    messages = obj[key]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: '{key}' must be a non-empty list")
    messages = [_sharegpt_message(m, f"{where}: {key}[{i}]") for i, m in enumerate(messages)]
    has_tags = any(isinstance(m.get("content"), str) and TAG.search(m["content"]) for m in messages)
    if has_tags or "images" in obj or "videos" in obj:
        messages = _place_media(messages, obj, where)
    try:
        messages = from_openai(messages)
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    messages = [_with_paths(m, base, options or {}) for m in messages]
    try:
        media = check_messages(messages)
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    for item in media:
        _check_exists(item.source, item.kind, where)
    _check_turns(messages, where)
    return messages


def _sharegpt_message(m, where: str) -> dict:
    """{from, value} -> {role, content}; {role, content} as is."""
    if not isinstance(m, dict):
        raise DataError(f"{where}: expected an object with 'role' and 'content', got {type(m).__name__}")
    if "from" in m and "role" not in m:
        role = SHAREGPT_ROLES.get(m["from"])
        if role is None:
            raise DataError(f"{where}: unknown 'from' {m['from']!r}; expected one of {sorted(SHAREGPT_ROLES)}")
        return {"role": role, "content": m.get("value")}
    return dict(m)


def _place_media(messages: list, obj: dict, where: str) -> list:
    """Split string contents at <image>/<video> tags and put the row's images/videos there, in order."""
    queues = {}
    for kind in ("image", "video"):
        items = obj.get(kind + "s", [])
        if not isinstance(items, list):
            raise DataError(f"{where}: '{kind}s' must be a list")
        for i, item in enumerate(items):
            frames = kind == "video" and isinstance(item, list)
            if not (isinstance(item, str) and item) and not (frames and item and all(isinstance(f, str) for f in item)):
                what = "a path or a list of frame paths" if kind == "video" else "a path"
                raise DataError(f"{where}: {kind}s[{i}] must be {what}, got {item!r}")
        queues[kind] = list(items)
    counts = {kind: 0 for kind in queues}
    out = []
    for m in messages:
        content = m.get("content")
        if not isinstance(content, str):
            out.append(m)
            continue
        parts = []
        for j, piece in enumerate(TAG.split(content)):
            if j % 2 == 0:
                if piece:
                    parts.append({"type": "text", "text": piece})
                continue
            counts[piece] += 1
            if not queues[piece]:
                continue  # counted; reported below with the totals
            parts.append({"type": piece, piece: queues[piece].pop(0)})
        if parts and any(p["type"] != "text" for p in parts):
            out.append({**m, "content": parts})
        else:
            out.append(m)
    for kind in ("image", "video"):
        given = len(obj.get(kind + "s", []))
        if counts[kind] != given:
            raise DataError(f"{where}: {counts[kind]} <{kind}> tag(s) in the messages but {given} "
                            f"entr{'y' if given == 1 else 'ies'} in '{kind}s'")
    return out


def _with_paths(m: dict, base: Path, options: dict) -> dict:
    """Media items with relative paths made absolute and the run's pixel limits as defaults."""
    if not isinstance(m, dict) or not isinstance(m.get("content"), list):
        return m
    content = []
    for item in m["content"]:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind in ("image", "video"):
            item = dict(item)
            for key in (kind, *SOURCE_KEYS):
                if item.get(key) is not None:
                    item[key] = _resolve(item[key], base)
            item = {**options, **item}
        content.append(item)
    return {**m, "content": content}


URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # a URL or data: URI, found from anywhere


def is_relative_path(source: str) -> bool:
    """True for a picture path that a data file gives relative to its own folder (not a URL, a data: URI or
    an absolute path); `qwen2vl.demo.mix` rewrites these when it moves lines to another folder."""
    return not URI.match(source) and not Path(source).expanduser().is_absolute()


def _resolve(source, base: Path):
    if isinstance(source, list):
        return [_resolve(s, base) for s in source]
    if not isinstance(source, str) or URI.match(source):
        return source  # URLs and data: URIs as they are
    path = Path(source).expanduser()
    return str(path if path.is_absolute() else base / path)


def _check_exists(source, kind: str, where: str) -> None:
    for s in source if isinstance(source, list) else [source]:
        if isinstance(s, str) and not URI.match(s) and not Path(s).is_file():
            raise DataError(f"{where}: {kind} file not found: {s}")


def _check_turns(messages: list, where: str) -> None:
    """At least one assistant answer to learn from; answers are text (the model writes no pictures)."""
    answers = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        content = m.get("content")
        if isinstance(content, list):
            if any(item.get("type", "text") != "text" for item in content):
                raise DataError(f"{where}: message {i} (assistant) holds an image or video; answers must be text")
            content = "".join(item["text"] for item in content)
        if not isinstance(content, str) or not content:
            raise DataError(f"{where}: message {i} (assistant) has no text")
        answers += 1
    if not answers:
        raise DataError(f"{where}: no assistant message to learn from")
