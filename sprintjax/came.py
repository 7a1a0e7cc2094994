"""CAME (Confidence-guided Adaptive Memory Efficient optimisation, Luo et al. 2023) as an optax transform,
treating each tensor by its shape exactly as the reference's `CAMEWrapper` (NVlabs/Sana, facts §6).

Factored tensors (Linear weights and 1x1 conv kernels):
  U = g^2 + eps1;  r <- b2 r + (1 - b2) mean_cols(U);  c <- b2 c + (1 - b2) mean_rows(U)
  u = g / sqrt(r c / mean(r))
  u <- u / max(1, RMS(u) / d)                    (update clipping, d = clip_threshold)
  m <- b1 m + (1 - b1) u
  S = (u - m)^2 + eps2;  R <- b3 R + (1 - b3) mean_cols(S);  C <- b3 C + (1 - b3) mean_rows(S)
  update = m / sqrt(R C / mean(R))               (the confidence step)
Every other tensor (vectors, k x k and depthwise convs, Conv1d kernels of the discriminator heads):
  v <- b2 v + (1 - b2) U;  u = g / sqrt(v);  the same clipping and m;  update = m (no confidence step).
No bias correction anywhere. The learning rate and weight decay are applied by the chain around it.
Leaves marked `stacked` carry one parameter per index of their leading axis (our scanned layers): each slice
is classified and updated as its own parameter, exactly as in a per-layer PyTorch model.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class CAMEState(NamedTuple):
    count: jax.Array
    moments: Any  # per leaf: {"m", and "r", "c", "R", "C" (factored) or "v" (unfactored)}


def factored(shape) -> bool:
    """The reference's rule, read in our (Flax) layouts: a PyTorch Linear weight (out, in) is our 2-D kernel
    (in, out); a PyTorch 1x1 conv (out, in, 1, 1) is our HWIO kernel (1, 1, in, out) or a 2-D Dense kernel.
    A k x k conv (HWIO, k > 1), a depthwise conv and a Conv1d kernel (k, in, out) -- 3-D for every k, as the
    reference's (out, in, k) -- are not factored; neither are vectors."""
    return len(shape) == 2 or (len(shape) == 4 and shape[0] == 1 and shape[1] == 1)


def _init_leaf(p):
    z = lambda shape: jnp.zeros(shape, jnp.float32)  # noqa: E731
    if factored(p.shape):
        rows, cols = p.shape[:-1], p.shape[:-2] + p.shape[-1:]  # leading unit axes of a 1x1 conv ride along
        return {"m": z(p.shape), "r": z(rows), "c": z(cols), "R": z(rows), "C": z(cols)}
    return {"m": z(p.shape), "v": z(p.shape)}


def _approx_rsqrt(row, col):
    """1 / sqrt(r c / mean(r)) broadcast to the matrix (the factored second moment)."""
    r_factor = jax.lax.rsqrt(row / jnp.mean(row, axis=-1, keepdims=True))[..., None]
    return r_factor * jax.lax.rsqrt(col)[..., None, :]


def _update_leaf(g, s, b1, b2, b3, eps1, eps2, clip):
    g = g.astype(jnp.float32)
    sq = jnp.square(g) + eps1
    new = {}
    if "v" in s:
        new["v"] = b2 * s["v"] + (1 - b2) * sq
        u = g * jax.lax.rsqrt(new["v"])
    else:
        new["r"] = b2 * s["r"] + (1 - b2) * jnp.mean(sq, axis=-1)
        new["c"] = b2 * s["c"] + (1 - b2) * jnp.mean(sq, axis=-2)
        u = g * _approx_rsqrt(new["r"], new["c"])
    u = u / jnp.maximum(1.0, jnp.sqrt(jnp.mean(jnp.square(u))) / clip)
    new["m"] = b1 * s["m"] + (1 - b1) * u
    if "v" in s:
        return new["m"], new
    res = jnp.square(u - new["m"]) + eps2
    new["R"] = b3 * s["R"] + (1 - b3) * jnp.mean(res, axis=-1)
    new["C"] = b3 * s["C"] + (1 - b3) * jnp.mean(res, axis=-2)
    return new["m"] * _approx_rsqrt(new["R"], new["C"]), new


def scale_by_came(b1=0.9, b2=0.999, b3=0.9999, eps1=1e-30, eps2=1e-16, clip_threshold=1.0,
                  stacked=None) -> optax.GradientTransformation:
    """The CAME direction (to be scaled by -lr). `stacked`: a pytree of bools like the params, or None."""

    def _stack_mask(params):
        return jax.tree.map(lambda _: False, params) if stacked is None else stacked

    def init_fn(params):
        def leaf(p, is_stacked):
            return jax.vmap(_init_leaf)(p) if is_stacked else _init_leaf(p)

        return CAMEState(jnp.zeros([], jnp.int32), jax.tree.map(leaf, params, _stack_mask(params)))

    def update_fn(updates, state, params=None):
        del params
        step = lambda g, s: _update_leaf(g, s, b1, b2, b3, eps1, eps2, clip_threshold)  # noqa: E731
        mask = _stack_mask(updates)
        flat_g, treedef = jax.tree.flatten(updates)
        flat_m = treedef.flatten_up_to(mask)
        flat_s = treedef.flatten_up_to(state.moments)
        outs = [jax.vmap(step)(g, s) if m else step(g, s) for g, s, m in zip(flat_g, flat_s, flat_m, strict=True)]
        new_updates = treedef.unflatten([u.astype(g.dtype) for (u, _), g in zip(outs, flat_g, strict=True)])
        new_moments = treedef.unflatten([s for _, s in outs])
        return new_updates, CAMEState(state.count + 1, new_moments)

    return optax.GradientTransformation(init_fn, update_fn)
