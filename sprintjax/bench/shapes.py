"""The embedded text-to-image dataset: procedural shapes with compositional captions (GenEval-style), and a
lossless built-in "autoencoder" (space-to-depth) that turns its images into latents.

A scene has one object, two of the same, or two different objects in a spatial relation:
"a red circle", "two blue squares", "a green triangle to the left of a yellow square". Images are 32x32 RGB on
a grey background. Every scene is a pure function of (split seed, index): the train and validation splits use
different seeds, and a few (colour, shape) combinations never appear in training captions or images (they
appear in validation only), to measure compositional generalisation.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

SIZE = 32
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
RELATIONS = {"to the left of": (-1, 0), "to the right of": (1, 0), "above": (0, -1), "below": (0, 1)}
BACKGROUND = (128, 128, 128)
HELD_OUT = {("yellow", "triangle"), ("blue", "circle")}  # never in the training split
SPLIT_SEEDS = {"train": 0, "validation": 1, "codec": 2}  # codec: uncaptioned, for the autoencoder only
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}


@dataclasses.dataclass(frozen=True)
class Obj:
    color: str
    shape: str
    x: float  # centre, pixels
    y: float
    r: float  # half size, pixels


@dataclasses.dataclass(frozen=True)
class Scene:
    kind: str  # single | count | relation
    objects: tuple[Obj, ...]
    caption: str
    relation: str | None = None


def _draw_obj(rng, color, shape, region=((0, SIZE), (0, SIZE))) -> Obj:
    """An object of half size 4-6 px lying entirely inside region ((x0, x1), (y0, y1)), 1 px from the border."""
    r = rng.uniform(4.0, 6.0)
    (x0, x1), (y0, y1) = region
    lo = lambda a: max(a, 1) + r  # noqa: E731
    hi = lambda b: min(b, SIZE - 1) - r  # noqa: E731
    return Obj(color, shape, float(rng.uniform(lo(x0), hi(x1))), float(rng.uniform(lo(y0), hi(y1))), float(r))


def _pick(rng, allowed):
    while True:
        color, shape = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
        if allowed(color, shape):
            return color, shape


def scene(split: str, index: int) -> Scene:
    """The index-th scene of a split (deterministic)."""
    rng = np.random.default_rng([SPLIT_SEEDS[split], index])
    allowed = (lambda c, s: (c, s) not in HELD_OUT) if split == "train" else (lambda c, s: True)
    kind = str(rng.choice(["single", "count", "relation"], p=[0.3, 0.2, 0.5]))
    if kind == "single":
        c, s = _pick(rng, allowed)
        return Scene(kind, (_draw_obj(rng, c, s),), f"a {c} {s}")
    if kind == "count":
        c, s = _pick(rng, allowed)
        a = _draw_obj(rng, c, s, ((0, SIZE / 2 - 1), (0, SIZE)))
        b = _draw_obj(rng, c, s, ((SIZE / 2 + 1, SIZE), (0, SIZE)))
        return Scene(kind, (a, b), f"two {c} {PLURAL[s]}")
    c1, s1 = _pick(rng, allowed)
    c2, s2 = _pick(rng, lambda c, s: allowed(c, s) and (c, s) != (c1, s1))
    rel = str(rng.choice(list(RELATIONS)))
    dx, dy = RELATIONS[rel]
    half = SIZE / 2
    if dx:  # first object in the left (or right) half
        first = ((0, half - 1), (0, SIZE)) if dx < 0 else ((half + 1, SIZE), (0, SIZE))
        second = ((half + 1, SIZE), (0, SIZE)) if dx < 0 else ((0, half - 1), (0, SIZE))
    else:
        first = ((0, SIZE), (0, half - 1)) if dy < 0 else ((0, SIZE), (half + 1, SIZE))
        second = ((0, SIZE), (half + 1, SIZE)) if dy < 0 else ((0, SIZE), (0, half - 1))
    a, b = _draw_obj(rng, c1, s1, first), _draw_obj(rng, c2, s2, second)
    return Scene(kind, (a, b), f"a {c1} {s1} {rel} a {c2} {s2}", rel)


def _mask(obj: Obj, yy, xx):
    if obj.shape == "circle":
        return (xx - obj.x) ** 2 + (yy - obj.y) ** 2 <= obj.r**2
    if obj.shape == "square":
        return (np.abs(xx - obj.x) <= obj.r) & (np.abs(yy - obj.y) <= obj.r)
    # upward triangle with apex at the top, base at the bottom of its box
    top, bottom = obj.y - obj.r, obj.y + obj.r
    t = (yy - top) / (2 * obj.r)
    return (yy >= top) & (yy <= bottom) & (np.abs(xx - obj.x) <= t * obj.r)


def render(sc: Scene) -> np.ndarray:
    """[32, 32, 3] uint8 image of a scene (pixel centres sampled, so edges are hard)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    img = np.empty((SIZE, SIZE, 3), np.uint8)
    img[:] = BACKGROUND
    for obj in sc.objects:
        img[_mask(obj, yy, xx)] = COLORS[obj.color]
    return img


# ---------------------------------------------------------------- the built-in lossless autoencoder
FACTOR = 4  # 32x32x3 pixels <-> 8x8x48 latents (a 4x4 patch per token)
LATENT_CHANNELS = 3 * FACTOR * FACTOR
SCALE = 4.0  # like a VAE's scaling factor: latents of about unit standard deviation


def encode(images: np.ndarray) -> np.ndarray:
    """uint8 [B, 32, 32, 3] -> latents [B, 48, 8, 8]: pixels to [-1, 1] (grey background = 0) times SCALE,
    space-to-depth."""
    x = (images.astype(np.float32) / 127.5 - 1.0) * SCALE
    b, h, w, c = x.shape
    x = x.reshape(b, h // FACTOR, FACTOR, w // FACTOR, FACTOR, c).transpose(0, 2, 4, 5, 1, 3)
    return x.reshape(b, FACTOR * FACTOR * c, h // FACTOR, w // FACTOR)


def decode(latents: np.ndarray) -> np.ndarray:
    """The exact inverse of `encode` (clipped to valid pixels): latents [B, 48, 8, 8] -> uint8 [B, 32, 32, 3]."""
    z = np.asarray(latents, np.float32) / SCALE
    b, _, h, w = z.shape
    x = z.reshape(b, FACTOR, FACTOR, 3, h, w).transpose(0, 4, 1, 5, 2, 3).reshape(b, h * FACTOR, w * FACTOR, 3)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


BUILTIN_VAES = ("builtin-s2d", "builtin-ae")


def latent_codec(vae: str):
    """(encode, decode, latent channels) of a built-in latent space: `builtin-s2d` (the lossless space-to-depth
    above, 48 channels) or `builtin-ae` (the shipped learned autoencoder, sprintjax.bench.autoencoder, 8 channels)."""
    if vae == "builtin-s2d":
        return encode, decode, LATENT_CHANNELS
    if vae == "builtin-ae":
        from sprintjax.bench import autoencoder

        params = autoencoder.load()
        return (lambda x: autoencoder.encode(params, x)), (lambda z: autoencoder.decode(params, z)), \
            autoencoder.LATENT_CHANNELS
    raise ValueError(f"unknown built-in latent space {vae!r} (one of {', '.join(BUILTIN_VAES)})")


def codec_of_latents(channels: int):
    """The built-in latent space whose latents have `channels` channels (48: builtin-s2d, 8: builtin-ae)."""
    from sprintjax.bench import autoencoder

    by_channels = {LATENT_CHANNELS: "builtin-s2d", autoencoder.LATENT_CHANNELS: "builtin-ae"}
    if channels not in by_channels:
        raise ValueError(f"latents of {channels} channels are not of a built-in shapes latent space "
                         f"({', '.join(f'{c}: {v}' for c, v in by_channels.items())})")
    return latent_codec(by_channels[channels])


def sample_images(split: str, n: int, start: int = 0) -> tuple[np.ndarray, list[Scene]]:
    scenes = [scene(split, i) for i in range(start, start + n)]
    return np.stack([render(s) for s in scenes]), scenes


def caption_pairs(num: int, num_validation: int) -> dict[str, list[tuple[np.ndarray, str]]]:
    """{split: [(image, caption), ...]} for `prepare-data` (train and validation splits)."""
    out = {}
    for split, n in (("train", num), ("validation", num_validation)):
        images, scenes = sample_images(split, n)
        out[split] = [(img, sc.caption) for img, sc in zip(images, scenes, strict=True)]
    return out


def tile(images: np.ndarray, cols: int) -> np.ndarray:
    """A grid of images [N, H, W, 3] with 2-pixel white gutters."""
    n, h, w, _ = images.shape
    rows = math.ceil(n / cols)
    out = np.full((rows * (h + 2) + 2, cols * (w + 2) + 2, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        out[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + c * (w + 2):2 + c * (w + 2) + w] = img
    return out
