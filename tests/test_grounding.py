"""Grounding markup -> pixel regions, a table of answers as Qwen2-VL writes them (and breaks them)."""

import pytest
from PIL import Image

from qwen2vl.grounding import Region, draw_regions, drop_markup, parse_grounding, strip_grounding

R, r = "<|object_ref_start|>", "<|object_ref_end|>"
B, b = "<|box_start|>", "<|box_end|>"
Q, q = "<|quad_start|>", "<|quad_end|>"

CASES = [
    # (answer, image width, height, expected [(label, points)])
    ("no markup at all", 640, 480, []),
    (f"{R}the dog{r}{B}(100,200),(500,750){b}", 1000, 1000, [("the dog", ((100, 200), (500, 750)))]),
    # 0-1000 scale -> pixels of the original image, rounded
    (f"{R}dog{r}{B}(100,200),(500,750){b}", 640, 480, [("dog", ((64, 96), (320, 360)))]),
    (f"{R}cat{r}{B}(0,0),(1000,1000){b}", 333, 777, [("cat", ((0, 0), (333, 777)))]),
    # spaces inside the coordinates, text around the markup
    (f"It is here: {R} red car {r}{B}( 10 , 20 ),( 30 , 40 ){b}.", 1000, 1000, [("red car", ((10, 20), (30, 40)))]),
    # one label, two boxes; then a second label
    (f"{R}cups{r}{B}(1,2),(3,4){b}{B}(5,6),(7,8){b} and {R}plate{r}{B}(9,10),(11,12){b}", 1000, 1000,
     [("cups", ((1, 2), (3, 4))), ("cups", ((5, 6), (7, 8))), ("plate", ((9, 10), (11, 12)))]),
    # a box without a label
    (f"{B}(100,100),(200,200){b}", 500, 500, [(None, ((50, 50), (100, 100)))]),
    # corners in the wrong order are normalized
    (f"{R}x{r}{B}(500,600),(100,200){b}", 1000, 1000, [("x", ((100, 200), (500, 600)))]),
    # out of range clamped to the image
    (f"{R}edge{r}{B}(-5,990),(1200,1010){b}", 200, 100, [("edge", ((0, 99), (200, 100)))]),
    # a quad (OCR text line): four corners kept in order
    (f"{R}STOP{r}{Q}(100,100),(900,120),(880,300),(90,280){q}", 1000, 500,
     [("STOP", ((100, 50), (900, 60), (880, 150), (90, 140)))]),
    # malformed pieces are skipped: no end token, one point, words, three-point quad
    (f"{R}a{r}{B}(1,2),(3,4)", 1000, 1000, []),
    (f"{R}a{r}{B}(1,2){b}", 1000, 1000, []),
    (f"{R}a{r}{B}(x,y),(3,4){b}", 1000, 1000, []),
    (f"{Q}(1,2),(3,4),(5,6){q}", 1000, 1000, []),
    # a broken box does not hide a good one after it
    (f"{B}(1,2){b}{R}ok{r}{B}(10,20),(30,40){b}", 1000, 1000, [("ok", ((10, 20), (30, 40)))]),
    # decimals are accepted and rounded
    (f"{B}(10.4,20.6),(30,40){b}", 1000, 1000, [(None, ((10, 21), (30, 40)))]),
    # an empty label counts as none
    (f"{R}  {r}{B}(1,2),(3,4){b}", 1000, 1000, [(None, ((1, 2), (3, 4)))]),
]


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
