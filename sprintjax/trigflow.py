"""TrigFlow: the flow-matching -> TrigFlow transform (Prop. 3.1), the consistency function, time proposals,
few-step sampling and Euler ODE samplers.

Conventions (facts §1-2, §8): latents x0 are in the VAE's scale; TrigFlow works on x = sigma_d * x0-scale
quantities, x_t = cos t x0 + sin t z with z ~ N(0, sigma_d^2 I), t in [0, pi/2]. A TrigFlow model is a
function `F(x_hat, t)` of x_hat = x_t / sigma_d and per-sample t [B]; a flow model is `v(x_fm, t_fm)` with
x_fm = (1 - t_fm) x0 + t_fm eps and velocity eps - x0. Everything here is a pure, differentiable function.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

SIGMA_D = 0.5  # facts §1
T_MAX = 1.57080  # the official few-step sampler's first time (SCMScheduler max_timesteps), ~pi/2
T_MID = 1.3  # the official 2-step intermediate time at inference (the paper's analysis uses 1.0)

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]  # v(x_fm, t_fm) or F(x_hat, t)


def _b(t, x):
    """Per-sample time [B] (or scalar) shaped to broadcast against x [B, ...]."""
    t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
    return t.reshape(t.shape + (1,) * (x.ndim - 1))


def t_fm_of(t):
    """Eq. 6: t_FM = sin t / (sin t + cos t)."""
    return jnp.sin(t) / (jnp.sin(t) + jnp.cos(t))


def t_trig_of(t_fm):
    """Inverse of Eq. 6: t = atan(t_FM / (1 - t_FM))."""
    return jnp.arctan2(t_fm, 1.0 - t_fm)


def flow_to_trigflow(velocity: VelocityFn, has_aux: bool = False) -> VelocityFn:
    """Prop. 3.1: the TrigFlow model F(x_hat, t) of a flow-matching velocity model v(x_fm, t_fm).

    With has_aux, `velocity` returns (v, aux) and F returns (F, aux) (e.g. the student's logvar).
    """

    def F(x_hat, t):
        tf = t_fm_of(jnp.broadcast_to(jnp.asarray(t, x_hat.dtype), x_hat.shape[:1]))
        tfb = _b(tf, x_hat)
        scale = jnp.sqrt(tfb**2 + (1 - tfb) ** 2)
        x_fm = x_hat * scale  # Eq. 7
        v, aux = velocity(x_fm, tf) if has_aux else (velocity(x_fm, tf), None)
        out = ((1 - 2 * tfb) * x_fm + (1 - 2 * tfb + 2 * tfb**2) * v) / scale  # Eq. 8
        return (out, aux) if has_aux else out

    return F


def consistency_fn(F: VelocityFn, x_t, t, sigma_d: float = SIGMA_D):
    """Eq. 4: f(x_t, t) = cos t x_t - sin t sigma_d F(x_t / sigma_d, t), the one-step denoiser."""
    tb = _b(t, x_t)
    return jnp.cos(tb) * x_t - jnp.sin(tb) * sigma_d * F(x_t / sigma_d, t)


def sample_time(rng, shape, p_mean: float, p_std: float, sigma_d: float = SIGMA_D):
    """Logit-normal TrigFlow proposal (facts §1): sigma = exp(P_std s + P_mean), t = atan(sigma / sigma_d)."""
    sigma = jnp.exp(jax.random.normal(rng, shape) * p_std + p_mean)
    return jnp.arctan(sigma / sigma_d)


def schedule(steps: int, t_max: float = T_MAX, t_mid: float = T_MID) -> jax.Array:
    """Few-step times (facts §8): [t_max, 0]; [t_max, t_mid, 0]; else linspace(t_max, 0, N + 1)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if steps == 2:
        return jnp.array([t_max, t_mid, 0.0], jnp.float32)
    return jnp.linspace(t_max, 0.0, steps + 1, dtype=jnp.float32)


def img2img_schedule(steps: int, strength: float, t_max: float = T_MAX, t_mid: float = T_MID) -> jax.Array:
    """SanaSprintImg2ImgPipeline's times: the `steps`-step schedule with its first int(steps - steps * strength)
    times dropped (diffusers' get_timesteps). Note diffusers' rounding: at 1 step any strength > 0 keeps t_max (the
    image then enters with weight cos(t_max) ~ 0); at 2 steps any strength above 0.5 keeps both."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    init_time = min(steps * strength, steps)
    t_start = int(max(steps - init_time, 0))
    if steps - t_start < 1:
        raise ValueError(f"strength {strength} at {steps} step(s) leaves no step to run (diffusers' "
                         f"get_timesteps: int({steps} - {steps} x {strength}) = {t_start}); raise --strength")
    return schedule(steps, t_max, t_mid)[t_start:]


def sample(F: VelocityFn, noise, times, sigma_d: float = SIGMA_D, init=None):
    """The unified few-step consistency sampler (facts §8), returning x0 / sigma_d (the VAE's scale).

    noise: [K, B, ...] standard normal, K = len(times) - 1; noise[0] starts the chain as x = noise[0] sigma_d,
    noise[k] is the fresh noise that re-noises the k-th denoised estimate to times[k].
    Step s -> t: x0 = f(x, s) (Eq. 4); x = cos t x0 + sin t sigma_d eps. At t = 0 this is x0 itself.
    init: image latents [B, ...] (the VAE's scale) for image-to-image: the chain starts from them noised to
    times[0], x = sigma_d (cos t0 init + sin t0 noise[0]) (Eq. 1; SanaSprintImg2ImgPipeline.prepare_latents).
    """
    times = jnp.asarray(times, noise.dtype)
    if noise.shape[0] != times.shape[0] - 1:
        raise ValueError(f"noise has {noise.shape[0]} steps but the schedule has {times.shape[0] - 1}")
    fresh = jnp.concatenate([noise[1:], jnp.zeros_like(noise[:1])])
    start = noise[0] if init is None else jnp.cos(times[0]) * init + jnp.sin(times[0]) * noise[0]

    def step(x, inp):
        s, t, eps = inp
        x0 = consistency_fn(F, x, s, sigma_d)
        return jnp.cos(t) * x0 + jnp.sin(t) * sigma_d * eps, None

    x, _ = jax.lax.scan(step, start * sigma_d, (times[:-1], times[1:], fresh))
    return x / sigma_d


def euler_flow(v: VelocityFn, eps, steps: int):
    """Euler on the flow ODE dx/dt_FM = v, t_FM uniform from 1 (x = eps) to 0; returns x0 (VAE scale)."""
    ts = jnp.linspace(1.0, 0.0, steps + 1, dtype=eps.dtype)

    def step(x, st):
        s, t = st
        return x + (t - s) * v(x, jnp.full(x.shape[:1], s)), None

    return jax.lax.scan(step, eps, (ts[:-1], ts[1:]))[0]


def euler_trigflow(F: VelocityFn, eps, steps: int, sigma_d: float = SIGMA_D):
    """Euler on the TrigFlow PF-ODE dx_t/dt = sigma_d F(x_t / sigma_d, t), t uniform from pi/2 to 0.

    Starts at x = sigma_d eps and returns x0 / sigma_d, comparable with `euler_flow` (paper Table 1).
    """
    ts = jnp.linspace(math.pi / 2, 0.0, steps + 1, dtype=eps.dtype)

    def step(x, st):
        s, t = st
        return x + (t - s) * sigma_d * F(x / sigma_d, jnp.full(x.shape[:1], s)), None

    return jax.lax.scan(step, eps * sigma_d, (ts[:-1], ts[1:]))[0] / sigma_d
