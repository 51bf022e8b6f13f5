"""Build the real Qwen2 tokenizer offline, for tests that need one.

The model hubs are unreachable here, but the Qwen BPE ranks ship inside the `dashscope`
wheel on PyPI (`dashscope/resources/qwen.tiktoken`, 151,643 ranks). From them we build the
same byte-level BPE `tokenizer.json` the Qwen2 checkpoints carry (REFERENCE §4):

- vocab: each rank's bytes mapped through GPT-2's `bytes_to_unicode`;
- merges: for the token of rank r, run BPE on its bytes with only ranks < r; it always ends
  in exactly two parts, and that pair is the merge (ordered by r);
- NFC normalizer, Split(Qwen2 regex, isolated) + ByteLevel(use_regex=False) pre-tokenizer,
  ByteLevel post-processor and decoder;
- the 14 special tokens 151643..151656, plus a tokenizer_config.json holding the official
  Qwen2-VL-Instruct chat template.

`qwen_tokenizer_dir()` builds once into `<repo>/.cache/qwen_tokenizer/` (gitignored) under a
file lock, writing to a temporary folder that is renamed into place, so parallel test
processes never see a half-written folder.
"""

import base64
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache"
OUT = CACHE / "qwen_tokenizer"
WHEELS = CACHE / "wheels"
WHEEL_PIN = "dashscope==2.0.2"
RANKS_MEMBER = "dashscope/resources/qwen.tiktoken"
RANKS_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
BUILD_VERSION = "1"  # bump when the files written below change, to force a rebuild

QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
FIRST_SPECIAL_ID = 151643

# The chat template of the Qwen2-VL-Instruct checkpoints (tokenizer_config.json /
# chat_template.json on the hub), kept here as the hub file spells it.
OFFICIAL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen_tokenizer_dir() -> Path:
    """Folder with tokenizer.json + tokenizer_config.json of the Qwen2-VL tokenizer (built once)."""
    if _is_current(OUT):
        return OUT
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "qwen_tokenizer.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not _is_current(OUT):
            _build(OUT)
    return OUT


def qwen_ranks() -> dict[bytes, int]:
    """The Qwen BPE ranks (bytes -> rank), checked against their known sha256."""
    data = zipfile.ZipFile(_wheel()).read(RANKS_MEMBER)
    if hashlib.sha256(data).hexdigest() != RANKS_SHA256:
        raise RuntimeError(f"{RANKS_MEMBER} in {_wheel()} has an unexpected sha256")
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _is_current(folder: Path) -> bool:
    stamp = folder / "BUILD_VERSION"
    return stamp.is_file() and stamp.read_text() == BUILD_VERSION


def _wheel() -> Path:
    found = sorted(WHEELS.glob("dashscope-*.whl"))
    if not found:
        WHEELS.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL_PIN, "-d", str(WHEELS)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed (the Qwen BPE ranks come from that wheel):\n{done.stderr}")
        found = sorted(WHEELS.glob("dashscope-*.whl"))
    if not found:
        raise RuntimeError(f"could not get the {WHEEL_PIN} wheel into {WHEELS}")
    return found[-1]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


def _merge_pair(token: bytes, ranks: dict[bytes, int], rank: int) -> tuple[bytes, bytes]:
    """tiktoken's BPE on `token` using only ranks below `rank`; the two parts left are the merge."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, best_rank = -1, rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], rank)
            if r < best_rank:
                best, best_rank = i, r
        if best < 0:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    assert len(parts) == 2, (token, parts)
    return parts[0], parts[1]


def _build(out: Path) -> None:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    ranks = qwen_ranks()
    to_char = _bytes_to_unicode()
    text = lambda b: "".join(to_char[x] for x in b)
    vocab = {text(tok): r for tok, r in ranks.items()}
    merges = []
    for tok, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) > 1:
            a, b = _merge_pair(tok, ranks, r)
            merges.append((text(a), text(b)))

    tok = Tokenizer(models.BPE(vocab, merges, dropout=None, unk_token=None, fuse_unk=False,
                               byte_fallback=False, ignore_merges=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == FIRST_SPECIAL_ID + i, s

    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": {
            str(FIRST_SPECIAL_ID + i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                                        "single_word": False, "special": True}
            for i, s in enumerate(SPECIAL_TOKENS)
        },
        "additional_special_tokens": SPECIAL_TOKENS[3:],
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "model_max_length": 32768,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "chat_template": OFFICIAL_CHAT_TEMPLATE,
    }
    tmp = Path(tempfile.mkdtemp(prefix="qwen_tokenizer.", dir=out.parent))
    try:
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        (tmp / "BUILD_VERSION").write_text(BUILD_VERSION)
        tmp.chmod(0o755)  # mkdtemp makes it private
        if out.exists():  # a stale build: move it aside first, so the rename below is atomic
            stale = Path(tempfile.mkdtemp(prefix="qwen_tokenizer.stale.", dir=out.parent))
            os.replace(out, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    print(qwen_tokenizer_dir())
