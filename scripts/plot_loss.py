"""Draw a `qwen2vl train` log's loss curve as a PNG (PIL only: no plotting library needed).

    python scripts/plot_loss.py train.log docs/demo_loss.png

Reads the progress lines (`step 10/2500 | ... | loss 4.1234 | ...`) and the held-out lines
(`step 250/2500 | eval loss 0.5678`); draws the training loss (thin), its moving average (thick) and
the held-out loss (dots) on a log scale. A log of several runs (stages) one after another is one
curve, each stage after the last, with a grey line where a stage begins.
"""

from __future__ import annotations

import math
import re
import sys

from PIL import Image, ImageDraw, ImageFont

TRAIN = re.compile(r"step (\d+)/(\d+) \|.*?\| loss ([0-9.]+) \|")
HELD_OUT = re.compile(r"step (\d+)/(\d+) \| eval loss ([0-9.]+)")
W, H, PAD = 900, 500, 70


def read_log(path: str) -> tuple[list[tuple[int, float]], list[tuple[int, float]], list[int]]:
    """(train, held_out, stage starts): a log of several runs one after another (stages, each
    counting its steps from 1) is drawn as one curve, each stage's steps after the last one's."""
    train, held_out, starts = [], [], [0]
    offset, previous = 0, 0
    for line in open(path, encoding="utf-8"):
        m = HELD_OUT.search(line) or TRAIN.search(line)
        if not m:
            continue
        step = int(m[1])
        if step < previous:  # the next stage counts from 1 again
            offset += previous
            starts.append(offset)
        previous = step
        (held_out if m.re is HELD_OUT else train).append((offset + step, float(m[3])))
    return train, held_out, starts


def plot(train, held_out, out: str, title: str, starts=()) -> None:
    image = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=14)
    last = max(s for s, _ in train + held_out)
    values = [v for _, v in train + held_out if v > 0]
    lo, hi = math.log10(min(values)), math.log10(max(values))
    lo, hi = math.floor(lo), math.ceil(hi)

    def xy(step, value):
        x = PAD + (W - 2 * PAD) * step / last
        y = H - PAD - (H - 2 * PAD) * (math.log10(max(value, 10**lo)) - lo) / (hi - lo)
        return x, y

    draw.rectangle((PAD, PAD, W - PAD, H - PAD), outline="black")
    for e in range(lo, hi + 1):
        for mult in (1, 2, 5):
            v = mult * 10**e
            if 10**lo <= v <= 10**hi:
                _, y = xy(0, v)
                draw.line((PAD, y, W - PAD, y), fill=(225, 225, 225))
                draw.text((PAD - 8, y), f"{v:g}", fill="black", font=font, anchor="rm")
    for k in range(6):
        step = round(last * k / 5)
        x, _ = xy(step, 10**lo)
        draw.text((x, H - PAD + 8), str(step), fill="black", font=font, anchor="mt")
    draw.text((W / 2, H - 25), "optimizer step", fill="black", font=font, anchor="mm")
    draw.text((W / 2, 30), title, fill="black", font=font, anchor="mm")
    if len(train) > 1:
        draw.line([xy(s, v) for s, v in train], fill=(160, 190, 230), width=1)
        k = max(1, len(train) // 50)
        smooth = [(train[i][0], sum(v for _, v in train[max(0, i - k):i + 1]) / len(train[max(0, i - k):i + 1]))
                  for i in range(len(train))]
        draw.line([xy(s, v) for s, v in smooth], fill=(30, 80, 180), width=3)
    for start in starts[1:]:  # where each later stage begins
        x, _ = xy(start, 10**lo)
        draw.line((x, PAD, x, H - PAD), fill=(150, 150, 150), width=1)
    for s, v in held_out:
        x, y = xy(s, v)
        draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=(220, 80, 30))
    draw.text((W - PAD - 10, PAD + 10), "train loss (blue), held-out loss (orange)", fill="black", font=font,
              anchor="ra")
    image.save(out)


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit("usage: python scripts/plot_loss.py TRAIN_LOG OUT.png [TITLE]")
    train, held_out, starts = read_log(sys.argv[1])
    if not train:
        sys.exit(f"{sys.argv[1]}: no 'step N/M | ... | loss X' lines")
    plot(train, held_out, sys.argv[2], sys.argv[3] if len(sys.argv) == 4 else "qwen2vl train: demo model", starts)
