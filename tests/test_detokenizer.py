"""Streaming detokenizer: chunks join to the full decode and never hold half a character."""

import random

import pytest

from qwen2vl.processing.detokenizer import Detokenizer
from qwen2vl.processing.tokenizer import Tokenizer
from tests.helpers.qwen_tokenizer import qwen_tokenizer_dir

TEXTS = [
    "你好，世界！饕餮之徒与魑魅魍魉，龘靐齉爩，今天天气很好。",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flag 🇺🇸🇯🇵 ❤️‍🔥 done",
    "混合 text with 中文, русский, 日本語 and 🎉🎉🎉 at the end 😀",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝛼𝛽𝛾 and rare 𠀀𠀁𪚥",
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_pretrained(qwen_tokenizer_dir())


def _stream(tok, ids, step=1, **kw):
    detok = Detokenizer(tok, **kw)
    chunks = [detok.push(ids[i:i + step]) for i in range(0, len(ids), step)]
    return chunks, detok.flush()


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("step", [1, 3])
def test_stream_equals_full_decode_without_broken_characters(tok, text, step):
    ids = tok.encode(text)
    # The texts must really split characters across tokens, or the test proves nothing.
    assert any(_not_utf8(tok.token_bytes(i)) for i in ids)
    chunks, last = _stream(tok, ids, step)
    assert "".join(chunks) + last == tok.decode(ids) == text
    assert all("\ufffd" not in c for c in chunks) and last == ""


def test_special_tokens_skipped_or_kept(tok):
    ids = tok.encode("<|im_start|>assistant\n你好<|im_end|>", allow_special=True)
    chunks, last = _stream(tok, ids)
    assert "".join(chunks) + last == tok.decode(ids, skip_special_tokens=True) == "assistant\n你好"
    chunks, last = _stream(tok, ids, skip_special_tokens=False)
    assert "".join(chunks) + last == tok.decode(ids) == "<|im_start|>assistant\n你好<|im_end|>"


def test_push_accepts_single_ids_and_holds_partial_characters(tok):
    ids = tok.encode("𪚥")
    assert len(ids) > 1  # one character, three byte tokens
    detok = Detokenizer(tok)
    assert [detok.push(i) for i in ids] == ["", "", "𪚥"]


def test_random_ids_match_lossy_full_decode(tok):
    # Arbitrary token runs can leave invalid or unfinished UTF-8: the stream must still agree
    # with the full decode, U+FFFD included, once flushed.
    rng = random.Random(0)
    byte_tokens = [i for i in range(tok.vocab_size) if len(tok.token_bytes(i)) == 1]
    multibyte = [i for i in range(100000, 151000) if _not_utf8(tok.token_bytes(i))]
    for _ in range(200):
        ids = [rng.choice(byte_tokens + multibyte[:2000]) for _ in range(rng.randint(1, 12))]
        chunks, last = _stream(tok, ids)
        assert "".join(chunks) + last == tok.decode(ids)


def test_out_of_vocabulary_ids_are_empty(tok):
    chunks, last = _stream(tok, [9707, 151900, 1879])
    assert "".join(chunks) + last == "Hello world"


def _not_utf8(data: bytes) -> bool:
    try:
        data.decode()
        return False
    except UnicodeDecodeError:
        return True
