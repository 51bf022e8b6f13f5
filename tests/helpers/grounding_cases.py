"""Answers as Qwen2-VL writes them (and breaks them), with the regions they name: checked against the
Python parser (tests/test_grounding.py) and the web page's (tests/test_web.py)."""

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
