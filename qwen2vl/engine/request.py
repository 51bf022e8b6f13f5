"""The engine's record of one request: its n sequences, their text, stop strings, and increments.

Token-level stops (eos, stop ids, length) are decided by the scheduler; stop strings need text, so
they are checked here, after each step, on the incrementally detokenized output. A stop string may
span several tokens, so streamed text is held back by len(longest stop) - 1 characters until it
can no longer turn out to be the start of a stop string. A step costs what its new tokens and the
held-back tail add up to, never the length of the output: sent text is kept as a list of pieces,
and only the unsent tail is searched.
"""

from __future__ import annotations

from qwen2vl.engine.outputs import Completion, Delta, RequestOutput, Usage
from qwen2vl.engine.prompt import Prompt
from qwen2vl.engine.sampling_params import SamplingParams
from qwen2vl.engine.sequence import Sequence
from qwen2vl.processing.detokenizer import Detokenizer


class Request:
    def __init__(self, request_id: str, prompt: Prompt, params: SamplingParams, seqs: list[Sequence],
                 tokenizer=None):
        self.request_id = request_id
        self.prompt = prompt
        self.params = params
        self.seqs = seqs
        skip = params.skip_special_tokens
        self.detoks = [Detokenizer(tokenizer, skip_special_tokens=skip) if tokenizer else None for _ in seqs]
        self.sent: list[list[str]] = [[] for _ in seqs]  # text already handed out, in pieces
        self.tails = [""] * len(seqs)  # text not handed out yet: what could still start a stop string
        self.sent_tokens = [0] * len(seqs)
        self.done = [False] * len(seqs)
        self.hold = max((len(s) for s in params.stop), default=1) - 1

    @property
    def finished(self) -> bool:
        return all(self.done)

    def update(self, seq: Sequence, finish) -> Delta | None:
        """Fold a sequence's new tokens into its text; `finish(seq, reason, stop_reason)` ends it
        early when a stop string shows up. Returns the increment to send, if any."""
        i = seq.index
        if self.done[i]:
            return None
        first = seq.num_prompt_tokens + self.sent_tokens[i]
        new = seq.token_ids[first:]
        # ended by eos or a stop id (the scheduler leaves stop_reason None or the id): the token is
        # in token_ids but not in the text
        by_token = seq.finish_reason == "stop" and not isinstance(seq.stop_reason, str)
        visible = new[:-1] if by_token and new and not self.params.include_stop_str_in_output else new
        detok = self.detoks[i]
        if detok is not None:
            self.tails[i] += detok.push(visible)
            if seq.is_finished:
                self.tails[i] += detok.flush()
            if self.params.stop and seq.finish_reason in (None, "length", "stop"):
                self._find_stop(seq, finish)
        lps = seq.logprobs[self.sent_tokens[i] :] if self.params.logprobs is not None else None
        self.sent_tokens[i] = seq.num_completion_tokens
        tail = self.tails[i]
        end = len(tail) if seq.is_finished else max(0, len(tail) - self.hold)
        text, self.tails[i] = tail[:end], tail[end:]
        if text:
            self.sent[i].append(text)
        self.done[i] = seq.is_finished
        if not (new or text or seq.is_finished):
            return None
        return Delta(self.request_id, i, text, new, seq.finish_reason, lps,
                     self.usage() if self.finished else None)

    def _find_stop(self, seq: Sequence, finish) -> None:
        tail = self.tails[seq.index]
        found = [(tail.find(s), s) for s in self.params.stop]
        found = [(at, s) for at, s in found if at >= 0]
        if not found:
            return
        at, s = min(found)
        self.tails[seq.index] = tail[: at + len(s)] if self.params.include_stop_str_in_output else tail[:at]
        if seq.is_finished:  # ended by a token-level stop in the same step: the string wins
            seq.finish_reason, seq.stop_reason = "stop", s
        else:
            finish(seq, "stop", s)

    def text(self, index: int) -> str:
        return "".join(self.sent[index]) + self.tails[index]

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=len(self.prompt),
            completion_tokens=sum(s.num_completion_tokens for s in self.seqs),
            cached_tokens=self.seqs[0].num_prefix_hit_tokens or 0,
        )

    def output(self) -> RequestOutput:
        completions = [
            Completion(s.index, self.text(s.index), s.completion_token_ids, s.finish_reason,
                       list(s.logprobs) if self.params.logprobs is not None else None, s.stop_reason)
            for s in self.seqs
        ]
        return RequestOutput(self.request_id, list(self.prompt.token_ids), completions, self.usage())
