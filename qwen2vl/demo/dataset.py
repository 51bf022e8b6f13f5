"""Training data for the demo model: suite cases as a LLaMA-Factory sharegpt JSON-lines file.

    python -m qwen2vl.demo.dataset data/ --cases 32000 [--seed 1] [--extra-turns 6]

writes data/train.jsonl and data/img/*.png, one line per case:

    {"messages": [{"role": "user", "content": "<image>What color is the circle?"},
                  {"role": "assistant", "content": "red"},
                  {"role": "user", "content": "How many shapes are there?"},
                  {"role": "assistant", "content": "3"}],
     "images": ["img/00000001-0.png"]}

A video is "<video>" and `"videos": [[frame paths]]` (a video as its list of frames). The first
turn is the case exactly as the evaluation asks it; up to `extra_turns` more questions about the
same picture follow: "List the shapes from left to right." (every shape's colour and kind, which
teaches the vision tower what to see far faster than one answer per picture: a first run with at
most 3 of the questions below and no list stayed at chance for 650 steps), then counts, and
colours and boxes of shapes that are unique in it. The vision tower is most of a step's cost, so
many answers per picture are cheap extra supervision.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from qwen2vl.demo.lessons import write_box_set, write_color_set, write_count_set, write_kind_set, write_word_set
from qwen2vl.demo.scenes import MAX_SIDE, MIN_SIDE
from qwen2vl.demo.tasks import (
    TASKS,
    TEXT_QUESTION,
    Case,
    box_answer,
    color_question,
    count_question,
    render_case,
    where_question,
)

# Cases per task in proportion to these weights: the hard tasks (boxes, reading) get more.
MIX = {"color": 1.0, "count": 1.5, "grounding": 2.5, "text": 3.0, "video": 1.0, "two_images": 1.5}
EXTRA_TASKS = ("color", "count", "grounding", "text")  # single-image scenes with shapes to ask about
LIST_QUESTION = "List the shapes from left to right."


def extra_turns(case: Case, rng: random.Random, most: int) -> list[tuple[str, str]]:
    """Up to `most` other (question, answer) pairs that hold for the case's picture: the list of its
    shapes first, then others in random order."""
    if case.task not in EXTRA_TASKS or most < 1:
        return []
    shapes = case.info["shapes"]
    width, height = case.images[0].size
    pool = [(count_question(), str(len(shapes)))]
    for kind in ("circle", "square", "triangle"):
        same = [s for s in shapes if s.kind == kind]
        pool.append((count_question(kind), str(len(same))))
        if len(same) == 1:
            pool.append((color_question(kind), same[0].color))
    for s in shapes:
        if sum((t.kind, t.color) == (s.kind, s.color) for t in shapes) == 1:
            pool.append((where_question(s), box_answer(s, width, height)))
    pool = [qa for qa in pool if qa[0] != case.question]
    in_order = sorted(shapes, key=lambda s: (s.x + s.side / 2, s.y))
    listing = (LIST_QUESTION, ", ".join(s.name for s in in_order) or "none")
    return [listing, *rng.sample(pool, min(len(pool), most - 1))]


def task_counts(cases: int, mix: dict[str, float] = MIX) -> dict[str, int]:
    """How many of `cases` each task gets (largest remainders, so they add up exactly)."""
    total = sum(mix.values())
    exact = {t: cases * w / total for t, w in mix.items()}
    counts = {t: int(v) for t, v in exact.items()}
    for t in sorted(exact, key=lambda t: exact[t] - counts[t], reverse=True)[: cases - sum(counts.values())]:
        counts[t] += 1
    return counts


def record(case: Case, extra: list[tuple[str, str]], paths: list[str]) -> dict:
    """One sharegpt line for a case whose images (or frames) are saved at `paths`."""
    tag = "<video>" if case.is_video else "<image>" * len(case.images)
    messages = [{"role": "user", "content": tag + case.question}, {"role": "assistant", "content": case.answer}]
    for q, a in extra:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    line = {"messages": messages}
    if case.is_video:
        line["videos"] = [paths]
    else:
        line["images"] = paths
    return line


def write_dataset(out: str | Path, cases: int, seed: int, extra: int = 6, mix: dict[str, float] = MIX) -> Path:
    """Render `cases` cases (set `seed`) into out/train.jsonl + out/img/; returns the jsonl path."""
    out = Path(out)
    (out / "img").mkdir(parents=True, exist_ok=True)
    counts = task_counts(cases, mix)
    order = [(t, i) for t in TASKS for i in range(counts.get(t, 0))]
    random.Random(seed).shuffle(order)  # tasks interleaved, so any prefix of the file is a fair mix
    path = out / "train.jsonl"
    with open(path, "w") as f:
        for n, (task, index) in enumerate(order):
            case = render_case(task, seed, index)
            turns = extra_turns(case, random.Random(f"extra:{seed}:{task}:{index}"), extra)
            paths = []
            for k, image in enumerate(case.images):
                paths.append(f"img/{n:08d}-{k}.png")
                image.save(out / paths[-1])
            f.write(json.dumps(record(case, turns, paths)) + "\n")
    return path


def write_single_task(out: str | Path, cases: int, seed: int, task: str, shapes: int | None) -> Path:
    """`cases` cases of one task whose picture holds exactly `shapes` shapes (the first such indices
    of `seed`; None: any number, and for a video the still shapes besides the moving one), no extra
    questions, into out/train.jsonl + out/img/. The demo's first stage is the colour of the only
    shape: one answer per picture that needs the picture, which a from-scratch tower and decoder
    learn in ~100 steps where a mix of tasks stayed at chance for 1,000."""
    out = Path(out)
    (out / "img").mkdir(parents=True, exist_ok=True)
    path = out / "train.jsonl"
    written, index = 0, 0
    with open(path, "w") as f:
        while written < cases:
            case = render_case(task, seed, index)
            index += 1
            if shapes is not None and len(case.info["shapes"]) != shapes:
                continue
            names = [f"img/{written:06d}-{k}.png" for k in range(len(case.images))]
            for image, name in zip(case.images, names):
                image.save(out / name)
            f.write(json.dumps(record(case, [], names)) + "\n")
            written += 1
    return path


def shapes_in(line: dict) -> int | None:
    """How many shapes a training line's picture holds (from its list answer); None for the videos
    and picture pairs, whose lines have no list."""
    turns = line["messages"]
    answers = [turns[i + 1]["content"] for i in range(0, len(turns) - 1, 2) if turns[i]["content"] == LIST_QUESTION]
    if not answers:
        return None
    return 0 if answers[0] == "none" else answers[0].count(",") + 1


LONG_ANSWERS = ("Where is the ", TEXT_QUESTION)  # boxes and words: many hard tokens each


def write_subset(source: str | Path, out: str | Path, max_shapes: int, pairs: bool = False,
                 boxes: bool = False) -> Path:
    """The lines of `source` whose picture holds at most `max_shapes` shapes, plus its videos (one
    shape each), into `out` (in the same folder: the image paths stay relative to it), with only
    the questions of one-word answers: lines that open with a box or a word question are left out,
    later box questions dropped. The demo's first stage: with one shape the answer is wherever the
    picture is not background, and the tower and the attention learn to find it before they must
    tell shapes apart; boxes and words, whose many hard tokens would be most of the loss, wait for
    the second stage. `pairs`: the picture pairs (which image has more shapes) too. `boxes`: the lines
    that open with a box question too (one box a line: later ones are still dropped)."""
    source, out = Path(source), Path(out)
    if out.resolve().parent != source.resolve().parent:
        raise ValueError(f"{out}: write the subset next to {source}, whose image paths are relative to its folder")
    left_out = LONG_ANSWERS[1:] if boxes else LONG_ANSWERS
    kept = 0
    with open(source) as f, open(out, "w") as g:
        for text in f:
            line = json.loads(text)
            n = shapes_in(line)
            turns = line["messages"]
            if turns[0]["content"].removeprefix("<image>").startswith(left_out):
                continue
            pair = pairs and len(line.get("images", ())) == 2
            if ("videos" in line) or pair or (n is not None and n <= max_shapes):
                qa = [turns[i:i + 2] for i in range(0, len(turns) - 1, 2)]
                short = qa[:1] + [q_a for q_a in qa[1:] if not q_a[0]["content"].startswith(LONG_ANSWERS)]
                line["messages"] = [m for q_a in short for m in q_a]
                g.write(json.dumps(line) + "\n")
                kept += 1
    print(f"{kept} lines with at most {max_shapes} shapes (and the videos{', the pairs' if pairs else ''}), "
          f"{'no words' if boxes else 'one-word answers only'} -> {out}")
    return out


def parse_range(text: str) -> tuple[int, int]:
    """"2-6" -> (2, 6); "1" -> (1, 1): how many shapes a lesson's pictures hold."""
    lo, _, hi = text.partition("-")
    return int(lo), int(hi or lo)


def parse_mix(text: str) -> dict[str, float]:
    """"color=1.5,count=1.5,video=0.5" -> {"color": 1.5, ...}: a later stage's data, weighted to its weak tasks."""
    return parse_weights(text, TASKS, "task")


def parse_weights(text: str, names, what: str) -> dict[str, float]:
    """"a=1.5,b=2" -> {"a": 1.5, "b": 2.0}, every name one of `names`, each a `what` (a --mix option's value)."""
    mix = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        if name.strip() not in names:
            raise argparse.ArgumentTypeError(f"unknown {what} {name.strip()!r} in --mix; {what}s: {', '.join(names)}")
        try:
            mix[name.strip()] = float(weight)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--mix {part!r}: the weight must be a number") from None
    return mix


def main(argv=None) -> None:
    from qwen2vl.demo.evaluate import TRAIN_SEED

    parser = argparse.ArgumentParser(description="Write the demo model's training data (sharegpt JSON lines).")
    parser.add_argument("out", help="folder for train.jsonl and img/")
    parser.add_argument("--cases", type=int)
    parser.add_argument("--seed", type=int, default=TRAIN_SEED, help=f"default {TRAIN_SEED} (the eval uses another)")
    parser.add_argument("--extra-turns", type=int, default=6, help="most extra questions per picture (default 6)")
    parser.add_argument("--mix", type=parse_mix, default=MIX, metavar="TASK=W,...", help="cases per task in "
                        "proportion to these weights; tasks left out get none (default "
                        + ",".join(f"{t}={w:g}" for t, w in MIX.items()) + ")")
    parser.add_argument("--subset-of", metavar="TRAIN_JSONL", help="instead: write to OUT (a .jsonl next to "
                        "TRAIN_JSONL) its lines whose picture holds at most --max-shapes shapes, and its videos")
    parser.add_argument("--max-shapes", type=int, default=1)
    parser.add_argument("--pairs", action="store_true", help="with --subset-of: keep the picture pairs too")
    parser.add_argument("--boxes", action="store_true", help="with --subset-of: keep the lines that "
                        "open with a box question too")
    parser.add_argument("--only", metavar="TASK", choices=(*EXTRA_TASKS, "video"), help="instead: --cases cases "
                        "of this task whose picture holds exactly --shapes shapes, without extra questions")
    parser.add_argument("--shapes", type=int, help="with --only: how many shapes (a video: still ones besides "
                        "the moving one); default any")
    parser.add_argument("--fraction", metavar="LO-HI", help="with --kinds: shape sides as this share of the "
                        "shorter side (default the suite's 0.12-0.25)")
    parser.add_argument("--kinds", metavar="LO-HI", help="instead: --cases pictures of LO-HI shapes in distinct "
                        "colours, each asked 'Which shape is {color}?' (a lesson in the shapes' kinds)")
    parser.add_argument("--colors", action="store_true", help="instead: --cases pictures of 1-6 shapes in distinct "
                        "colours, each kind drawn once asked 'What color is the {kind}?' (looking a kind up)")
    parser.add_argument("--counts", action="store_true", help="instead: --cases pictures of 0-6 shapes, each asked "
                        "'How many {kind}s are there?' of every kind drawn and 'How many shapes are there?'")
    parser.add_argument("--where", metavar="LO-HI", help="instead: --cases pictures of LO-HI shapes, no two alike, "
                        "each asked 'Where is the {color} {kind}?' (boxes, several a picture)")
    parser.add_argument("--words", metavar="LO-HI", help="instead: --cases pictures of one word of LO-HI characters "
                        "(A-Z0-9) in black, nothing else, asked 'What does the text say?' (reading)")
    parser.add_argument("--font", metavar="LO-HI", default="18-40", help="with --words: font sizes (default the "
                        "suite's 18-40)")
    parser.add_argument("--side", type=int, help=f"with --where or --words: every picture SIDE x SIDE "
                        f"({MIN_SIDE}-{MAX_SIDE}; default the suite's random sizes)")
    parser.add_argument("--strip", action="store_true", help="with --words: each picture just big enough for its "
                        "word (56 px tall; a tenth of a suite picture's tokens)")
    args = parser.parse_args(argv)
    if args.strip and (not args.words or args.side is not None):
        parser.error("--strip goes with --words, without --side")
    if args.side is not None and not ((args.where or args.words) and MIN_SIDE <= args.side <= MAX_SIDE):
        parser.error(f"--side goes with --where or --words and is {MIN_SIDE}-{MAX_SIDE} px")
    if args.words:
        letters, sizes = parse_range(args.words), parse_range(args.font)
        try:
            print(write_word_set(args.out, args.cases, args.seed, letters, sizes, args.side, args.strip))
        except ValueError as e:
            parser.error(str(e))
        return
    if args.where:
        print(write_box_set(args.out, args.cases, args.seed, parse_range(args.where), args.side))
        return
    if args.colors:
        print(write_color_set(args.out, args.cases, args.seed))
        return
    if args.counts:
        print(write_count_set(args.out, args.cases, args.seed))
        return
    if args.kinds:
        fraction = tuple(map(float, args.fraction.split("-"))) if args.fraction else None
        print(write_kind_set(args.out, args.cases, args.seed, parse_range(args.kinds), fraction))
        return
    if args.only:
        print(write_single_task(args.out, args.cases, args.seed, args.only, args.shapes))
        return
    if args.subset_of:
        write_subset(args.subset_of, args.out, args.max_shapes, args.pairs, args.boxes)
        return
    if args.cases is None:
        parser.error("--cases is required")
    print(write_dataset(args.out, args.cases, args.seed, args.extra_turns, args.mix))


if __name__ == "__main__":
    main()
