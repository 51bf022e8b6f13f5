"""Tokenizer: ids equal tiktoken's on the same Qwen ranks, regex and special tokens."""

import json
import random
import shutil
import unicodedata

import pytest
import tiktoken

from qwen2vl.processing.tokenizer import Tokenizer
from tests.helpers.qwen_tokenizer import FIRST_SPECIAL_ID, QWEN2_PATTERN, SPECIAL_TOKENS, qwen_ranks, qwen_tokenizer_dir

TEXTS = [
    "Hello world",
    "HELLO I'M HERE, YOU'LL SEE. They're we've it'd",
    "你好，世界！今天天气很好。我们去公园散步吧。",
    "日本語のテキスト、한국어 텍스트, Русский текст, Ελληνικά, العربية",
    "def f(x):\n    return {'a': x ** 2}  # comment\n\n\nclass A:\n\tpass\n",
    "int main() { printf(\"%d\\n\", 42); return 0; }",
    "1234567890 3.14159 -2e10 0x1F 1,000,000",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flag 🇺🇸 heart ❤️",
    "spaces    and\ttabs\t\t  \n\n\n   trailing   ",
    "windows\r\nline\r\n\r\nendings\r",
    "https://example.com/path?q=1&b=%20x#frag",
    "$\\frac{a}{b} + \\sum_{i=0}^{n} x_i$",
    "nbsp\u00a0thin\u2009ideographic\u3000space",
    "cafe\u0301 and caf\u00e9",  # not NFC: the tokenizer normalizes, tiktoken does not
    "",
    " ",
    "<|im_start|> <|endoftext|> <|image_pad|>",
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_pretrained(qwen_tokenizer_dir())


@pytest.fixture(scope="module")
def enc():
    specials = {s: FIRST_SPECIAL_ID + i for i, s in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding("qwen", pat_str=QWEN2_PATTERN, mergeable_ranks=qwen_ranks(), special_tokens=specials)


def _random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pool = list("abcXYZ019 \t\n\r.,;'\"!?-_()[]{}<>|/\\") + list("你好世界的是") + ["😀", "🏽", "\u200d", "é", "\u0301"]
    pool += ["<|im_start|>", "<|im_end|>", "'s", "'LL", "  ", "\r\n"]
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(n)]


@pytest.mark.parametrize("text", TEXTS + _random_texts(300))
def test_plain_encoding_matches_tiktoken(tok, enc, text):
    nfc = unicodedata.normalize("NFC", text)
    assert tok.encode(text) == enc.encode_ordinary(nfc)
    assert tok.encode(text, allow_special=True) == enc.encode(nfc, allowed_special="all")
    assert tok.decode(tok.encode(text)) == nfc


def test_known_ids(tok):
    assert tok.token_to_id("<|endoftext|>") == 151643
    assert tok.token_to_id("<|im_start|>") == 151644
    assert tok.token_to_id("<|im_end|>") == 151645
    assert tok.encode("Hello") == [9707]
    assert tok.encode("Hello world") == [9707, 1879]
    prompt = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    assert tok.encode(prompt, allow_special=True) == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198]
    assert tok.vocab_size == 151657


def test_special_strings_are_plain_text_unless_allowed(tok):
    ids = tok.encode("<|image_pad|>")
    assert tok.token_to_id("<|image_pad|>") not in ids and len(ids) > 1
    assert tok.encode("<|image_pad|>", allow_special=True) == [tok.token_to_id("<|image_pad|>")]
    assert tok.find_special("a <|im_end|> b <|im_start|>") == "<|im_end|>"
    assert tok.find_special("no specials <|im_nope|>") is None


def test_eos_pad_from_configs(tok, tmp_path):
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_ids == [151645]
    assert tok.pad_token_id == 151643 and tok.bos_token_id is None
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(qwen_tokenizer_dir() / name, tmp_path / name)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643]}))
    assert Tokenizer.from_pretrained(tmp_path).eos_token_ids == [151645, 151643]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 151643}))
    assert Tokenizer.from_pretrained(tmp_path).eos_token_ids == [151645, 151643]


def test_clear_errors(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    shutil.copy(qwen_tokenizer_dir() / "tokenizer.json", tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match="no eos token"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        tok.token_to_id("<|nope|>")


def test_decode_and_token_bytes(tok):
    ids = tok.encode("<|im_start|>你好 😀<|im_end|>", allow_special=True)
    assert tok.decode(ids) == "<|im_start|>你好 😀<|im_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "你好 😀"
    assert b"".join(tok.token_bytes(i) for i in ids).decode() == tok.decode(ids)
    assert tok.decode([9707, 151900]) == "Hello"  # a padded embedding row has no text
    assert tok.token_bytes(151900) == b""


def test_matches_transformers_tokenizer(tok):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(qwen_tokenizer_dir())
    for text in TEXTS:
        assert tok.encode(text, allow_special=True) == ref.encode(text, add_special_tokens=False)
