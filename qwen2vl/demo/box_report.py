"""Where the demo's boxes go wrong, digit by digit.

    python -m qwen2vl.demo.box_report [MODEL] [--cases 200] [--seed 20251]

renders the suite's grounding cases (as `qwen2vl eval` does), answers them greedily through `LLM` and
prints, besides the share right (IoU >= 0.5): how many answers are a well-formed box, how often the shape
nearest the box (centre to centre) is the named one, and when not, whether it has the named colour (the
kind mistaken) or not; how often each of a box's four numbers (0-1000) has the right hundreds digit, how
often its tens digit is right where the hundreds is, and the numbers' error in quantiles.

Why (docs/demo.md, "Where the boxes are lost"): IoU >= 0.5 hides where a box is lost. Among other shapes,
every decoder trained so far boxes the named one no more often than a random pick would, and on lone shapes
it gets the hundreds digit right 67-85% of the time and the tens digit at chance (10%): its boxes are as fine
as a tenth of the picture and no finer. A change that finds the shape, or teaches the tens digit, shows here
long before it moves the share right.

With `--every-shape`, each picture of two shapes or more is also asked the box of every shape it holds, and the
report says how often one picture's answers all land nearest one shape whatever the name, and how often that
shape is the leftmost (docs/demo.md: every decoder so far boxes one shape, most often the leftmost, whatever
shape is named).
"""

from __future__ import annotations

import argparse
import re

from qwen2vl.demo.evaluate import EVAL_SEED, run_llm
from qwen2vl.demo.scenes import box_1000
from qwen2vl.demo.score import score
from qwen2vl.demo.tasks import Case, box_answer, render_cases, where_question
from qwen2vl.grounding import BOX_START


def box_numbers(text: str) -> list[int] | None:
    """The four numbers of the box after the last <|box_start|> in `text`, or None if it has no such box."""
    if BOX_START not in text:
        return None
    numbers = [int(n) for n in re.findall(r"\d+", text.split(BOX_START)[-1])[:4]]
    return numbers if len(numbers) == 4 else None


def digit_report(cases: list[Case], answers: list[str]) -> dict[str, float]:
    """Over grounding cases and their answers: shares right (of all, of lone shapes, of shapes among others) and
    formed; of the formed, the share whose nearest shape is the named one (and that share for a shape picked at
    random), or another of its colour; the numbers' hundreds and tens digits right (tens among those whose
    hundreds are right), and their absolute error's median and 90th percentile."""
    right = formed = found = same_color = hundreds = tens = alone = alone_right = 0
    errors = []
    for case, answer in zip(cases, answers, strict=True):
        ok = score(case, answer)
        right += ok
        if len(case.info["shapes"]) == 1:
            alone += 1
            alone_right += ok
        got, true = box_numbers(answer), box_numbers(case.answer)
        if got is None:
            continue
        formed += 1
        nearest = _nearest(case, got)
        named = next(shape for shape in case.info["shapes"] if shape.box == case.info["box"])
        found += nearest == named
        same_color += nearest != named and nearest.color == named.color
        for a, b in zip(got, true):
            errors.append(abs(a - b))
            if a // 100 == b // 100:
                hundreds += 1
                tens += (a // 10) % 10 == (b // 10) % 10
    errors.sort()
    return {"cases": len(cases), "right": right / max(len(cases), 1), "formed": formed / max(len(cases), 1),
            "right alone": alone_right / max(alone, 1), "right among others": (right - alone_right) / max(
                len(cases) - alone, 1),
            "found": found / max(formed, 1), "same colour": same_color / max(formed, 1),
            "found by chance": sum(1 / len(case.info["shapes"]) for case in cases) / max(len(cases), 1),
            "hundreds": hundreds / max(len(errors), 1), "tens": tens / max(hundreds, 1),
            "median error": _quantile(errors, 0.5), "p90 error": _quantile(errors, 0.9)}


def _nearest(case: Case, box: list[int]):
    """The case's shape whose square's centre is nearest the centre of `box` (on the 0-1000 scale)."""
    width, height = case.images[0].size
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2

    def distance(shape) -> float:
        x1, y1, x2, y2 = box_1000(shape.box, width, height)
        return ((x1 + x2) / 2 - cx) ** 2 + ((y1 + y2) / 2 - cy) ** 2

    return min(case.info["shapes"], key=distance)


def every_shape(cases: list[Case]) -> list[list[Case]]:
    """For each case whose picture holds two shapes or more that its name alone tells apart: the same picture
    asked the box of each of them."""
    pictures = []
    for case in cases:
        names = [shape.name for shape in case.info["shapes"]]
        told = [shape for shape in case.info["shapes"] if names.count(shape.name) == 1]
        if len(told) > 1:
            size, shapes = case.images[0].size, case.info["shapes"]
            pictures.append([Case("grounding", case.images, where_question(shape), box_answer(shape, *size),
                                  info={"shapes": shapes, "box": shape.box}) for shape in told])
    return pictures


def name_report(pictures: list[list[Case]], answers: list[list[str]]) -> dict[str, float]:
    """Over pictures each asked every shape's box: the share of pictures whose formed answers all land nearest
    one shape, and of those, the share where it is the leftmost (and that share for a shape picked at random)."""
    one = leftmost = chance = 0
    for cases, said in zip(pictures, answers, strict=True):
        boxes = [box for box in map(box_numbers, said) if box is not None]
        landed = {_nearest(cases[0], box) for box in boxes}
        if len(boxes) > 1 and len(landed) == 1:
            one += 1
            leftmost += landed.pop() == min(cases[0].info["shapes"], key=lambda shape: shape.box[0] + shape.box[2])
            chance += 1 / len(cases[0].info["shapes"])
    return {"pictures": len(pictures), "one shape": one / max(len(pictures), 1), "leftmost": leftmost / max(one, 1),
            "leftmost by chance": chance / max(one, 1)}


def _quantile(ordered: list[int], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def format_report(model: str, report: dict[str, float]) -> str:
    return (f"{model}: {report['cases']} grounding cases, {report['right']:.1%} right (IoU >= 0.5; "
            f"{report['right alone']:.1%} of lone shapes, {report['right among others']:.1%} among others), "
            f"{report['formed']:.1%} a box; the nearest shape the named one in {report['found']:.1%} (one picked at "
            f"random: {report['found by chance']:.1%}), another "
            f"of its colour in {report['same colour']:.1%}; numbers: hundreds digit right {report['hundreds']:.1%}, "
            f"tens digit right where the hundreds is {report['tens']:.1%} (chance 10%); error median "
            f"{report['median error']}, "
            f"90th percentile {report['p90 error']} (of 1000)")


def main(argv=None) -> None:
    from qwen2vl.engine.llm import LLM

    parser = argparse.ArgumentParser(description="Where the demo's boxes go wrong, digit by digit.")
    parser.add_argument("model", nargs="?", default="demo")
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--seed", type=int, default=EVAL_SEED)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--every-shape", action="store_true", help="also ask every shape of each picture")
    args = parser.parse_args(argv)
    llm = LLM(args.model, device=args.device)
    cases = render_cases(args.seed, args.cases, ["grounding"])
    print(format_report(args.model, digit_report(cases, run_llm(llm, cases))))
    if args.every_shape:
        pictures = every_shape(cases)
        said = iter(run_llm(llm, [case for picture in pictures for case in picture]))
        named = name_report(pictures, [[next(said) for _ in picture] for picture in pictures])
        print(f"every shape asked in {named['pictures']} pictures of 2-6 shapes: the answers all land nearest one "
              f"shape in {named['one shape']:.1%}; that shape is the leftmost in {named['leftmost']:.1%} of those "
              f"(a shape picked at random: {named['leftmost by chance']:.1%})")


if __name__ == "__main__":
    main()
