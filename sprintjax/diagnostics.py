"""JVP-stability diagnostics of continuous-time consistency distillation, per TrigFlow time bin.

The questions are the paper's §3.2 (Fig. 3: why sCM training on a flow-matching SANA blows up, and how the
dense time embedding and QK-norm fix it) and sCM's §4 (the tangent's time-derivative term dominates). For
times on a fixed stratified grid over (0, pi/2) (`time_grid`), with the batch's images, captions and noise,
`bin_stats` measures per bin:

- `time_norm`  ||(d/dt F) v_t||        the time-derivative part of the JVP (through the time embedding),
- `space_norm` ||(grad_x F) v_x||      the spatial part; the two JVPs each zero one tangent, and they sum
                                       to the full JVP dF of Eq. 9 (tested),
- `g_norm`     ||g||                   the raw tangent g = cos t df/dt of Eq. 9 before normalisation,
- `g_shrink`   1 - 1 / (||g|| + c)     the share of g removed by tangent normalisation g / (||g|| + c)
                                       (negative: normalisation amplified it),
- `grad_norm`  ||d L_sCM / d theta||   the gradient norm of the sCM loss on the bin's samples alone,
- `nonfinite`                          the fraction of the bin's samples whose g is not finite,
- `bf16_rel_err` ||dF_bf16 - dF_f32|| / ||dF_f32||: where bfloat16 JVPs break (with `compare_bf16`).

Everything is a pure function of (student params, teacher params, batch, rng) and jit-compatible; the
trainer logs `summarise(...)` every `train.diag_every` iterations.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from sprintjax import scm
from sprintjax.distill_config import DistillConfig
from sprintjax.model import SanaTransformer


def time_grid(n_bins: int, per_bin: int, t_min: float = 1e-3, t_max: float = math.pi / 2 - 1e-3) -> jax.Array:
    """[n_bins * per_bin] times, bin-major: per_bin evenly spread times inside each of n_bins equal bins."""
    edges = jnp.linspace(t_min, t_max, n_bins + 1)
    frac = (jnp.arange(per_bin) + 0.5) / per_bin
    return (edges[:-1, None] + frac[None, :] * (edges[1:] - edges[:-1])[:, None]).reshape(-1)


def bin_edges(n_bins: int, t_min: float = 1e-3, t_max: float = math.pi / 2 - 1e-3) -> jax.Array:
    return jnp.linspace(t_min, t_max, n_bins + 1)


def jvp_parts(F, x, t, v_x, v_t):
    """(F(x, t), time part (dF/dt) v_t, space part (grad_x F) v_x): two JVPs, each with one tangent zeroed."""
    _, d_time = jax.jvp(F, (x, t), (jnp.zeros_like(x), v_t))
    out, d_space = jax.jvp(F, (x, t), (v_x, jnp.zeros_like(t)))
    return out, d_time, d_space


def _norm(a):
    return jnp.sqrt(jnp.sum(jnp.square(a.astype(jnp.float32)), axis=tuple(range(1, a.ndim))))


def per_sample(student: SanaTransformer, params, teacher: SanaTransformer, teacher_params, null_caption, batch,
               t, rng, cfg: DistillConfig, r=1.0, jvp_dtype: str | None = None) -> dict:
    """Per-sample JVP quantities at times t [B] (the sCM loss's construction, paper Eq. 9)."""
    sd = cfg.sigma_d
    x0 = batch["latents"].astype(jnp.float32) * sd
    caption, mask = batch["caption"], batch["caption_mask"].astype(jnp.float32)
    k_z, k_w = jax.random.split(rng)
    z = jax.random.normal(k_z, x0.shape) * sd
    tb = t[:, None, None, None]
    x_t = jnp.cos(tb) * x0 + jnp.sin(tb) * z
    w = jax.random.choice(k_w, jnp.asarray(cfg.cfg_scales, jnp.float32), t.shape)
    dxt_dt = scm.teacher_dxt_dt(teacher, teacher_params, null_caption, x_t, t, caption, mask, w, sd)
    model = dataclasses.replace(student, config=student.config.replace(dtype=jvp_dtype or cfg.jvp_dtype))
    F_aux = scm.student_fn(model, params, caption, mask, w)
    F = lambda x, tt: F_aux(x, tt)[0]  # noqa: E731
    cs = jnp.cos(t) * jnp.sin(t)
    F_val, d_time, d_space = jvp_parts(F, x_t / sd, t, cs[:, None, None, None] * dxt_dt / sd, cs)
    dF = (d_time + d_space).astype(jnp.float32)
    c, s = jnp.cos(tb), jnp.sin(tb)
    g = -c * c * (sd * F_val.astype(jnp.float32) - dxt_dt) - r * (c * s * x_t + sd * dF)  # Eq. 9's tangent
    return {"time_norm": _norm(d_time), "space_norm": _norm(d_space), "dF": dF, "g_norm": _norm(g),
            "finite": jnp.all(jnp.isfinite(g), axis=(1, 2, 3)), "inputs": (x_t, dxt_dt, caption, mask, w)}


def bin_stats(student, params, teacher, teacher_params, null_caption, batch, rng, cfg: DistillConfig,
              n_bins: int = 8, r=1.0, compare_bf16: bool = False, with_samples: bool = False):
    """Per-bin statistics ([n_bins] each) on a batch of n_bins * k samples placed on `time_grid`; with_samples
    also returns the per-sample norms ({time_norm, space_norm, g_norm}: [B]) for histograms."""
    b = batch["latents"].shape[0]
    if b % n_bins:
        raise ValueError(f"batch {b} does not divide into {n_bins} time bins")
    k = b // n_bins
    t = time_grid(n_bins, k)
    ps = per_sample(student, params, teacher, teacher_params, null_caption, batch, t, rng, cfg, r)
    by_bin = lambda a: a.reshape(n_bins, k, *a.shape[1:])  # noqa: E731
    mean = lambda a: jnp.mean(by_bin(a.astype(jnp.float32)), axis=1)  # noqa: E731
    out = {name: mean(ps[name]) for name in ("time_norm", "space_norm", "g_norm")}
    out["g_shrink"] = mean(1.0 - 1.0 / (ps["g_norm"] + cfg.tangent_norm_c))
    out["nonfinite"] = mean(1.0 - ps["finite"])

    x_t, dxt_dt, caption, mask, w = ps["inputs"]

    def bin_grad_norm(x_t, t, dxt_dt, caption, mask, w):  # the real loss on one bin's samples
        grads = jax.grad(lambda p: scm.scm_loss(student, p, x_t, t, dxt_dt, caption, mask, w, r, cfg)[0])(params)
        return jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))

    out["grad_norm"] = jax.lax.map(lambda a: bin_grad_norm(*a),
                                   tuple(by_bin(a) for a in (x_t, t, dxt_dt, caption, mask, w)))
    if compare_bf16:
        low = per_sample(student, params, teacher, teacher_params, null_caption, batch, t, rng, cfg, r,
                         jvp_dtype="bfloat16")
        err = _norm(low["dF"] - ps["dF"]) / jnp.maximum(_norm(ps["dF"]), 1e-30)
        out["bf16_rel_err"] = mean(err)
    if with_samples:
        return out, {k: ps[k] for k in ("time_norm", "space_norm", "g_norm")}
    return out


def summarise(stats: dict, prefix: str = "diag") -> dict:
    """Flat scalars for a metrics log: each statistic per bin (`diag/g_norm/bin3`) and its max over bins."""
    flat = {}
    for name, per_bin in stats.items():
        for i, v in enumerate(per_bin):
            flat[f"{prefix}/{name}/bin{i}"] = v
        flat[f"{prefix}/{name}/max"] = jnp.max(per_bin)
    return flat
