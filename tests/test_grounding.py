"""Grounding markup -> pixel regions, a table of answers as Qwen2-VL writes them (and breaks them)."""

import pytest
from PIL import Image

from qwen2vl.grounding import Region, draw_regions, drop_markup, parse_grounding, strip_grounding
from tests.helpers.grounding_cases import CASES, B, Q, R, b, q, r


@pytest.mark.parametrize("text, width, height, expected", CASES)
def test_parse_grounding(text, width, height, expected):
    regions = parse_grounding(text, width, height)
    assert [(g.label, g.points) for g in regions] == expected


def test_region_dict_and_bbox():
    box, quad = parse_grounding(f"{R}a{r}{B}(100,200),(300,400){b}{Q}(0,0),(10,0),(10,10),(0,10){q}", 2000, 1000)
    assert box.to_dict() == {"label": "a", "type": "box", "box": [200, 200, 600, 400]}
    assert quad.kind == "quad" and quad.bbox == (0, 0, 20, 10)
    assert quad.to_dict()["points"] == [[0, 0], [20, 0], [20, 10], [0, 10]]


@pytest.mark.parametrize("text, expected", [
    (f"The {R}dog{r}{B}(1,2),(3,4){b} sleeps.", "The dog sleeps."),
    (f"{R}sign{r}{Q}(1,2),(3,4),(5,6),(7,8){q}", "sign"),
    ("plain text", "plain text"),
    (f"stray {b} token", "stray  token"),
])
def test_strip_grounding(text, expected):
    assert strip_grounding(text) == expected


def test_drop_markup_keeps_labels_and_coordinates():
    assert drop_markup(f"The {R}dog{r}{B}(1,2),(3,4){b}.") == "The dog(1,2),(3,4)."
    assert drop_markup(f"{Q}(1,2),(3,4),(5,6),(7,8){q}") == "(1,2),(3,4),(5,6),(7,8)"


def test_bad_image_size():
    with pytest.raises(ValueError, match="at least 1x1"):
        parse_grounding("", 0, 10)


def test_draw_regions_colours_the_outline():
    image = Image.new("RGB", (200, 100), "white")
    quad = Region(None, ((0, 0), (50, 0), (50, 50), (0, 50)))
    out = draw_regions(image, [Region("dog", ((20, 30), (120, 90))), quad])
    assert out.size == image.size and image.getpixel((20, 60)) == (255, 255, 255)  # input untouched
    assert out.getpixel((20, 60)) != (255, 255, 255)  # left edge of the box
    assert out.getpixel((70, 60)) == (255, 255, 255)  # inside the box stays clear
    assert out.getpixel((22, 25)) != (255, 255, 255)  # label background above the box
