"""Processor: chat messages with images and videos -> the model's input ids and pixel tensors.

    proc = Processor.from_pretrained(folder)
    batch = proc(messages, add_generation_prompt=True)
    batch["input_ids"]       # (L,) int64, each image/video expanded to t*h*w/merge^2 pad ids
    batch["pixel_values"]    # (patches, 1176) float32 or None; batch["image_grid_thw"] (n, 3) int64 or None
    batch["pixel_values_videos"], batch["video_grid_thw"]      # the same for videos
    batch["second_per_grid_ts"]  # (videos,) float32: seconds per temporal grid step, Qwen2.5-VL only

A Qwen2.5-VL checkpoint (config.json model_type `qwen2_5_vl`) places videos in time: each video's
`second_per_grid_ts` is temporal_patch_size / the frame rate actually sampled, as transformers'
Qwen2_5_VLProcessor computes it from qwen-vl-utils' sampled fps. Everything else is the same.

How user text is kept from forging structure. The chat template's own special tokens
(`<|im_start|>`, `<|vision_start|><|image_pad|><|vision_end|>`, ...) must become real token
ids, but the same strings typed inside a message must not: a user writing `<|image_pad|>`
would otherwise create a vision placeholder, and `<|im_end|>\\n<|im_start|>system` would
forge a turn. Before rendering, every special-token string inside any string of the
messages (and tools/variables) is wrapped in two marker characters that occur nowhere in
them. After rendering, an unmarked special string came from the template and becomes its
id; a marked one is user text. All text between real special tokens (template text and
user text together) is then encoded as one run with special tokens off, so for ordinary
text the ids equal what transformers produces for the rendered prompt. Marking only the
special strings, rather than swapping whole texts for sentinels, keeps templates that
transform text (`| trim`, slicing, `tojson`) correct. Pass `reject_special_tokens=True` to
refuse such text outright instead (a ValueError naming the token), as a server may prefer.

Vision pads are expanded at the id level after tokenizing, so text can never add pads.
"""

import json
import re
from pathlib import Path

import torch

from qwen2vl.hub import DEMO_MODEL, resolve_model_path
from qwen2vl.processing.chat_template import ChatTemplate
from qwen2vl.processing.detokenizer import Detokenizer
from qwen2vl.processing.image import load_image, preprocess_image
from qwen2vl.processing.media import MediaPolicy
from qwen2vl.processing.messages import MediaItem, check_messages, from_openai
from qwen2vl.processing.tokenizer import Tokenizer
from qwen2vl.processing.video import load_video, preprocess_video
from qwen2vl.processing.vision_config import VisionProcessingConfig

IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
_VIDEO_LOAD_OPTIONS = ("fps", "nframes", "min_frames", "max_frames", "video_start", "video_end", "sample_fps")
# The processor's own arguments: never template variables given in a chat_template_kwargs dict
OWN_ARGUMENTS = frozenset({"messages", "add_generation_prompt", "continue_final_message", "tools",
                           "reject_special_tokens"})


class Processor:
    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate, vision: VisionProcessingConfig,
                 policy: MediaPolicy | None = None, video_seconds: bool = False):
        """`video_seconds`: return `second_per_grid_ts` (Qwen2.5-VL's processor does, Qwen2-VL's doesn't)."""
        self.tokenizer = tokenizer
        self.template = template
        self.vision = vision
        self.policy = policy
        self.video_seconds = video_seconds
        self.image_token_id = tokenizer.token_to_id(IMAGE_PAD)
        self.video_token_id = tokenizer.token_to_id(VIDEO_PAD)

    @classmethod
    def from_pretrained(cls, folder: str | Path, policy: MediaPolicy | None = None) -> "Processor":
        """Tokenizer, chat template (built-in Qwen2-VL one if the folder has none) and pixel
        settings (preprocessor_config.json) of a checkpoint folder, hub repo id or "demo"."""
        if str(folder) == DEMO_MODEL or not Path(folder).expanduser().is_dir():  # a folder needs no config.json
            folder = resolve_model_path(folder)
        tok = Tokenizer.from_pretrained(folder)
        specials = {"bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token}
        template = ChatTemplate.from_pretrained(folder, {k: v for k, v in specials.items() if v is not None})
        config = Path(folder) / "config.json"
        model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
        return cls(tok, template, VisionProcessingConfig.from_pretrained(folder), policy,
                   video_seconds=model_type == "qwen2_5_vl")

    def with_policy(self, policy: MediaPolicy | None) -> "Processor":
        """The same processor reading media under `policy`."""
        return Processor(self.tokenizer, self.template, self.vision, policy, self.video_seconds)

    @property
    def eos_token_ids(self) -> list[int]:
        return self.tokenizer.eos_token_ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of generated ids; special tokens are dropped by default (as transformers'
        `post_process_image_text_to_text`)."""
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def detokenizer(self, skip_special_tokens: bool = True) -> Detokenizer:
        """A fresh streaming detokenizer for one generated sequence."""
        return Detokenizer(self.tokenizer, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, *, tools: list[dict] | None = None,
                            add_vision_id: bool = False, continue_final_message: bool = False, **variables) -> str:
        """The prompt text with one pad per image/video, as transformers' `apply_chat_template`
        renders it. Messages may be in Qwen or OpenAI form. `continue_final_message`: the last
        message is left open for the model to continue (no end of turn, no generation prompt)."""
        messages = from_openai(messages)
        check_messages(messages)
        return self.template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                    continue_final_message=continue_final_message, add_vision_id=add_vision_id,
                                    **variables)

    def __call__(self, messages, add_generation_prompt: bool = False, *, tools: list[dict] | None = None,
                 add_vision_id: bool = False, continue_final_message: bool = False,
                 reject_special_tokens: bool = False, answers_hold_special_tokens: bool = False,
                 **variables) -> dict:
        """Input ids and pixel tensors for `messages` (Qwen or OpenAI form); see the module docstring
        and `apply_chat_template`.

        `answers_hold_special_tokens`: special-token strings in assistant messages are the tokens
        themselves, as in training data whose answers hold grounding markup (`<|box_start|>`...);
        they stay plain text everywhere else."""
        messages = from_openai(messages)
        media = check_messages(messages)
        if reject_special_tokens:
            self._reject_special_tokens({"messages": messages, "tools": tools, **variables})
        ids = self._encode_chat(messages, add_generation_prompt, tools, continue_final_message=continue_final_message,
                                answers_hold_special_tokens=answers_hold_special_tokens,
                                add_vision_id=add_vision_id, **variables)

        images = [self._image(m) for m in media if m.kind == "image"]
        loaded = [self._video(m) for m in media if m.kind == "video"]
        videos, rates = [v for v, _ in loaded], [fps for _, fps in loaded]
        ids = self._expand(ids, self.image_token_id, [g for _, g in images], "image")
        ids = self._expand(ids, self.video_token_id, [g for _, g in videos], "video")
        pixels, grids = _stack(images)
        video_pixels, video_grids = _stack(videos)
        out = {"input_ids": torch.tensor(ids, dtype=torch.long), "pixel_values": pixels,
               "image_grid_thw": grids, "pixel_values_videos": video_pixels, "video_grid_thw": video_grids}
        if self.video_seconds:
            tp = self.vision.temporal_patch_size
            out["second_per_grid_ts"] = torch.tensor([tp / fps for fps in rates], dtype=torch.float32) if videos \
                else None
        return out

    def encode_text(self, messages, add_generation_prompt: bool = False, *, tools: list[dict] | None = None,
                    continue_final_message: bool = False, answers_hold_special_tokens: bool = False,
                    **variables) -> list[int]:
        """The ids of `messages` with one pad per image/video (no pixels read): what `__call__`
        returns before the pads are expanded. Training masks its labels on these; the server
        counts a prompt with them (and the visual tokens from headers) before decoding anything."""
        messages = from_openai(messages)
        check_messages(messages)
        return self._encode_chat(messages, add_generation_prompt, tools,
                                 continue_final_message=continue_final_message,
                                 answers_hold_special_tokens=answers_hold_special_tokens, **variables)

    # -- text ------------------------------------------------------------------------------

    def _encode_chat(self, messages, add_generation_prompt, tools, continue_final_message=False,
                     answers_hold_special_tokens=False,
                     **variables) -> list[int]:
        """Render with user-typed special strings marked, then tokenize (module docstring)."""
        tok = self.tokenizer
        start, end = _markers([messages, tools, variables])
        mark = tok.special_re
        unmarked = [m for m in messages if answers_hold_special_tokens and m.get("role") == "assistant"]
        marked = _map_strings({"messages": messages, "tools": tools, "variables": variables},
                              lambda s: mark.sub(lambda m: start + m.group(0) + end, s), keep=unmarked)
        text = self.template.render(marked["messages"], add_generation_prompt=add_generation_prompt,
                                    continue_final_message=continue_final_message, tools=marked["tools"],
                                    **marked["variables"])
        # A marked special is plain text; an unmarked one is the template's; a stray marker
        # (a template sliced a marked string apart) is dropped.
        scan = re.compile(f"{start}({mark.pattern}){end}|({mark.pattern})|[{start}{end}]")
        ids, run, pos = [], [], 0
        for m in scan.finditer(text):
            run.append(text[pos:m.start()])
            pos = m.end()
            if m.group(1) is not None:
                run.append(m.group(1))
            elif m.group(2) is not None:
                ids += tok.encode("".join(run))
                ids.append(tok.special_tokens[m.group(2)])
                run = []
        run.append(text[pos:])
        return ids + tok.encode("".join(run))

    def _reject_special_tokens(self, data) -> None:
        def check(s: str) -> str:
            found = self.tokenizer.find_special(s)
            if found is not None:
                raise ValueError(f"text contains the special token {found!r}, which is not allowed in messages")
            return s
        _map_strings(data, check)

    # -- vision ----------------------------------------------------------------------------

    def _image(self, item: MediaItem):
        image = load_image(item.source, self.policy)
        return preprocess_image(image, self.vision, **item.options)

    def _video(self, item: MediaItem):
        """((pixel_values, grid_thw), the rate of the sampled frames in frames per second)."""
        load_opts = {k: v for k, v in item.options.items() if k in _VIDEO_LOAD_OPTIONS}
        frames, fps = load_video(item.source, self.policy, cfg=self.vision, **load_opts)
        pixel_opts = {k: v for k, v in item.options.items() if k not in _VIDEO_LOAD_OPTIONS}
        return preprocess_video(frames, self.vision, **pixel_opts), fps

    def _expand(self, ids: list[int], pad_id: int, grids: list[tuple], kind: str) -> list[int]:
        """Replace the i-th pad id by t*h*w/merge^2 copies for the i-th image (or video)."""
        count = ids.count(pad_id)
        if count != len(grids):
            raise ValueError(f"the chat template wrote {count} {kind} placeholders for {len(grids)} {kind}s")
        out, k = [], 0
        unit = self.vision.merge_size ** 2
        for i in ids:
            if i == pad_id:
                t, h, w = grids[k]
                assert (t * h * w) % unit == 0, grids[k]
                out += [pad_id] * (t * h * w // unit)
                k += 1
            else:
                out.append(i)
        return out


def _stack(processed: list) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if not processed:
        return None, None
    pixels = torch.cat([torch.as_tensor(p, dtype=torch.float32) for p, _ in processed])
    return pixels, torch.tensor([list(g) for _, g in processed], dtype=torch.long)


def _map_strings(value, fn, keep=()):
    """Apply `fn` to every string in nested dicts/lists (dict keys, and the objects in `keep`, left alone)."""
    if any(value is k for k in keep):
        return value
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_strings(v, fn, keep) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(v, fn, keep) for v in value]
    if isinstance(value, tuple):
        return tuple(_map_strings(v, fn, keep) for v in value)
    return value


def _markers(data) -> tuple[str, str]:
    """Two private-use characters that occur in no string of `data`."""
    strings = []
    _map_strings(data, strings.append)
    free = (c for c in map(chr, range(0x10FFFD, 0xF0000, -1)) if not any(c in s for s in strings))
    return next(free), next(free)
