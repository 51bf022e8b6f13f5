"""A chat request's messages -> checked Qwen-form messages with media fetched, within the limits.

The order is the point: everything cheap is checked before anything expensive.
1. shape: roles, content parts (text / image_url / video_url), special tokens in text, counts of
   images and videos, URL schemes, vision options (clamped to the server's ceilings);
2. fetch: each URL under the media policy (SSRF rules, byte limits, timeouts) into bytes;
3. cost: image/video headers give the exact visual tokens; over the context -> 400 with the
   overflow and a max_pixels that would fit, before any pixel is decoded.
The processor then decodes and tokenizes (chat.py). Errors name the field: messages[1].content[0].
"""

import json
import math
import re
from dataclasses import dataclass, field

from qwen2vl.processing.media import MediaError, MediaPolicy, open_source
from qwen2vl.processing.processor import OWN_ARGUMENTS
from qwen2vl.processing.vision_config import VisionProcessingConfig
from qwen2vl.server.errors import bad_request
from qwen2vl.server.limits import IMAGE_KEYS, VIDEO_KEYS, ServerLimits
from qwen2vl.server.tokens import MediaCost, media_cost

ROLES = ("system", "developer", "user", "assistant", "tool")
PART_KINDS = {"image_url": "image", "video_url": "video"}
SCHEMES = ("data:", "http://", "https://", "file://")
# A 1-pixel side holds no picture (a tracking pixel, a broken export); the resize would blow it up
# into a blank 56x56 tile. Refused as input almost certainly sent by mistake.
MIN_SIDE = 2


@dataclass
class MediaRef:
    kind: str  # "image" or "video"
    param: str  # messages[i].content[j]
    url: str
    options: dict
    message: int
    part: int
    data: object = None  # bytes or a checked Path once fetched


@dataclass
class ChatInputs:
    messages: list[dict]  # OpenAI form, checked
    media: list[MediaRef] = field(default_factory=list)


def check_messages(messages: list[dict], body_options: dict | None, limits: ServerLimits,
                   cfg: VisionProcessingConfig, find_special) -> ChatInputs:
    """Step 1 (no I/O). `find_special(text)` returns the first special-token string in text."""
    body_options = _check_options(body_options or {}, set(VIDEO_KEYS), "mm_processor_kwargs")
    refs: list[MediaRef] = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise bad_request(f"{where}: must be an object with 'role' and 'content'", where)
        role = msg.get("role")
        if role not in ROLES:
            raise bad_request(f"{where}.role: must be one of {list(ROLES)}, got {role!r}", f"{where}.role")
        unknown = sorted(set(msg) - {"role", "content", "name", "tool_calls", "tool_call_id", "refusal"})
        if unknown:
            raise bad_request(f"{where}: unknown field(s) {unknown}", where)
        content = msg.get("content")
        if content is None:
            if role == "assistant" and msg.get("tool_calls"):
                continue
            raise bad_request(f"{where}.content: missing", f"{where}.content")
        if msg.get("tool_calls") is not None and (role != "assistant" or not isinstance(msg["tool_calls"], list)):
            raise bad_request(f"{where}.tool_calls: must be a list, on an assistant message", f"{where}.tool_calls")
        if isinstance(content, str):
            _check_text(content, f"{where}.content", find_special)
            continue
        if not isinstance(content, list):
            raise bad_request(f"{where}.content: must be a string or a list of content parts", f"{where}.content")
        for j, part in enumerate(content):
            ref = _check_part(part, f"{where}.content[{j}]", role, body_options, find_special)
            if ref is not None:
                ref.message, ref.part = i, j
                refs.append(ref)
    for kind, limit, flag in (("image", limits.max_images, "--max-images-per-request"),
                              ("video", limits.max_videos, "--max-videos-per-request")):
        count = sum(r.kind == kind for r in refs)
        if count > limit:
            raise bad_request(f"messages: {count} {kind}s in this request, over the limit of {limit} ({flag})",
                              "messages")
    for r in refs:
        r.options = limits.clamp(r.kind, r.options, cfg)
    return ChatInputs(messages, refs)


def template_options(add_generation_prompt, continue_final_message, chat_template_kwargs, find_special) -> dict:
    """A request's chat template options (vLLM's names) -> the processor's keyword arguments.
    The two prompt options exclude each other; add_generation_prompt defaults to the opposite of
    continue_final_message. chat_template_kwargs become template variables, never the processor's
    own arguments (reject_special_tokens!), and hold no special-token strings."""
    for name, value in (("add_generation_prompt", add_generation_prompt),
                        ("continue_final_message", continue_final_message)):
        if value is not None and not isinstance(value, bool):
            raise bad_request(f"{name}: must be true or false, got {value!r}", name)
    if continue_final_message and add_generation_prompt:
        raise bad_request("continue_final_message and add_generation_prompt can't both be true: one continues the "
                          "last message, the other starts a new assistant turn (set add_generation_prompt=false)",
                          "continue_final_message")
    variables = {} if chat_template_kwargs is None else chat_template_kwargs
    if not isinstance(variables, dict):
        raise bad_request("chat_template_kwargs: must be an object of template variables", "chat_template_kwargs")
    for key in variables:
        where = f"chat_template_kwargs.{key}"
        if not key.isidentifier() or key in OWN_ARGUMENTS:
            raise bad_request(f"{where}: not a template variable this server passes on (names are identifiers, "
                              f"not {sorted(OWN_ARGUMENTS)}; set those at the top level)", where)
    found = find_special(json.dumps(variables, ensure_ascii=False))
    if found is not None:
        raise bad_request(f"chat_template_kwargs: contains the special token {found!r}, which is not allowed",
                          "chat_template_kwargs")
    return {"add_generation_prompt": not continue_final_message if add_generation_prompt is None
            else add_generation_prompt, "continue_final_message": bool(continue_final_message), **variables}


def _check_text(text, where: str, find_special) -> None:
    if not isinstance(text, str):
        raise bad_request(f"{where}: must be a string", where)
    found = find_special(text)
    if found is not None:
        raise bad_request(f"{where}: contains the special token {found!r}, which is not allowed in messages", where)


def _check_part(part, where: str, role: str, body_options: dict, find_special) -> MediaRef | None:
    if not isinstance(part, dict):
        raise bad_request(f"{where}: must be an object like {{'type': 'text', 'text': ...}}", where)
    kind = part.get("type")
    if kind == "text":
        _check_text(part.get("text"), f"{where}.text", find_special)
        return None
    if kind not in PART_KINDS:
        raise bad_request(f"{where}.type: unsupported content type {kind!r}; supported: text, image_url, video_url",
                          f"{where}.type")
    if role in ("assistant", "tool"):
        raise bad_request(f"{where}: {kind} parts are only allowed in user and system messages", where)
    unknown = sorted(set(part) - {"type", kind})
    if unknown:
        raise bad_request(f"{where}: unknown field(s) {unknown}", where)
    ref = part.get(kind)
    ref = {"url": ref} if isinstance(ref, str) else ref
    if not isinstance(ref, dict) or not isinstance(ref.get("url"), str) or not ref["url"]:
        raise bad_request(f"{where}.{kind}.url: a non-empty URL string is required", f"{where}.{kind}.url")
    url = ref["url"]
    if not url.startswith(SCHEMES):
        scheme = url.split(":", 1)[0][:20] if ":" in url else "none"
        raise bad_request(f"{where}.{kind}.url: unsupported URL scheme {scheme!r}; use http(s)://, data: or file://",
                          f"{where}.{kind}.url")
    media = PART_KINDS[kind]
    keys = set(IMAGE_KEYS if media == "image" else VIDEO_KEYS)
    item = _check_options({k: v for k, v in ref.items() if k not in ("url", "detail")}, keys, f"{where}.{kind}")
    inherited = {k: v for k, v in body_options.items() if k in keys}
    return MediaRef(media, where, url, {**inherited, **item}, -1, -1)


def _check_options(options, allowed: set, where: str) -> dict:
    if not isinstance(options, dict):
        raise bad_request(f"{where}: must be an object", where)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise bad_request(f"{where}: unknown option(s) {unknown}; allowed: {sorted(allowed)}", where)
    out = {}
    for k, v in options.items():
        if v is None:
            continue
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not ok or v < 0 or (v == 0 and k != "video_start"):
            raise bad_request(f"{where}.{k}: must be a positive number, got {v!r}", f"{where}.{k}")
        integer = k not in ("fps", "video_start", "video_end")
        if integer and v != int(v):
            raise bad_request(f"{where}.{k}: must be an integer, got {v!r}", f"{where}.{k}")
        out[k] = int(v) if integer else float(v)
    return out


def fetch_media(refs: list[MediaRef], policy: MediaPolicy, limits: ServerLimits) -> None:
    """Step 2 (blocking I/O, run in a worker thread): every URL into bytes or a checked Path."""
    for r in refs:
        if r.url.startswith("file://") and not limits.allowed_local_media_path:
            raise bad_request(f"{r.param}: file:// URLs are disabled on this server (the operator can allow a "
                              "folder with --allowed-local-media-path)", r.param)
        max_bytes = policy.max_image_bytes if r.kind == "image" else policy.max_video_bytes
        try:
            r.data = open_source(r.url, policy, max_bytes=max_bytes, what=f"{r.param} ({r.kind})")
        except MediaError as e:
            raise bad_request(public_message(str(e)), r.param) from None
        if not r.data:
            raise bad_request(f"{r.param}: the {r.kind} is empty (0 bytes)", r.param)


def media_costs(refs: list[MediaRef], cfg: VisionProcessingConfig, limits: ServerLimits) -> list[MediaCost]:
    """Step 3 (reads headers only): sizes checked, tokens counted."""
    costs = []
    for r in refs:
        try:
            cost = media_cost(r.kind, r.data, r.options, cfg, r.param)
        except (MediaError, ValueError) as e:
            raise bad_request(public_message(str(e)), r.param) from None
        pixels = cost.width * cost.height
        if pixels > limits.max_image_pixels:
            raise bad_request(f"{r.param}: the {r.kind} is {cost.width}x{cost.height} = {pixels:,} pixels, over the "
                              f"limit of {limits.max_image_pixels:,} (--max-image-pixels)", r.param)
        if cost.seconds is not None and cost.seconds > limits.max_video_seconds:
            raise bad_request(f"{r.param}: the video is {cost.seconds:.1f} s long, over the limit of "
                              f"{limits.max_video_seconds:g} s (--max-video-seconds)", r.param)
        if min(cost.width, cost.height) < MIN_SIDE:
            raise bad_request(f"{r.param}: the {r.kind} is {cost.width}x{cost.height} pixels; each side must be at "
                              f"least {MIN_SIDE} pixels", r.param)
        costs.append(cost)
    return costs


def check_context(costs: list[MediaCost], max_model_len: int) -> None:
    """Visual tokens alone must leave room for text and one generated token."""
    visual = sum(c.tokens for c in costs)
    budget = max_model_len - 64  # room for the chat template, a question and a short answer
    if visual <= budget:
        return
    # shrinking every image by a factor s in area shrinks its tokens by about s
    biggest = max(costs, key=lambda c: c.resized_width * c.resized_height)
    scale = budget / visual
    suggestion = max(28 * 28, int(biggest.resized_width * biggest.resized_height * scale) // 784 * 784)
    raise bad_request(
        f"the images/videos need {visual} tokens but the context is {max_model_len} tokens "
        f"(over by {visual - budget}, keeping 64 for text); send smaller media or lower "
        f"mm_processor_kwargs.max_pixels to about {suggestion} or less", "messages")


def qwen_messages(inputs: ChatInputs) -> list[dict]:
    """The OpenAI messages with each media part replaced by the Qwen form holding its fetched data
    and clamped options (what the processor reads)."""
    out = [dict(m) for m in inputs.messages]
    for m in out:
        if isinstance(m.get("content"), list):
            m["content"] = list(m["content"])
    for r in inputs.media:
        out[r.message]["content"][r.part] = {"type": r.kind, r.kind: r.data, **r.options}
    return out


_ADDRESS = re.compile(r"(address(?:es)?) [0-9a-fA-F.:%]+")
_ROOTS = re.compile(r"\(MediaPolicy\.local_roots=\[.*?\]\)")


def public_message(message: str) -> str:
    """A media error as the client may see it: no resolved IP addresses (what an internal name
    resolves to would help map a network the client may not reach) and no server folders."""
    message = _ADDRESS.sub(r"\1 (not shown)", message)
    message = _ROOTS.sub("(--allowed-local-media-path)", message)
    return message.replace("MediaPolicy.allow_private=False", "the operator can allow them with --allow-private-media")
