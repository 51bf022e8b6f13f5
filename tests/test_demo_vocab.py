"""The demo model's reduced tokenizer: any text still encodes (bytes), Qwen's 14 special tokens are
kept, config.json's ids are the tokenizer's, and transformers reads the folder the same way."""

import json
import random
import unicodedata

import pytest

from qwen2vl.demo import vocab
from qwen2vl.demo.blank import write_blank
from qwen2vl.demo.scenes import WORD_CHARS
from qwen2vl.processing.processor import Processor
from qwen2vl.processing.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def blank(tmp_path_factory):
    return write_blank(tmp_path_factory.mktemp("blank"))


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pools = ["abc XYZ 012 \n\t  .,;!?()[]", "éüßçøÅ", "你好世界日本語한국어", "🙂🚀👍🏽🇫🇷", "\u200b\u00a0\r\n\x00\x7f",
             "<|im_start|><|image_pad|>"]
    out = []
    for _ in range(n):
        out.append("".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(0, 40))))
    out += ["".join(chr(rng.randint(1, 0x10FFFF)) for _ in range(20)).encode("utf-8", "replace").decode() for _ in
            range(20)]
    return out


def test_any_text_round_trips_through_bytes(blank):
    tok = Tokenizer.from_pretrained(blank)
    for text in random_texts(300) + ["What color is the circle?", ""]:
        text = "".join(c for c in text if not 0xD800 <= ord(c) <= 0xDFFF)  # lone surrogates are not text
        ids = tok.encode(text)
        assert tok.decode(ids) == unicodedata.normalize("NFC", text)
        assert not set(ids) & tok.special_ids  # typed special-token strings stay text


def test_special_tokens_are_qwens_fourteen_and_config_ids_are_the_tokenizers(blank):
    tok = Tokenizer.from_pretrained(blank)
    ids = [tok.token_to_id(s) for s in vocab.SPECIAL_TOKENS]
    assert len(vocab.SPECIAL_TOKENS) == 14 and ids == list(range(ids[0], ids[0] + 14))
    assert set(ids) == set(tok.special_ids)
    for s, i in zip(vocab.SPECIAL_TOKENS, ids):
        assert tok.encode(s, allow_special=True) == [i] and tok.decode([i]) == s
    config = json.loads((blank / "config.json").read_text())
    named = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
             "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
             "vision_token_id": "<|vision_pad|>", "eos_token_id": "<|im_end|>", "bos_token_id": "<|endoftext|>"}
    for key, token in named.items():
        assert config[key] == tok.token_to_id(token), key
    assert tok.vocab_size <= config["vocab_size"] < tok.vocab_size + 64
    assert tok.eos_token_ids[0] == tok.token_to_id("<|im_end|>") and tok.pad_token_id == config["bos_token_id"]
    proc = Processor.from_pretrained(blank)
    assert (proc.image_token_id, proc.video_token_id) == (config["image_token_id"], config["video_token_id"])


def test_suite_words_are_single_tokens_and_words_to_read_are_one_per_character(blank):
    tok = Tokenizer.from_pretrained(blank)
    for word in (" circle", " triangle", "purple", " direction"):
        assert len(tok.encode(word)) == 1, word
    rng = random.Random(1)
    for _ in range(200):
        word = "".join(rng.choice(WORD_CHARS) for _ in range(rng.randint(3, 6)))
        assert [tok.decode([i]) for i in tok.encode(word)] == list(word)


def test_transformers_reads_the_same_tokenizer_and_chat_template(blank):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(blank))
    tok = Tokenizer.from_pretrained(blank)
    for text in random_texts(50, seed=2) + vocab.corpus():
        assert hf.encode(text, add_special_tokens=False, split_special_tokens=True) == tok.encode(text)
    messages = [{"role": "user", "content": [{"type": "image", "image": "x.png"},
                                             {"type": "text", "text": "What color is the circle?"}]},
                {"role": "assistant", "content": "red"}]
    proc = Processor.from_pretrained(blank)
    assert hf.apply_chat_template(messages, tokenize=False) == proc.apply_chat_template(messages)


def test_the_unused_tokens_are_in_no_suite_row_and_spell_other_words(tmp_path):
    """`unused_token_ids` (what `--train-tokens` trains in the letters lesson) holds no token of the rows the
    demo was trained on (every task but reading, with their extra questions, through the chat template),
    and does hold the letters of words the suite never answers."""
    from qwen2vl.demo.dataset import write_dataset
    from qwen2vl.hub import resolve_model_path
    from qwen2vl.train.data import read_rows

    folder = resolve_model_path("demo")
    unused = set(vocab.unused_token_ids(folder))
    proc = Processor.from_pretrained(folder)
    mix = {"color": 1, "count": 1, "grounding": 1, "video": 1, "two_images": 1}
    rows = read_rows(write_dataset(tmp_path, 40, seed=9, mix=mix))
    seen = {i for row in rows for i in proc.encode_text(row.messages, answers_hold_special_tokens=True)}
    assert len(seen) > 80 and not seen & unused
    tok = Tokenizer.from_pretrained(folder)
    for word in ("rouge", "jaune", "KQWZ"):  # digits are not: counts and boxes answer them
        assert set(tok.encode(word)) <= unused, word


def test_keep_read_leaves_the_read_characters_rows_alone():
    """With `keep_read` (a demo that reads) the letters lesson's rows hold no character a read word is spelled
    with, and still the French words' letters."""
    from qwen2vl.demo.scenes import WORD_CHARS
    from qwen2vl.hub import resolve_model_path

    folder = resolve_model_path("demo")
    tok = Tokenizer.from_pretrained(folder)
    unused, kept = set(vocab.unused_token_ids(folder)), set(vocab.unused_token_ids(folder, keep_read=True))
    read = {i for char in WORD_CHARS for i in tok.encode(char)}
    assert kept < unused and not kept & read and unused & read
    for word in ("rouge", "jaune", "violet"):
        assert set(tok.encode(word)) <= kept, word


def test_the_letters_lesson_is_seeded_and_answers_the_string_it_shows(tmp_path):
    from qwen2vl.demo.letters import PROMPT, write_letters
    from qwen2vl.train.data import read_rows

    first, again = write_letters(tmp_path / "a", 50, seed=3), write_letters(tmp_path / "b", 50, seed=3)
    assert first.read_bytes() == again.read_bytes() != write_letters(tmp_path / "c", 50, seed=4).read_bytes()
    rows = read_rows(first)
    for row in rows:
        (user, assistant) = row.messages
        assert user["content"] == PROMPT + assistant["content"]
    assert {len(r.messages[1]["content"]) for r in rows} == set(range(3, 9))
