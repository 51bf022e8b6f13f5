"""How much of a word the demo reads, character by character.

    python -m qwen2vl.demo.read_report [MODEL] [--cases 200] [--seed 20251] [--strips 300] [--strip-seed 9602]

answers the suite's text cases (as `qwen2vl eval` renders them) and held-out strips (the word alone on a
picture just big enough for it, as `python -m qwen2vl.demo.dataset DIR --words 3-6 --strip --seed S` writes
them) greedily through `LLM`, and prints for each: the characters right in place (answer and word compared
position by position, over the words' characters), the first characters right, and the words read whole.

Why (docs/demo.md, "Reading on strips"): the text goal counts whole words, and every decoder so far reads
none or few; the characters in place move long before the words do, and tell a run that starts reading from
one that does not. The figures the docs give since "Reading on strips" are these (the strips of seed 9602:
1,336 characters; the suite's 200 text cases of seed 20251: 893).
"""

from __future__ import annotations

import argparse

from qwen2vl.demo.evaluate import EVAL_SEED, run_llm
from qwen2vl.demo.lessons import lesson_case, word_lesson
from qwen2vl.demo.tasks import Case, render_cases

STRIP_SEED = 9602


def strip_cases(seed: int, cases: int) -> list[Case]:
    """The strips `python -m qwen2vl.demo.dataset DIR --words 3-6 --strip --seed SEED` writes, as cases."""
    name, lesson = word_lesson(seed, strip=True)
    out = []
    for index in range(cases):
        image, [(question, word)] = lesson_case(name, lesson, index)
        out.append(Case("text", [image], question, word, info={"word": word}))
    return out


def reading(words: list[str], answers: list[str]) -> dict[str, int]:
    """Characters right in place (of all the words' characters), first characters right, words read whole."""
    said = [answer.strip() for answer in answers]
    return {"words": len(words), "characters": sum(map(len, words)),
            "in place": sum(a == b for word, answer in zip(words, said, strict=True) for a, b in zip(word, answer)),
            "first": sum(answer[:1] == word[:1] for word, answer in zip(words, said, strict=True)),
            "whole": sum(answer == word for word, answer in zip(words, said, strict=True))}


def format_reading(name: str, report: dict[str, int]) -> str:
    return (f"{name}: {report['in place']} of {report['characters']} characters in place "
            f"({report['in place'] / max(report['characters'], 1):.1%}), {report['first']} of {report['words']} "
            f"first characters, {report['whole']} words whole ({report['whole'] / max(report['words'], 1):.1%})")


def main(argv=None) -> None:
    from qwen2vl.engine.llm import LLM

    parser = argparse.ArgumentParser(description="How much of a word the demo reads, character by character.")
    parser.add_argument("model", nargs="?", default="demo")
    parser.add_argument("--cases", type=int, default=200, help="the suite's text cases (0: none)")
    parser.add_argument("--seed", type=int, default=EVAL_SEED)
    parser.add_argument("--strips", type=int, default=300, help="held-out strips (0: none)")
    parser.add_argument("--strip-seed", type=int, default=STRIP_SEED)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--show", type=int, default=0, help="print the first N words and answers of each set")
    args = parser.parse_args(argv)
    llm = LLM(args.model, device=args.device)
    for name, cases in (("suite", render_cases(args.seed, args.cases, ["text"])),
                        ("strips", strip_cases(args.strip_seed, args.strips))):
        if not cases:
            continue
        answers = run_llm(llm, cases)
        print(format_reading(f"{args.model} {name}", reading([case.answer for case in cases], answers)))
        for case, answer in list(zip(cases, answers))[:args.show]:
            print(f"  {case.answer} -> {answer.strip()}")


if __name__ == "__main__":
    main()
