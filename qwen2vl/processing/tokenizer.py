"""Tokenizer: the checkpoint's byte-level BPE (`tokenizer.json`) and the ids the chat needs.

Text is encoded with special tokens **off** by default: the string `<|im_start|>` typed by a
user becomes ordinary BPE pieces, never the control token. Only `encode(text,
allow_special=True)` (used for the chat template's own output) turns the added tokens'
strings into their ids, the way Hugging Face tokenizers do by default.

Special-token ids are always looked up by string in the checkpoint's vocabulary; eos and pad
come from tokenizer_config.json and generation_config.json.
"""

import json
import re
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer as _Backend
from tokenizers import decoders


class Tokenizer:
    def __init__(self, backend: _Backend, *, eos_token: str | None = None, pad_token: str | None = None,
                 bos_token: str | None = None, extra_eos_ids: tuple[int, ...] = ()):
        # The backend never extracts added tokens itself: we split them out in `encode`, so
        # one backend serves both modes without toggling shared state between threads.
        backend.encode_special_tokens = True
        self.backend = backend
        self.special_tokens = {t.content: i for i, t in backend.get_added_tokens_decoder().items()}
        # Matches any special-token string; longest first, so a token wins over one it contains.
        longest_first = sorted(self.special_tokens, key=len, reverse=True)
        self.special_re = re.compile("|".join(map(re.escape, longest_first)) or "(?!)")
        self.eos_token, self.pad_token, self.bos_token = eos_token, pad_token, bos_token
        eos = [self.token_to_id(eos_token)] if eos_token is not None else []
        self.eos_token_ids = list(dict.fromkeys(eos + list(extra_eos_ids)))
        self.pad_token_id = self.token_to_id(pad_token) if pad_token is not None else None
        self.bos_token_id = self.token_to_id(bos_token) if bos_token is not None else None

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "Tokenizer":
        """Load `tokenizer.json`, with eos/pad/bos from tokenizer_config.json and the
        generation_config.json eos list (if present) added to the stop ids."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{folder} has no tokenizer.json")
        backend = _Backend.from_file(str(path))
        if not isinstance(backend.decoder, decoders.ByteLevel):
            raise ValueError(f"{path}: only byte-level BPE tokenizers (Qwen2) are supported, "
                             f"decoder is {backend.decoder!r}")
        config = _read_json(folder / "tokenizer_config.json")
        extra_eos = _read_json(folder / "generation_config.json").get("eos_token_id")
        if extra_eos is None:
            extra_eos = []
        tok = cls(backend, eos_token=_token_str(config.get("eos_token")),
                  pad_token=_token_str(config.get("pad_token")), bos_token=_token_str(config.get("bos_token")),
                  extra_eos_ids=tuple(extra_eos if isinstance(extra_eos, list) else [extra_eos]))
        if not tok.eos_token_ids:
            raise ValueError(f"{folder}: no eos token (tokenizer_config.json eos_token or "
                             "generation_config.json eos_token_id)")
        return tok

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows, added tokens included (the model's embedding may be larger)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int:
        i = self.backend.token_to_id(token)
        if i is None:
            raise ValueError(f"token {token!r} is not in the tokenizer's vocabulary")
        return i

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    def find_special(self, text: str) -> str | None:
        """The first special-token string in `text`, or None."""
        m = self.special_re.search(text)
        return m.group(0) if m else None

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Token ids of `text`. Special-token strings are plain text unless `allow_special`."""
        if not allow_special:
            return self.backend.encode(text, add_special_tokens=False).ids if text else []
        pieces = self.special_re.split(text)
        ids = self.encode(pieces[0])
        for special, piece in zip(self.special_re.findall(text), pieces[1:], strict=True):
            ids.append(self.special_tokens[special])
            ids += self.encode(piece)
        return ids

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; ids outside the vocabulary (the model's padded rows) decode to nothing."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_bytes(self, i: int) -> bytes:
        """The raw bytes token `i` stands for (b"" for ids outside the vocabulary), used by the
        streaming detokenizer to decode UTF-8 incrementally."""
        return self._bytes_table[i] if 0 <= i < len(self._bytes_table) else b""

    @cached_property
    def _bytes_table(self) -> list[bytes]:
        # Byte-level BPE spells every byte as one printable character (GPT-2's table); invert it.
        to_byte = {c: b for b, c in _bytes_to_unicode().items()}
        vocab = self.backend.get_vocab(with_added_tokens=True)
        added = self.backend.get_added_tokens_decoder()
        table = [b""] * (max(vocab.values()) + 1)
        for token, i in vocab.items():
            if i in added:
                table[i] = token.encode()
            else:
                table[i] = bytes(to_byte[c] for c in token)
        return table

    @cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids of the tokens marked special (skipped by `decode(..., skip_special_tokens=True)`)."""
        return frozenset(i for i, t in self.backend.get_added_tokens_decoder().items() if t.special)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table of byte-level BPE."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_str(value) -> str | None:
    # tokenizer_config.json writes a token as a string or as a serialized AddedToken dict.
    if isinstance(value, dict):
        return value.get("content")
    return value
