"""Structured output: `response_format` (json_object, json_schema) and forced tool calls, enforced
while decoding with llguidance.

Why llguidance: it computes the allowed-token mask on the fly from the grammar (an Earley parser
over a lexer, ~50 us a token), so a JSON schema costs nothing to compile up front and supports
the whole schema language (refs, anyOf, nesting) plus Lark grammars that embed JSON (`%json`,
used for tool calls). Its wheel is pure Rust with no Python dependencies (no transformers, no
triton), one abi3 build for every Python, and the mask is plain bits that we apply to the
logits with torch on CPU or GPU. xgrammar 0.2.8 needs transformers and triton at runtime;
outlines-core compiles a regex index over the whole vocabulary per schema (seconds for 150k
tokens) and covers less of JSON Schema.

`GrammarConstraint` is a per-request logits processor for the engine: called with a sequence's
generated ids and its logits row, it feeds the new token to its matcher and masks every token
the grammar forbids. When the grammar is complete only end-of-sequence stays allowed, so a
bounded schema always terminates.
"""

import hashlib
import json
import logging
import time

import llguidance
import numpy as np
import torch

from qwen2vl.server.errors import bad_request

log = logging.getLogger("qwen2vl.server")

# JSON as compact as the model likes, but never unbounded runs of whitespace (a weak model loops
# on them); at most this many whitespace characters between tokens.
JSON_OPTIONS = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,4}"}

# This process's compilers by fingerprint. A constraint sent to an engine replica in another process
# (qwen2vl/replicas) travels as (fingerprint, grammar) and is rebuilt there on the replica's compiler of
# the same tokenizer: llguidance's table is native and a few MB, built once per process, never pickled.
_COMPILERS: dict[str, "GrammarCompiler"] = {}


class GrammarCompiler:
    """Owns the llguidance tokenizer table and turns request options into checked grammars.

    The table is built here, when the server starts (create_app), not on the first request that
    needs it: it takes ~2-3 s for a 150k vocabulary and holds the GIL all along, so built lazily it
    stalled that request and every stream being served. Built before the server listens, so /health
    answers only once it exists."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: list[int]):
        start = time.monotonic()
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=list(eos_token_ids))
        log.info("grammar tokenizer table built in %.1f s", time.monotonic() - start)
        self.eos_token_ids = list(eos_token_ids)
        key = hashlib.sha256(f"{vocab_size}:{sorted(self.eos_token_ids)}:".encode() + tokenizer_json.encode())
        self.fingerprint = key.hexdigest()
        _COMPILERS[self.fingerprint] = self

    def json_grammar(self, response_format: dict) -> str:
        """Grammar for {"type": "json_object"} or {"type": "json_schema", "json_schema": {...}}."""
        if response_format["type"] == "json_object":
            schema = {"type": "object"}
        else:
            schema = response_format["json_schema"].get("schema") or {"type": "object"}
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
        except (ValueError, TypeError) as e:
            raise bad_request(f"response_format.json_schema.schema: {e}", "response_format") from None

    def lark_grammar(self, lark: str) -> str:
        return llguidance.LLMatcher.grammar_from_lark(lark)

    def constraint(self, grammar: str, param: str, n: int = 1) -> "GrammarConstraint":
        """A fresh logits processor for one request; a grammar the library rejects (an unsupported
        schema keyword, a bad regex) is a 400 naming `param`."""
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise bad_request(f"{param}: the schema cannot be enforced: {error[:300]}", param)
        return GrammarConstraint(self, grammar, n)


class GrammarConstraint:
    """Logits processor `(token_ids, logits[V]) -> logits[V]` for one request.

    The engine calls it once per generated token with the ids generated so far. Matchers are kept
    by those ids, so the n completions of a request (which share this object) each follow their
    own path: with n = 1 the one matcher is advanced in place, with n > 1 it is copied first."""

    def __init__(self, compiler: GrammarCompiler, grammar: str, n: int = 1):
        self._fingerprint, self._grammar = compiler.fingerprint, grammar
        self._eos = compiler.eos_token_ids
        self._new = lambda: llguidance.LLMatcher(compiler.tokenizer, grammar, log_level=0)
        self._states: dict[tuple, object] = {(): self._new()}
        self._n = n
        self.failed = False

    def __reduce__(self):
        """Pickled as what it enforces, rebuilt fresh (no tokens consumed) on the receiving process's
        compiler: an engine replica starts the request from its prompt."""
        return _rebuilt_constraint, (self._fingerprint, self._grammar, self._n)

    def __call__(self, token_ids, logits: torch.Tensor) -> torch.Tensor:
        key = tuple(token_ids)
        matcher = self._states.get(key)
        if matcher is None:
            matcher = self._advance(key)
        vocab = logits.shape[-1]
        if matcher.is_error():
            # cannot happen while the mask is applied; end the sequence rather than emit junk
            if not self.failed:
                log.warning("grammar matcher error: %s", matcher.get_error())
            self.failed = True
            allowed = torch.zeros(vocab, dtype=torch.bool)
            allowed[[i for i in self._eos if i < vocab]] = True
        else:
            bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
            allowed = torch.zeros(vocab, dtype=torch.bool)  # rows past the tokenizer's vocabulary stay off
            m = min(vocab, bits.size)
            allowed[:m] = torch.from_numpy(bits[:m].astype(bool))
        return logits.masked_fill(~allowed.to(logits.device), float("-inf"))

    def _advance(self, key: tuple):
        parent = self._states.get(key[:-1]) if key else None
        if parent is None:  # a path we dropped (e.g. a preempted completion fell behind): replay it
            matcher = self._new()
            matcher.consume_tokens(list(key))
        elif self._n == 1:
            matcher = self._states.pop(key[:-1])
            matcher.consume_token(key[-1])
        else:
            matcher = parent.deep_copy()
            matcher.consume_token(key[-1])
            for k in [k for k in self._states if len(k) < len(key) - 1]:
                del self._states[k]  # two or more tokens behind: no completion extends these
        self._states[key] = matcher
        return matcher


def _rebuilt_constraint(fingerprint: str, grammar: str, n: int) -> GrammarConstraint:
    compiler = _COMPILERS.get(fingerprint)
    if compiler is None:
        raise RuntimeError("a grammar constraint arrived in a process with no GrammarCompiler for its tokenizer; "
                           "build one first (an engine replica does, replicas/replica.py)")
    return GrammarConstraint(compiler, grammar, n)
