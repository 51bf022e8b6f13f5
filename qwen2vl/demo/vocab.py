"""The demo model's tokenizer: Qwen2's byte-level BPE with a vocabulary cut down to the suite's words.

Same pipeline as the Qwen2 tokenizer (REFERENCE.md §4): NFC, the Qwen2 split regex, byte-level
pieces, BPE merges, the ByteLevel decoder. The vocabulary is the 256 bytes (so any text still
encodes, a byte at a time) plus merges learnt from the suite's fixed text (the chat template's
words, the questions and the answer words), then Qwen's 14 special tokens. A word read from an
image is never merged: the corpus has no two capitals or digits side by side, so such words stay
one token per character, which is what lets a small model spell them.
"""

from __future__ import annotations

import json
from pathlib import Path

from qwen2vl.demo.scenes import COLORS, SHAPES, WORD_CHARS
from qwen2vl.demo.tasks import DIRECTIONS, TEXT_QUESTION, color_question, count_question

QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
EOS, PAD = "<|im_end|>", "<|endoftext|>"


def corpus() -> list[str]:
    """Every fixed string the suite and the chat template produce (each once)."""
    lines = ["system\nYou are a helpful assistant.", "user\n", "assistant\n",
             count_question(), TEXT_QUESTION,
             "Which image has more shapes, the first or the second?", "first", "second",
             "(123,456),(789,100)", "List the shapes from left to right.", "none", *DIRECTIONS]
    for kind in SHAPES:
        lines += [color_question(kind), count_question(kind)]
        for color in COLORS:
            lines += [color, f"Where is the {color} {kind}?", f"the {color} {kind}", f"{color} {kind}, {color} {kind}",
                      f"Which direction does the {color} {kind} move?"]
    return lines


def build_tokenizer(out: str | Path, chat_template: str) -> None:
    """Write tokenizer.json and tokenizer_config.json (with `chat_template`) into folder `out`."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(models.BPE(ignore_merges=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    # min_frequency 1 and room to spare: every corpus word ends as one token
    trainer = BpeTrainer(vocab_size=1024, min_frequency=1, show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    first = tok.token_to_id(SPECIAL_TOKENS[0])
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": {
            str(first + i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": True} for i, s in enumerate(SPECIAL_TOKENS)},
        "additional_special_tokens": list(SPECIAL_TOKENS[3:]),
        "bos_token": None, "eos_token": EOS, "pad_token": PAD, "unk_token": None, "errors": "replace",
        "model_max_length": 4096, "clean_up_tokenization_spaces": False, "split_special_tokens": False,
        "chat_template": chat_template,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def unused_token_ids(folder: str | Path, keep_read: bool = False) -> list[int]:
    """The ids of folder's tokenizer that no fixed text of the suite produces (special tokens left out):
    the bytes and merges that spell only other words (a French colour, a word read from an image). No
    suite answer or question holds them, so a demo that was never taught to read never used their embedding
    rows. `keep_read` leaves out the characters a read word is spelled with (`WORD_CHARS`, one token each):
    a demo that reads answers with their rows, which the letters lesson would otherwise overwrite."""
    from qwen2vl.processing.tokenizer import Tokenizer  # what training encodes the rows with

    tok = Tokenizer.from_pretrained(folder)
    used = {i for line in corpus() for i in tok.encode(line)}
    if keep_read:
        used |= {i for char in WORD_CHARS for i in tok.encode(char)}
    return sorted(set(range(tok.vocab_size)) - used - tok.special_ids)


if __name__ == "__main__":  # python -m qwen2vl.demo.vocab [FOLDER] [--keep-read]: those ids, for --train-tokens
    import argparse

    from qwen2vl.hub import resolve_model_path

    parser = argparse.ArgumentParser(description="The letters lesson's rows: the tokens no suite text holds.")
    parser.add_argument("folder", nargs="?", default="demo")
    parser.add_argument("--keep-read", action="store_true", help="leave out the characters read words are spelled with")
    args = parser.parse_args()
    print(",".join(map(str, unused_token_ids(resolve_model_path(args.folder), keep_read=args.keep_read))))
