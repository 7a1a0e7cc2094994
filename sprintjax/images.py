"""PNG grids of latents, for people who would rather look than read."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from sprintjax.fileio import atomic_write_bytes


def latents_to_rgb(latents: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """[B, C, H, W] latents -> [B, H, W, 3] uint8 from the first three channels, clipped to [lo, hi]."""
    rgb = np.asarray(latents, np.float32)[:, :3]
    if rgb.shape[1] < 3:
        rgb = np.concatenate([rgb] + [rgb[:, :1]] * (3 - rgb.shape[1]), axis=1)
    rgb = (np.clip(rgb, lo, hi) - lo) / max(hi - lo, 1e-12)
    return (rgb.transpose(0, 2, 3, 1) * 255 + 0.5).astype(np.uint8)


def save_grid(rows: list[np.ndarray], path, upscale: int = 8, pad: int = 2) -> None:
    """Saves rows of latent batches (each [B, C, H, W], same shapes) as one PNG, one shared colour range."""
    stacked = np.stack(rows)
    lo, hi = np.percentile(stacked[:, :, :3], [1, 99])
    tiles = [latents_to_rgb(r, lo, hi) for r in rows]
    n_rows, n_cols, h, w = len(tiles), tiles[0].shape[0], tiles[0].shape[1] * upscale, tiles[0].shape[2] * upscale
    canvas = np.full((n_rows * (h + pad) + pad, n_cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(tiles):
        for j, img in enumerate(row):
            big = img.repeat(upscale, 0).repeat(upscale, 1)
            canvas[pad + i * (h + pad):pad + i * (h + pad) + h, pad + j * (w + pad):pad + j * (w + pad) + w] = big
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
