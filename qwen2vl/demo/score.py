"""Is an answer right? Exact text for every task but grounding, where the box must overlap the
shape's square with IoU >= 0.5 (the usual detection threshold)."""

from __future__ import annotations

from qwen2vl.demo.tasks import Case
from qwen2vl.grounding import parse_grounding

MIN_IOU = 0.5


def iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, w) * max(0.0, h)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def score(case: Case, output: str) -> bool:
    """True when `output` (decoded with special tokens kept) answers `case`."""
    if case.task != "grounding":
        return output.strip() == case.answer
    width, height = case.images[0].size
    regions = [r for r in parse_grounding(output, width, height) if r.kind == "box"]
    return len(regions) == 1 and iou(regions[0].bbox, case.info["box"]) >= MIN_IOU
