"""Long chats: drop the oldest turns, with their images and videos, until the prompt fits.

Opt-in with `"truncation": "auto"` (the Responses API's name; chat completions takes it too).
Without it, a prompt that does not fit is a 400 naming the sizes and this option.

A prompt fits when it leaves room for max_tokens (or for one generated token when max_tokens is
not set): the rule ChatService._check_length applies. A turn is a user message and what follows
it up to the next user message (the answer, an assistant's tool calls and their results), so a
tool call is never kept without its results. Never dropped: system messages (the Responses API's
instructions) and the last turn (the last user message and what follows it).

    [system, u1 +img, a1, u2, a2(tool_calls), tool, a2', u3]   budget 300 tokens
    turns: [u1 a1] [u2 a2 tool a2'] | [u3] kept     -> drop [u1 a1]: 2 messages, 1 image

Counting reads no pixels: the text is rendered and tokenized with one pad per image/video
(Processor.encode_text) and each item adds the tokens its header gave (tokens.py). The number of
turns to drop is found by bisection, so a long chat is tokenized O(log turns) times. What is kept
is then processed as any request is, so positions (M-RoPE) are those of the kept prompt.
"""

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

from qwen2vl.server.errors import bad_request
from qwen2vl.server.inputs import ChatInputs
from qwen2vl.server.tokens import MediaCost

OPTION = '"truncation": "auto"'
HINT = f"; or send {OPTION} to drop the oldest turns (and their images) until it fits"


@dataclass
class Truncation:
    dropped_messages: int
    dropped_images: int
    dropped_videos: int
    prompt_tokens_before: int
    prompt_tokens_after: int

    def to_dict(self) -> dict:
        return asdict(self)


def turns(messages: list[dict]) -> list[list[int]]:
    """Message indices grouped in turns, oldest first, system messages left out. A conversation
    that does not start with a user message has its leading messages as a turn of their own."""
    out: list[list[int]] = []
    for i, m in enumerate(messages):
        if m.get("role") == "system":
            continue
        if m.get("role") == "user" or not out:
            out.append([])
        out[-1].append(i)
    return out


def keep(inputs: ChatInputs, costs: list[MediaCost], dropped: set[int]) -> tuple[ChatInputs, list[MediaCost]]:
    """The inputs without the messages in `dropped` (and their media, re-indexed)."""
    index = {}
    for i in range(len(inputs.messages)):
        if i not in dropped:
            index[i] = len(index)
    media, kept_costs = [], []
    for ref, cost in zip(inputs.media, costs):
        if ref.message in index:
            media.append(replace(ref, message=index[ref.message]))
            kept_costs.append(cost)
    return ChatInputs([inputs.messages[i] for i in index], media), kept_costs


def fit(inputs: ChatInputs, costs: list[MediaCost], count: Callable[[ChatInputs, list[MediaCost]], int], limit: int,
        max_tokens: int | None) -> tuple[ChatInputs, list[MediaCost], Truncation]:
    """(kept inputs, their costs, Truncation) with the fewest oldest turns dropped so that the prompt
    plus max_tokens fits `limit`; `count(inputs, costs)` gives a prompt's tokens. A 400 naming the
    sizes when even the system messages and the last turn don't fit."""
    budget = limit - (max_tokens or 1)
    before = count(inputs, costs)
    droppable = turns(inputs.messages)[:-1]

    def after(k: int):
        dropped = {i for turn in droppable[:k] for i in turn}
        kept, kept_costs = keep(inputs, costs, dropped)
        return kept, kept_costs, (before if k == 0 else count(kept, kept_costs)), dropped

    lo, hi = 0, len(droppable)  # once k=0 fails: dropping lo turns does not fit, dropping hi does
    best = after(0)
    if best[2] > budget:
        last = after(hi)
        if last[2] > budget:
            raise _too_long(before, last[2], last[1], limit, max_tokens, hi)
        best = last
        while hi - lo > 1:
            mid = (lo + hi) // 2
            trial = after(mid)
            if trial[2] <= budget:
                hi, best = mid, trial
            else:
                lo = mid
    kept, kept_costs, tokens, dropped = best
    gone = [r.kind for r in inputs.media if r.message in dropped]
    return kept, kept_costs, Truncation(len(dropped), gone.count("image"), gone.count("video"), before, tokens)


def _too_long(before: int, least: int, kept_costs: list[MediaCost], limit: int, max_tokens: int | None,
              older: int):
    """Worded without "messages", which the Responses API renames to "input"."""
    visual = sum(c.tokens for c in kept_costs)
    room = f"max_tokens={max_tokens}" if max_tokens else "one generated token"
    return bad_request(
        f"the prompt is {before} tokens and the context is {limit}; {OPTION} can drop the {older} older turn(s), "
        f"but the system message(s) and the last turn alone are {least} tokens ({visual} of them "
        f"for images/videos), over by {least + (max_tokens or 1) - limit} leaving room for {room}; shorten the "
        "last message" + (" or lower mm_processor_kwargs.max_pixels" if visual else "")
        + (" or lower max_tokens" if max_tokens else ""), "messages")
