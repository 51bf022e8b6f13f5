"""Chat messages: checking the Qwen/Hugging Face form, and converting the OpenAI form to it.

The Qwen form (what the chat template and the processor read):

    {"role": "user", "content": [
        {"type": "image", "image": "photo.jpg", "max_pixels": 512 * 28 * 28},
        {"type": "video", "video": "clip.mp4", "fps": 1.0},
        {"type": "text", "text": "What happens?"}]}

`content` may also be a plain string. An image/video item names its source under its own
key (`image`/`video`; Hugging Face's `url`/`path` are accepted too) and may carry per-item
pixel/frame options, passed on to the image/video preprocessing.

The one place messages are checked: the processor (Python API) and the server (which adds its
own policy: limits, URL schemes, special tokens) both call `check_messages`. Errors are
`MessageError`s naming the place as a JSON path, `messages[1].content[0].type`, which the
server returns as the 400's `param`.
"""

import math
from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant", "tool")  # OpenAI's "developer" is read as "system"
IMAGE_OPTIONS = {"min_pixels": int, "max_pixels": int, "resized_height": int, "resized_width": int}
VIDEO_OPTIONS = {**IMAGE_OPTIONS, "total_pixels": int, "nframes": int, "min_frames": int, "max_frames": int,
                 "fps": float, "video_start": float, "video_end": float, "sample_fps": float}
SOURCE_KEYS = ("url", "path")  # Hugging Face's spellings of the source, besides "image"/"video"


class MessageError(ValueError):
    """A malformed message; `param` is where, as a JSON path (messages[1].content[0].type)."""

    def __init__(self, param: str, problem: str):
        super().__init__(f"{param}: {problem}")
        self.param = param


@dataclass(frozen=True)
class MediaItem:
    kind: str  # "image" or "video"
    source: object  # path, URL, data URI, bytes, PIL image, ... (see processing/media.py)
    options: dict = field(default_factory=dict)
    message: int = -1  # where it is: messages[message].content[part]
    part: int = -1

    @property
    def where(self) -> str:
        return f"messages[{self.message}].content[{self.part}]"


def check_messages(messages) -> list[MediaItem]:
    """Validate Qwen-form `messages`; return their images and videos in prompt order.

    Raises MessageError naming the message and item for a wrong role, a missing or wrongly typed
    field, an unknown content type or an unknown option.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise MessageError("messages", "must be a non-empty list of {'role', 'content'} dicts")
    media = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise MessageError(where, f"expected a dict with 'role' and 'content', got {type(msg).__name__}")
        if msg.get("role") not in ROLES:
            raise MessageError(f"{where}.role", f"must be one of {list(ROLES)} (or developer), "
                                                f"got {msg.get('role')!r}")
        content = msg.get("content")
        if content is None:
            if msg["role"] == "assistant" and msg.get("tool_calls"):
                continue  # an assistant turn that only calls tools
            raise MessageError(f"{where}.content", "missing")
        if isinstance(content, str):
            continue
        if not isinstance(content, (list, tuple)):
            raise MessageError(f"{where}.content", f"must be a string or a list of items, got "
                                                   f"{type(content).__name__}")
        for j, item in enumerate(content):
            found = _check_item(item, f"{where}.content[{j}]")
            if found is not None:
                media.append(MediaItem(found.kind, found.source, found.options, i, j))
    return media


def _check_item(item, where: str) -> MediaItem | None:
    if not isinstance(item, dict):
        raise MessageError(where, f"expected a dict like {{'type': 'text', 'text': ...}}, got {type(item).__name__}")
    kind = item.get("type") or next((k for k in ("image", "video", "text") if k in item), None)
    if kind == "text":
        if not isinstance(item.get("text"), str):
            raise MessageError(f"{where}.text", "a text item needs a string 'text'")
        _reject_unknown(item, {"type", "text"}, where)
        return None
    if kind not in ("image", "video"):
        raise MessageError(f"{where}.type", f"unsupported content type {kind!r}; supported: text, image, video "
                                            "(image_url, video_url in the OpenAI form, see from_openai)")
    sources = [k for k in (kind, *SOURCE_KEYS) if item.get(k) is not None]
    if len(sources) != 1:
        raise MessageError(where, f"an {kind} item needs exactly one source under '{kind}' (or 'url'/'path'), "
                                  f"got {sources or 'none'}")
    allowed = IMAGE_OPTIONS if kind == "image" else VIDEO_OPTIONS
    _reject_unknown(item, {"type", kind, *SOURCE_KEYS, *allowed}, where)
    options = check_options({k: v for k, v in item.items() if k in allowed}, allowed, where)
    if options.get("video_end") is not None and options["video_end"] <= options.get("video_start", 0.0):
        raise MessageError(f"{where}.video_end", "must be after video_start")
    return MediaItem(kind, item[sources[0]], options)


def check_options(options, allowed: dict[str, type], where: str) -> dict:
    """Pixel/frame options (`allowed`: name -> int or float) -> the given ones, typed; None values
    are left out. Every value is a finite positive number (video_start may be 0), an integer
    where the option counts something."""
    if not isinstance(options, dict):
        raise MessageError(where, "must be an object")
    _reject_unknown(options, set(allowed), where, what="option(s)")
    out = {}
    for name, value in options.items():
        if value is None:
            continue
        typ = allowed[name]
        bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
        if bad or (typ is int and value != int(value)):
            raise MessageError(f"{where}.{name}", f"must be {'an integer' if typ is int else 'a number'}, "
                                                  f"got {value!r}")
        if value < 0 or (value == 0 and name != "video_start"):
            raise MessageError(f"{where}.{name}", f"must be a positive number, got {value!r}")
        out[name] = typ(value)
    return out


def _reject_unknown(item: dict, allowed: set, where: str, what: str = "field(s)") -> None:
    unknown = sorted(set(item) - allowed)
    if unknown:
        raise MessageError(where, f"unknown {what} {unknown}; allowed: {sorted(allowed)}")


def from_openai(messages) -> list[dict]:
    """Convert OpenAI chat messages to the Qwen form; parts already in Qwen form pass through.

    `{"type": "image_url", "image_url": {"url": U}}` (or `"image_url": U`) becomes
    `{"type": "image", "image": U}`; `video_url` likewise becomes a video item. OpenAI's
    `detail` is dropped; Qwen options (`max_pixels`, `fps`, ...) on the part or inside the
    `image_url`/`video_url` object are kept. The `developer` role becomes `system`. Messages and
    parts keep their places, so an error's JSON path names the OpenAI input too.
    """
    if not isinstance(messages, (list, tuple)):
        raise MessageError("messages", "must be a list of dicts")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise MessageError(f"messages[{i}]", f"expected a dict, got {type(msg).__name__}")
        msg = dict(msg)
        if msg.get("role") == "developer":
            msg["role"] = "system"
        if isinstance(msg.get("content"), (list, tuple)):
            msg["content"] = [_part_from_openai(p, f"messages[{i}].content[{j}]") for j, p in enumerate(msg["content"])]
        out.append(msg)
    return out


def _part_from_openai(part, where: str):
    if not isinstance(part, dict) or part.get("type") not in ("image_url", "video_url"):
        return part
    kind = "image" if part["type"] == "image_url" else "video"
    ref = part.get(part["type"])
    options = {k: v for k, v in part.items() if k not in ("type", part["type"])}
    if isinstance(ref, dict):
        options.update({k: v for k, v in ref.items() if k != "url"})
        ref = ref.get("url")
    if not isinstance(ref, str) or not ref:
        raise MessageError(f"{where}.{part['type']}.url", "a non-empty URL string is required")
    options.pop("detail", None)
    return {"type": kind, kind: ref, **options}
