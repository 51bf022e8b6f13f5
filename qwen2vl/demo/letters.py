"""The letters lesson: text-only rows "Repeat: {s}" -> s, s a string of 3-8 characters drawn from a-z
(twice as likely), A-Z and 0-9.

    python -m qwen2vl.demo.letters OUT [--cases 20000] [--seed 1]     # -> OUT/train.jsonl

Why: the demo's vocabulary merges every suite word into one token, so the byte tokens that spell any
other word (`rouge` = r-o-u-g-e) never occur in its training, and their embedding rows keep the random
initialisation. A LoRA cannot change embeddings, so an adapter that answers in new words had to learn
to emit and read back untrained tokens, and needed ~900 steps for what 300 should teach (docs/demo.md,
"Fine-tuning it"). Trained on those rows alone (`qwen2vl train --full --train-tokens $(python -m
qwen2vl.demo.vocab)`), this lesson gives them values the frozen decoder can use, and changes no other
weight. Alone it also lifts some letters above suite answers (a box's first token); the same rows then
trained beside suite lines put them back under, and the suite is answered as before ("The letters
lesson", docs/demo.md; scripts/train_demo.sh's L1 and L2).
"""

from __future__ import annotations

import argparse
import json
import random
import string
from pathlib import Path

CHARACTERS = string.ascii_lowercase * 2 + string.ascii_uppercase + string.digits
PROMPT = "Repeat: "


def letters_row(rng: random.Random) -> dict:
    """One sharegpt line: a random string to repeat."""
    text = "".join(rng.choice(CHARACTERS) for _ in range(rng.randint(3, 8)))
    return {"messages": [{"role": "user", "content": PROMPT + text}, {"role": "assistant", "content": text}]}


def write_letters(out: str | Path, cases: int, seed: int) -> Path:
    """`cases` rows of set `seed` -> out/train.jsonl (returned)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with open(out / "train.jsonl", "w") as f:
        for _ in range(cases):
            f.write(json.dumps(letters_row(rng)) + "\n")
    return out / "train.jsonl"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder for train.jsonl")
    parser.add_argument("--cases", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.cases < 1:
        parser.error(f"--cases must be >= 1, got {args.cases}")
    print(write_letters(args.out, args.cases, args.seed))


if __name__ == "__main__":
    main()
