"""The box report (qwen2vl/demo/box_report.py): a box's numbers are read from the answer, and their digits are
counted right against the case's own box."""

from __future__ import annotations

import re

from qwen2vl.demo.box_report import box_numbers, digit_report, every_shape, format_report, name_report
from qwen2vl.demo.scenes import Shape, box_1000
from qwen2vl.demo.tasks import Case, render_cases


def with_tens_moved(answer: str) -> str:
    """`answer` with every number's tens digit moved by 5 (mod 10): hundreds kept, each number off by 50."""
    head, box = answer.split("<|box_start|>")
    moved = re.sub(r"\d+", lambda m: str(int(m[0]) // 100 * 100 + (int(m[0]) // 10 % 10 + 5) % 10 * 10
                                         + int(m[0]) % 10), box)
    return head + "<|box_start|>" + moved


def test_box_numbers_come_from_the_last_box():
    assert box_numbers("<|box_start|>(1,2),(3,4)<|box_end|> and <|box_start|>(10,20),(300,999)<|box_end|>") == [
        10, 20, 300, 999]
    assert box_numbers("a red circle") is None
    assert box_numbers("<|box_start|>(1,2)<|box_end|>") is None


def test_digits_are_counted_against_the_cases_box():
    cases = render_cases(7, 3, ["grounding"])
    answers = [cases[0].answer, with_tens_moved(cases[1].answer), "the red circle"]
    report = digit_report(cases, answers)
    assert report["cases"] == 3 and report["formed"] == 2 / 3
    assert report["found"] >= 0.5  # the first is the named shape's own box
    assert report["hundreds"] == 1.0  # 8 numbers, the hundreds of each kept
    assert report["tens"] == 0.5  # the first answer's 4 tens right, the second's 4 moved
    assert report["median error"] == 50 and report["p90 error"] == 50  # 0, 0, 0, 0, 50, 50, 50, 50
    assert report["right"] >= 1 / 3  # the first is the case's own answer; the third has no box
    assert "tens digit right where the hundreds is 50.0%" in format_report("m", report)


def test_lone_shapes_are_told_apart_from_shapes_among_others():
    cases = render_cases(10, 60, ["grounding"])
    alone = [len(c.info["shapes"]) == 1 for c in cases]
    answers = [c.answer if one else "none" for c, one in zip(cases, alone)]  # every lone shape right, no other
    report = digit_report(cases, answers)
    assert report["right alone"] == 1.0 and report["right among others"] == 0
    assert report["right"] == sum(alone) / len(cases) and 0 < sum(alone) < len(cases)


def test_no_boxes_at_all_reports_none_formed():
    cases = render_cases(8, 2, ["grounding"])
    report = digit_report(cases, ["no", "idea"])
    assert report["formed"] == 0 and report["right"] == 0 and report["hundreds"] == 0


def test_a_box_on_another_shape_is_not_found_and_its_colour_is_told():
    cases = [c for c in render_cases(9, 40, ["grounding"]) if len(c.info["shapes"]) >= 2]
    named = [next(s for s in c.info["shapes"] if s.box == c.info["box"]) for c in cases]
    others = [next(s for s in c.info["shapes"] if s != n) for c, n in zip(cases, named)]
    answers = [c.answer.split("<|box_start|>")[0] + "<|box_start|>({},{}),({},{})<|box_end|>".format(
        *box_1000(o.box, *c.images[0].size)) for c, o in zip(cases, others)]
    report = digit_report(cases, answers)
    assert report["found"] == 0 and report["right"] == 0
    assert report["right alone"] == 0 and report["right among others"] == 0
    assert report["found by chance"] == sum(1 / len(c.info["shapes"]) for c in cases) / len(cases) < 0.5
    same = sum(o.color == n.color for o, n in zip(others, named))
    assert report["same colour"] == same / len(cases) and 0 < same < len(cases)


def picture_of(*shapes: Shape) -> Case:
    case = render_cases(7, 1, ["grounding"])[0]  # its picture serves as any: only the shapes listed are scored
    return Case("grounding", case.images, "", "", info={"shapes": list(shapes), "box": shapes[0].box})


def test_every_shape_asks_each_shape_its_name_tells_apart():
    red, blue, blue_too, green = (Shape("circle", "red", 10, 10, 30), Shape("square", "blue", 60, 10, 30),
                                  Shape("square", "blue", 10, 60, 30), Shape("triangle", "green", 60, 60, 30))
    pictures = every_shape([picture_of(red, blue, blue_too, green), picture_of(red, blue, blue_too),
                            picture_of(green)])
    assert len(pictures) == 1  # the second tells one shape apart, the third holds one
    assert [case.question for case in pictures[0]] == ["Where is the red circle?", "Where is the green triangle?"]
    assert [case.info["box"] for case in pictures[0]] == [red.box, green.box]
    assert "(" in pictures[0][1].answer and "the green triangle" in pictures[0][1].answer


def test_name_report_tells_answers_that_ignore_the_name():
    left, middle, right = (Shape("circle", "red", 10, 10, 30), Shape("square", "blue", 100, 10, 30),
                           Shape("triangle", "green", 200, 10, 30))
    picture = every_shape([picture_of(left, middle, right)])[0]
    leftmost = picture[0].answer  # every answer the leftmost shape's box
    report = name_report([picture, picture], [[leftmost] * 3, [case.answer for case in picture]])
    assert report == {"pictures": 2, "one shape": 0.5, "leftmost": 1.0, "leftmost by chance": 1 / 3}
    report = name_report([picture], [[picture[2].answer, picture[2].answer, "no box"]])
    assert report["one shape"] == 1.0 and report["leftmost"] == 0.0
