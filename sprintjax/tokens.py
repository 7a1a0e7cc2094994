"""The token sampler (issue 22; NanoFLUX's token down-sampler): blocks `token_down`..`token_up`-1 of a SANA
transformer run on a token grid of half the height and width, a quarter of the tokens, so their linear
attention, cross-attention and Mix-FFN cost a quarter as much.

NanoFLUX gives no code; what is built here (sprintjax's choice, named in docs/compress.md):
    down:  p = avgpool_2x2(h);                     h_low = p + R_down(p)
    up:    u = h + nearest_2x(h_low_out - h_low);  out   = u + R_up(u)
R is a small ResNet branch on the token grid: 1x1 conv D -> D/2, SiLU, 3x3 depthwise conv, SiLU, 1x1 conv
D/2 -> D whose weights start at zero. The up-sampler adds the half-grid blocks' *update* to the full-grid
tokens it skipped (a U-Net skip), so a freshly inserted sampler (R = 0) keeps everything the pooled blocks
cannot see, and the model it was cut from is recovered by training (recovery: `sprintjax.recover`, whose
feature targets inside the half grid are the source's tokens pooled the same way: `pool`).

Pooling and nearest up-sampling are linear maps, so the sampler stays forward-mode differentiable (the sCM
tangent, `jax.jvp`, passes through it). It is not part of diffusers' `SanaTransformer2DModel`: a model with one
is exported to mobile formats only (`sprintjax.convert.mobile` builds its PyTorch twin, `TorchTokenSampler`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sprintjax.errors import ConfigError, ShapeError
from sprintjax.layers import Dense, DepthwiseConv3x3

KEYS = ("token_down", "token_up")  # the params' top-level keys of the two samplers


class ResBranch(nn.Module):
    """1x1 D -> D/2 (bias), SiLU, 3x3 depthwise (bias), SiLU, 1x1 D/2 -> D (bias, zero-initialised), on a grid
    [B, H, W, D]."""

    dtype: jnp.dtype

    @nn.compact
    def __call__(self, grid):
        d = grid.shape[-1]
        h = nn.silu(Dense(max(d // 2, 1), dtype=self.dtype, name="conv_in")(grid))
        h = nn.silu(DepthwiseConv3x3(self.dtype, name="conv_depth")(h))
        return Dense(d, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="conv_out")(h)


def half(hw: tuple[int, int]) -> tuple[int, int]:
    """The half grid of a token grid (height and width must be even)."""
    if hw[0] % 2 or hw[1] % 2:
        raise ShapeError(f"the token sampler halves the token grid: its height and width must be even, got "
                         f"{hw[0]}x{hw[1]} tokens")
    return hw[0] // 2, hw[1] // 2


def pool(tokens, hw: tuple[int, int]):
    """2x2 average pooling of tokens [B, H*W, D] on their grid -> [B, H*W/4, D]."""
    b, _, d = tokens.shape
    (hh, ww) = half(hw)
    return tokens.reshape(b, hh, 2, ww, 2, d).mean(axis=(2, 4)).reshape(b, hh * ww, d)


def nearest_up(tokens, hw_low: tuple[int, int]):
    """Nearest-neighbour 2x up-sampling of tokens [B, h*w, D] on their grid -> [B, 4*h*w, D]."""
    b, _, d = tokens.shape
    h, w = hw_low
    grid = jnp.broadcast_to(tokens.reshape(b, h, 1, w, 1, d), (b, h, 2, w, 2, d))
    return grid.reshape(b, 4 * h * w, d)


def _branch(params, tokens, hw, dtype):
    b, n, d = tokens.shape
    out = ResBranch(dtype).apply({"params": params}, tokens.reshape(b, *hw, d))
    return out.reshape(b, n, d).astype(tokens.dtype)


def down(params, tokens, hw, dtype="float32"):
    """The down-sampler: tokens on grid hw -> tokens on the half grid (params: the `token_down` subtree)."""
    p = pool(tokens, hw)
    return p + _branch(params, p, half(hw), dtype)


def up(params, low_out, low_in, skip, hw, dtype="float32"):
    """The up-sampler: the half-grid blocks' output `low_out` (their input was `low_in`) back onto grid hw, added
    to the full-grid tokens `skip` that entered the down-sampler (params: the `token_up` subtree)."""
    u = skip + nearest_up(low_out - low_in, half(hw))
    return u + _branch(params, u, hw, dtype)


def init(rng, hidden_size: int) -> dict:
    """Fresh params of both samplers: {"token_down": ..., "token_up": ...} (output convs zero)."""
    grid = jnp.zeros((1, 2, 2, hidden_size), jnp.float32)
    keys = jax.random.split(rng, len(KEYS))
    return {name: ResBranch(jnp.float32).init(k, grid)["params"] for name, k in zip(KEYS, keys, strict=True)}


def insert(params: dict, cfg, spec: str, seed: int = 0):
    """(params, config) with a fresh token sampler over blocks DOWN..UP-1 (spec "DOWN:UP", 0-based blocks of
    `cfg`); the rest of the params unchanged. One ConfigError for a malformed spec, a range outside the blocks,
    or a model that has a sampler already."""
    if cfg.token_sampler:
        raise ConfigError(f"this model has a token sampler already (blocks {cfg.token_down}..{cfg.token_up - 1})")
    try:
        lo, hi_ = (int(v) for v in spec.split(":"))
    except ValueError:
        raise ConfigError(f"a token sampler is given as DOWN:UP (blocks DOWN..UP-1 on the half grid), got "
                          f"{spec!r}") from None
    new_cfg = cfg.replace(token_down=lo, token_up=hi_)
    return {**params, **init(jax.random.key(seed), cfg.hidden_size)}, new_cfg
