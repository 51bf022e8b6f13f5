"""A chat request's messages -> checked Qwen-form messages with media fetched, within the limits.

The order is the point: everything cheap is checked before anything expensive.
1. shape, as the processor checks it (processing/messages.py: roles, content, parts, option
   values), then the server's policy: OpenAI parts only (text / image_url / video_url), special
   tokens in text, counts of images and videos, URL schemes, the vision options a client may set
   (clamped to the server's ceilings);
2. fetch: each URL under the media policy (SSRF rules, byte limits, timeouts) into bytes;
3. cost: image/video headers give the exact visual tokens; over the context -> 400 with the
   overflow and a max_pixels that would fit, before any pixel is decoded.
The processor then decodes and tokenizes (chat.py). Errors name the field: messages[1].content[0].
"""

import json
import re
from dataclasses import dataclass, field

from qwen2vl.processing.media import MediaError, MediaPolicy, open_source
from qwen2vl.processing.messages import VIDEO_OPTIONS, MessageError, check_options, from_openai
from qwen2vl.processing.messages import check_messages as check_qwen_messages
from qwen2vl.processing.processor import OWN_ARGUMENTS
from qwen2vl.processing.vision_config import VisionProcessingConfig
from qwen2vl.server.errors import bad_request
from qwen2vl.server.limits import IMAGE_KEYS, VIDEO_KEYS, ServerLimits
from qwen2vl.server.tokens import MediaCost, media_cost

SCHEMES = ("data:", "http://", "https://", "file://")
# A video as a list of frames, in the Qwen form qwen-vl-utils takes: {"type": "video", "video": [url, ...]};
# file-only sampling options do not apply to it.
FRAME_LIST_EXCLUDED = ("nframes", "min_frames", "max_frames", "video_start", "video_end")
# The vision options a client may set (a subset of the processor's: no resized_height/width)
_ALLOWED = {"image": {k: VIDEO_OPTIONS[k] for k in IMAGE_KEYS}, "video": {k: VIDEO_OPTIONS[k] for k in VIDEO_KEYS}}
# A 1-pixel side holds no picture (a tracking pixel, a broken export); the resize would blow it up
# into a blank 56x56 tile. Refused as input almost certainly sent by mistake.
MIN_SIDE = 2


@dataclass
class MediaRef:
    kind: str  # "image" or "video"
    param: str  # messages[i].content[j]
    url: str | list[str]  # a list: the frames of a video
    options: dict
    message: int
    part: int
    data: object = None  # bytes or a checked Path once fetched


@dataclass
class ChatInputs:
    messages: list[dict]  # checked, in the Qwen form (from_openai): image_url parts are image items
    media: list[MediaRef] = field(default_factory=list)


def check_inputs(messages: list[dict], body_options: dict | None, limits: ServerLimits,
                 cfg: VisionProcessingConfig, find_special) -> ChatInputs:
    """Step 1 (no I/O). The messages' shape is checked where the processor checks it
    (processing/messages.py); here the server's policy: message fields, special tokens in text,
    media only from users and the system, the options a client may set, URL schemes, counts.
    `find_special(text)` returns the first special-token string in text."""
    for i, msg in enumerate(messages):
        _check_policy(msg, f"messages[{i}]", find_special)
    try:
        body_options = check_options(body_options or {}, _ALLOWED["video"], "mm_processor_kwargs")
        qwen = from_openai(messages)
        items = check_qwen_messages(qwen)
    except MessageError as e:
        raise bad_request(str(e), e.param) from None
    refs: list[MediaRef] = []
    for item in items:
        role, where = qwen[item.message]["role"], item.where
        if role in ("assistant", "tool"):
            raise bad_request(f"{where}: {item.kind}_url parts are only allowed in user and system messages", where)
        allowed = _ALLOWED[item.kind]  # _check_policy saw to it that the options are among these
        url = item.source
        if isinstance(url, list):  # a video as its frames (_check_policy: a non-empty list of strings)
            for k, frame in enumerate(url):
                _check_scheme(frame, f"{where}.video[{k}]")
        else:
            _check_scheme(url, f"{where}.{item.kind}_url.url")
        inherited = {k: v for k, v in body_options.items() if k in allowed}
        refs.append(MediaRef(item.kind, where, url, {**inherited, **item.options}, item.message, item.part))
    check_counts(refs, limits, "messages")
    for r in refs:
        r.options = limits.clamp(r.kind, r.options, cfg)
    return ChatInputs(qwen, refs)


def check_counts(refs: list[MediaRef], limits: ServerLimits, param: str) -> None:
    """Images and videos per request (`param`: the field that holds them all)."""
    for kind, limit, flag in (("image", limits.max_images, "--max-images-per-request"),
                              ("video", limits.max_videos, "--max-videos-per-request")):
        count = sum(r.kind == kind for r in refs)
        if count > limit:
            raise bad_request(f"{param}: {count} {kind}s in this request, over the limit of {limit} ({flag})", param)


def _check_scheme(url: str, param: str) -> None:
    if not url.startswith(SCHEMES):
        scheme = url.split(":", 1)[0][:20] if ":" in url else "none"
        raise bad_request(f"{param}: unsupported URL scheme {scheme!r}; use http(s)://, data: or file://", param)


def _check_policy(msg, where: str, find_special) -> None:
    """What the server refuses beyond a malformed message: fields it does not know, parts not in the
    OpenAI form, vision options a client may not set, tool calls that are not a list on an
    assistant turn, special-token strings in text. The shape itself is check_messages' job."""
    if not isinstance(msg, dict):
        return
    unknown = sorted(set(msg) - {"role", "content", "name", "tool_calls", "tool_call_id", "refusal"})
    if unknown:
        raise bad_request(f"{where}: unknown field(s) {unknown}", where)
    calls = msg.get("tool_calls")
    if calls is not None and (msg.get("role") != "assistant" or not isinstance(calls, list)):
        raise bad_request(f"{where}.tool_calls: must be a list, on an assistant message", f"{where}.tool_calls")
    content = msg.get("content")
    parts = content if isinstance(content, list) else []
    for j, part in enumerate(parts):
        if not isinstance(part, dict):
            continue
        kind, param = part.get("type"), f"{where}.content[{j}]"
        if kind == "video" and msg.get("role") not in ("assistant", "tool"):
            _check_frame_list(part, param)
            continue
        if kind not in ("text", "image_url", "video_url"):
            raise bad_request(f"{param}.type: unsupported content type {kind!r}; supported: text, image_url, "
                              "video_url, video (a list of frame URLs)", f"{param}.type")
        if kind != "text":
            unknown = sorted(set(part) - {"type", kind})
            if unknown:
                raise bad_request(f"{param}: unknown field(s) {unknown}", param)
            ref = part.get(kind)
            allowed = _ALLOWED["image" if kind == "image_url" else "video"]
            unknown = sorted(set(ref) - {"url", "detail"} - set(allowed)) if isinstance(ref, dict) else []
            if unknown:
                raise bad_request(f"{param}.{kind}: unknown option(s) {unknown}; allowed: {sorted(allowed)}",
                                  f"{param}.{kind}")
    texts = [(f"{where}.content", content)] if isinstance(content, str) else [
        (f"{where}.content[{j}].text", part["text"]) for j, part in enumerate(parts)
        if isinstance(part, dict) and isinstance(part.get("text"), str)]
    for param, text in texts:
        found = find_special(text)
        if found is not None:
            raise bad_request(f"{param}: contains the special token {found!r}, which is not allowed in messages",
                              param)


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


def _check_frame_list(part: dict, param: str) -> None:
    """`{"type": "video", "video": [frame URL, ...], **options}`: one video made of these images."""
    frames = part.get("video")
    if not isinstance(frames, list) or not frames or not all(isinstance(u, str) and u for u in frames):
        raise bad_request(f"{param}.video: a non-empty list of frame URLs is required", f"{param}.video")
    allowed = set(_ALLOWED["video"]) - set(FRAME_LIST_EXCLUDED)
    unknown = sorted(set(part) - {"type", "video"} - allowed)
    if unknown:
        raise bad_request(f"{param}: unknown option(s) {unknown}; allowed: {sorted(allowed)}", param)


def fetch_media(refs: list[MediaRef], policy: MediaPolicy, limits: ServerLimits) -> None:
    """Step 2 (blocking I/O, run in a worker thread): every URL into bytes or a checked Path."""
    for r in refs:
        if isinstance(r.url, list):
            if len(r.url) > policy.max_video_frames:
                raise bad_request(f"{r.param}: the video has {len(r.url)} frames, over the limit of "
                                  f"{policy.max_video_frames}", r.param)
            r.data = [_fetch(url, f"{r.param}.video[{k}]", "image", policy, limits) for k, url in enumerate(r.url)]
        else:
            r.data = _fetch(r.url, r.param, r.kind, policy, limits)


def _fetch(url: str, param: str, kind: str, policy: MediaPolicy, limits: ServerLimits):
    if url.startswith("file://") and not limits.allowed_local_media_path:
        raise bad_request(f"{param}: file:// URLs are disabled on this server (the operator can allow a "
                          "folder with --allowed-local-media-path)", param)
    max_bytes = policy.max_image_bytes if kind == "image" else policy.max_video_bytes
    try:
        data = open_source(url, policy, max_bytes=max_bytes, what=f"{param} ({kind})")
    except MediaError as e:
        raise bad_request(public_message(str(e)), param) from None
    if not data:
        raise bad_request(f"{param}: the {kind} is empty (0 bytes)", param)
    return data


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


def check_context(costs: list[MediaCost], max_model_len: int, hint: str = "") -> None:
    """Visual tokens alone must leave room for text and one generated token; `hint` ends the 400."""
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
        f"mm_processor_kwargs.max_pixels to about {suggestion} or less{hint}", "messages")


def qwen_messages(inputs: ChatInputs) -> list[dict]:
    """The messages with each media item holding its fetched data and clamped options (what the
    processor reads)."""
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
