"""Streaming detokenizer: token ids in, complete text out, never half a character.

Byte-level BPE tokens are byte strings, and one character (a Chinese character is 3 bytes,
an emoji 4) is often split across tokens. Each new token's bytes go through Python's
incremental UTF-8 decoder, which returns only finished characters and holds a partial
one until its last byte arrives. So each step costs O(new tokens), never a re-decode of the
whole output, and the concatenated chunks equal the full `tokenizer.decode(ids)`. Bytes that
can never form a character become U+FFFD, as in the full decode.

    detok = Detokenizer(tokenizer)
    for token_id in stream:
        print(detok.push(token_id), end="")
    print(detok.flush())
"""

import codecs
from collections.abc import Iterable

from qwen2vl.processing.tokenizer import Tokenizer


class Detokenizer:
    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True):
        """`skip_special_tokens`: drop special tokens like `<|im_end|>` from the text (the
        default for streamed replies)."""
        self.tokenizer = tokenizer
        self.skip = tokenizer.special_ids if skip_special_tokens else frozenset()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: int | Iterable[int]) -> str:
        """Text completed by these new token ids ("" while a character is still partial)."""
        if isinstance(ids, int):
            ids = (ids,)
        data = b"".join(self.tokenizer.token_bytes(int(i)) for i in ids if int(i) not in self.skip)
        return self._utf8.decode(data)

    def flush(self) -> str:
        """Whatever is still held at the end of the stream (an unfinished character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)
