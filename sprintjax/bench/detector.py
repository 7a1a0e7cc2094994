"""A deterministic detector for the shapes dataset and a GenEval-style compositional score.

Each pixel takes the nearest palette colour (or the background) if it is close enough; connected regions of
one colour are objects; the fill ratio of a region inside its bounding box names the shape (square ~1.0,
circle ~pi/4, triangle ~1/2). A caption is satisfied when the objects it asks for are there (single), there
exactly twice (counting), or there in the stated relation (position), as GenEval scores its tasks.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from sprintjax.bench.shapes import BACKGROUND, COLORS, Scene

MAX_DIST = 60.0  # RGB distance within which a pixel counts as a palette colour
MIN_AREA = 12  # pixels; smaller regions are noise
MARGIN = 2.0  # pixels of centroid offset a relation needs


@dataclasses.dataclass(frozen=True)
class Detection:
    color: str
    shape: str
    cx: float
    cy: float
    area: int


def _shape_of(fill: float) -> str:
    if fill > 0.88:
        return "square"
    return "circle" if fill > 0.64 else "triangle"


def detect(image: np.ndarray) -> list[Detection]:
    """Objects in one uint8 [H, W, 3] image."""
    names = ["background", *COLORS]
    palette = np.array([BACKGROUND, *COLORS.values()], np.float32)
    dist = np.linalg.norm(image.astype(np.float32)[:, :, None, :] - palette[None, None], axis=-1)
    label = np.where(dist.min(-1) <= MAX_DIST, dist.argmin(-1), 0)
    found = []
    for k, color in enumerate(names[1:], start=1):
        regions, n = ndimage.label(label == k)
        for i in range(1, n + 1):
            ys, xs = np.nonzero(regions == i)
            if len(ys) < MIN_AREA:
                continue
            box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
            found.append(Detection(color, _shape_of(len(ys) / box), float(xs.mean()), float(ys.mean()), len(ys)))
    return found


def satisfied(sc: Scene, dets: list[Detection]) -> bool:
    """Whether the detections satisfy the scene's caption."""
    def matching(obj):
        return [d for d in dets if d.color == obj.color and d.shape == obj.shape]

    if sc.kind == "single":
        return len(matching(sc.objects[0])) >= 1
    if sc.kind == "count":
        return len(matching(sc.objects[0])) == 2
    a, b = matching(sc.objects[0]), matching(sc.objects[1])
    if not a or not b:
        return False
    a, b = max(a, key=lambda d: d.area), max(b, key=lambda d: d.area)
    return {"to the left of": a.cx + MARGIN < b.cx, "to the right of": a.cx > b.cx + MARGIN,
            "above": a.cy + MARGIN < b.cy, "below": a.cy > b.cy + MARGIN}[sc.relation]


def compositional_score(images: np.ndarray, scenes: list[Scene]) -> dict:
    """Fraction of images satisfying their captions, overall and per task."""
    ok = np.array([satisfied(sc, detect(img)) for img, sc in zip(images, scenes, strict=True)])
    kinds = np.array([sc.kind for sc in scenes])
    out = {"compositional": float(ok.mean())}
    for kind in ("single", "count", "relation"):
        if (kinds == kind).any():
            out[f"compositional_{kind}"] = float(ok[kinds == kind].mean())
    return out
