"""Edge maps for ControlNet: Canny control images and the edge-agreement score (F1 with a pixel tolerance).

The control of SANA-Sprint-ControlNet is an edge map (paper §3.4: HED scribbles); ours is scikit-image's
Canny detector on each colour channel, the three maps OR-ed (on luminance alone the shapes benchmark's green
has a contrast of 0.05 against its grey background, under Canny's thresholds: green objects had no edges),
drawn as a control image that the run's VAE encodes like any image.
Colours: white lines on black, as ControlNet's Canny models take them, except in the shapes benchmark's
learned autoencoder, whose 8x8x8 bottleneck only knows the benchmark's grey background and four colours:
1-pixel lines come back from its encode/decode with edge F1 0.00 white on black, 0.14 white on grey, 0.43 black
on grey, 0.999 yellow on grey (64 validation scenes); so shapes control images are yellow on grey.

The score (`edge_f1`): precision is the fraction of the generated image's edge pixels within `tolerance`
pixels (Euclidean) of a control edge pixel, recall the fraction of control edge pixels within `tolerance`
of a generated one, F1 their harmonic mean (the BSDS boundary measure without one-to-one matching).
"""

from __future__ import annotations

import numpy as np

SIGMA = 1.0  # Canny's Gaussian; on the 32x32 shapes renders 1.0 traces each object's outline once
TOLERANCE = 1.0  # pixels, of the edge-agreement score
WHITE_ON_BLACK = ((255, 255, 255), (0, 0, 0))
SHAPES_COLORS = ((230, 210, 40), (128, 128, 128))  # shapes.COLORS["yellow"] on shapes.BACKGROUND


def canny(images: np.ndarray, sigma: float = SIGMA) -> np.ndarray:
    """uint8 [B, H, W, 3] -> bool [B, H, W] edge maps: scikit-image's Canny (default thresholds) on each
    channel in [0, 1], OR-ed."""
    from skimage.feature import canny as sk_canny

    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [B, H, W, 3], got {images.shape}")
    x = images.astype(np.float64) / 255.0
    return np.stack([np.logical_or.reduce([sk_canny(img[..., c], sigma=sigma) for c in range(3)]) for img in x])


def control_images(edges: np.ndarray, colors=WHITE_ON_BLACK) -> np.ndarray:
    """bool [B, H, W] -> uint8 [B, H, W, 3]: edge pixels in colors[0], the rest in colors[1]."""
    on, off = (np.asarray(c, np.uint8) for c in colors)
    return np.where(np.asarray(edges, bool)[..., None], on, off).astype(np.uint8)


def edge_f1(pred: np.ndarray, ref: np.ndarray, tolerance: float = TOLERANCE) -> np.ndarray:
    """Per-image F1 [B] of edge maps bool [B, H, W] (`pred` generated, `ref` the control's); 1 when both are
    empty, 0 when only one is."""
    from scipy import ndimage

    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    if pred.shape != ref.shape or pred.ndim != 3:
        raise ValueError(f"edge maps must both be [B, H, W], got {pred.shape} and {ref.shape}")
    out = np.empty(len(pred))
    for i, (p, r) in enumerate(zip(pred, ref, strict=True)):
        if not p.any() or not r.any():
            out[i] = float(p.any() == r.any())
            continue
        near_r = ndimage.distance_transform_edt(~r) <= tolerance  # within tolerance of a reference edge
        near_p = ndimage.distance_transform_edt(~p) <= tolerance
        precision, recall = near_r[p].mean(), near_p[r].mean()
        out[i] = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return out
