"""Join training-line files into one shuffled JSONL: `python -m qwen2vl.demo.mix OUT SEED FILE[:N]...`.

The demo's training scripts each joined lesson folders by an inline snippet; this is the one rule they
share now. A line's picture and frame paths are relative to its file (as `qwen2vl train` reads them), so
they are rewritten relative to OUT's folder; `FILE:N` takes N of FILE's lines drawn at random. Lines from
OUT's own folder are kept byte for byte, and the draws and the shuffle come from one `random.Random(SEED)`
in argument order, so a recipe's line file is rebuilt exactly from its command.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

from qwen2vl.grounding import BOX_START
from qwen2vl.train.data import is_relative_path


def rebase(paths, folder: str):
    """Picture paths (a path, or a video's list of frame paths) put under `folder`; absolute paths, URLs and
    data: URIs are found from anywhere (the rule `qwen2vl train` reads them by), so they stay."""
    if isinstance(paths, list):
        return [rebase(p, folder) for p in paths]
    return f"{folder}/{paths}" if is_relative_path(paths) else paths


def first_box_only(row: dict) -> dict:
    """The row without the box questions after its first turn (the suite's extra questions ask some)."""
    turns = list(zip(row["messages"][::2], row["messages"][1::2]))
    row["messages"] = [m for i, (q, a) in enumerate(turns) if i == 0 or BOX_START not in a["content"]
                       for m in (q, a)]
    return row


def read_lines(path: Path, out_folder: Path, drop_extra_boxes: bool) -> list[str]:
    folder = os.path.relpath(path.parent.resolve(), out_folder.resolve())
    lines = path.read_text().splitlines()
    if folder == "." and not drop_extra_boxes:
        return lines
    moved = []
    for text in lines:
        row = json.loads(text)
        if drop_extra_boxes:
            row = first_box_only(row)
        if folder != ".":
            for key in ("images", "videos"):
                if key in row:
                    row[key] = rebase(row[key], folder)
        moved.append(json.dumps(row))
    return moved


def mix(out: Path, seed: int, specs: list[str], drop_extra_boxes: bool = False) -> int:
    """Write the lines of each `FILE[:N]` spec, shuffled, to `out`; returns how many."""
    rng, lines = random.Random(seed), []
    for spec in specs:
        name, _, n = spec.partition(":")
        path = Path(name)
        if not path.is_file():
            raise SystemExit(f"mix: {name} is not a file")
        these = read_lines(path, out.parent, drop_extra_boxes)
        if n:
            if not n.isdigit() or int(n) > len(these):
                raise SystemExit(f"mix: {spec}: N must be a whole number of at most {len(these)} (the file's lines)")
            these = rng.sample(these, int(n))
        lines += these
    rng.shuffle(lines)
    out.write_text("\n".join(lines) + "\n")
    return len(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Join training-line files into one shuffled JSONL.")
    parser.add_argument("out", type=Path, help="the JSONL to write (picture paths made relative to its folder)")
    parser.add_argument("seed", type=int, help="seeds the draws and the shuffle")
    parser.add_argument("files", nargs="+", metavar="FILE[:N]", help="a JSONL of training lines; :N draws N of them")
    parser.add_argument("--drop-extra-boxes", action="store_true",
                        help="leave out the box questions after a line's first question")
    args = parser.parse_args(argv)
    n = mix(args.out, args.seed, args.files, args.drop_extra_boxes)
    print(f"{args.out}: {n} lines")


if __name__ == "__main__":
    main()
