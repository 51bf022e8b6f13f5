"""Request.update: a step's text and stop-string search cost what its new tokens add, never the
length of the output."""

from __future__ import annotations

import torch

from qwen2vl.engine.prompt import Prompt
from qwen2vl.engine.request import Request
from qwen2vl.engine.sampling_params import SamplingParams
from qwen2vl.engine.sequence import Sequence, Status
from qwen2vl.processing.tokenizer import Tokenizer
from tests.helpers.qwen_tokenizer import qwen_tokenizer_dir


def test_stop_strings_are_searched_in_the_held_back_tail_only():
    """Over a long output the unsent tail never grows past the longest stop string, the sent text is
    only appended to, and a stop string split over tokens still ends the output where it starts."""
    tok = Tokenizer.from_pretrained(qwen_tokenizer_dir())
    text = "a busy street, " * 60 + "cars and a STOP sign here"
    ids = tok.encode(text)
    params = SamplingParams(stop=["STOP sign", "never"])
    prompt = Prompt([1], [], torch.zeros(3, 1, dtype=torch.long), 0)
    seq = Sequence("r", prompt, params)
    seq.status = Status.RUNNING
    request = Request("r", prompt, params, [seq], tok)
    stops = []

    def finish(s, reason, stop_reason=None):
        s.status, s.finish_reason, s.stop_reason = Status.FINISHED, reason, stop_reason
        stops.append(stop_reason)

    pieces = 0
    for t in ids:
        seq.append_token(t)
        request.update(seq, finish)
        assert len(request.tails[0]) <= request.hold  # what the next step searches, besides its new text
        assert len(request.sent[0]) in (pieces, pieces + 1)  # sent text is never joined again
        pieces = len(request.sent[0])
        if seq.is_finished:
            break
    assert stops == ["STOP sign"] and request.text(0) == text[: text.index("STOP sign")]
