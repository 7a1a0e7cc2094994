"""TrigFlow proved against closed forms: Gaussian data, the lossless ODE transform, a point-mass denoiser."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import inputs, rel_err, tiny

from sprintjax import trigflow
from sprintjax.model import SanaTransformer
from sprintjax.sampling import trigflow_model

MU = jnp.array([0.7, -1.2, 0.0, 2.0])
S = jnp.array([0.5, 1.5, 1.0, 0.2])


def gaussian_flow_velocity(x, t_fm):
    """Exact flow-matching velocity E[eps - x0 | x] for x0 ~ N(MU, S^2), x = (1 - t) x0 + t eps."""
    t = t_fm[:, None]
    var = (1 - t) ** 2 * S**2 + t**2
    r = (x - (1 - t) * MU) / var
    return t * r - (MU + (1 - t) * S**2 * r)


def gaussian_trigflow_velocity(x_hat, t):
    """Exact TrigFlow velocity E[cos t eps - sin t x0 | x_hat], x_hat = cos t x0 + sin t eps (derived directly)."""
    c, s = jnp.cos(t)[:, None], jnp.sin(t)[:, None]
    var = c**2 * S**2 + s**2
    r = (x_hat - c * MU) / var
    return c * (s * r) - s * (MU + c * S**2 * r)


def test_transformed_flow_velocity_is_the_exact_trigflow_velocity():
    t = jnp.linspace(1e-3, math.pi / 2 - 1e-3, 257)
    x_hat = jax.random.normal(jax.random.key(0), (257, 4)) * 2.0
    F = trigflow.flow_to_trigflow(gaussian_flow_velocity)
    assert rel_err(F(x_hat, t), gaussian_trigflow_velocity(x_hat, t)) < 1e-5


def test_time_maps_are_inverse_and_consistency_fn_is_identity_at_zero():
    t = jnp.linspace(0.0, math.pi / 2, 33)
    np.testing.assert_allclose(trigflow.t_trig_of(trigflow.t_fm_of(t)), t, atol=1e-6)
    x = jax.random.normal(jax.random.key(1), (3, 4))
    F = lambda x_hat, t: jnp.full_like(x_hat, 7.0)  # noqa: E731
    np.testing.assert_array_equal(trigflow.consistency_fn(F, x, jnp.zeros(3)), x)


def test_euler_flow_and_euler_trigflow_converge_to_the_same_samples():
    """Table 1: same model, same noise; the gap between the two solvers shrinks as steps grow.

    For Gaussian data both ODEs carry noise z to MU + S z exactly, which each solver approaches too.
    """
    eps = jax.random.normal(jax.random.key(2), (64, 4))
    F = trigflow.flow_to_trigflow(gaussian_flow_velocity)
    exact = MU + S * eps
    gaps, errs = [], []
    for n in (4, 16, 64, 256):
        flow = trigflow.euler_flow(gaussian_flow_velocity, eps, n)
        trig = trigflow.euler_trigflow(F, eps, n)
        gaps.append(float(jnp.max(jnp.abs(flow - trig))))
        errs.append(max(float(jnp.max(jnp.abs(flow - exact))), float(jnp.max(jnp.abs(trig - exact)))))
    assert all(b < a / 2.5 for a, b in zip(gaps, gaps[1:], strict=False)), gaps
    assert all(b < a / 2.5 for a, b in zip(errs, errs[1:], strict=False)), errs
    assert errs[-1] < 2e-2


def test_euler_gap_shrinks_for_a_sana_model_too():
    cfg = tiny(guidance_embeds=True)
    model = SanaTransformer(cfg)
    params = model.init(jax.random.key(3))
    _, _, y, mask, _ = inputs(cfg, (8, 8))
    g = jnp.full((2,), 0.45)
    v = jax.jit(lambda x, t: model.apply(params, x, t, y, mask, g))
    F = trigflow.flow_to_trigflow(v)
    eps = jax.random.normal(jax.random.key(4), (2, 4, 8, 8))
    gaps = [float(jnp.max(jnp.abs(trigflow.euler_flow(v, eps, n) - trigflow.euler_trigflow(F, eps, n))))
            for n in (4, 16, 64)]
    assert gaps[1] < gaps[0] / 2 and gaps[2] < gaps[1] / 2, gaps


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7])
def test_perfect_point_mass_denoiser_returns_the_point(steps):
    """With the exact flow velocity of data = c, v(x, t) = (x - c) / t, every step's x0 is c."""
    c = jax.random.normal(jax.random.key(5), (3, 2, 4, 4))
    v = lambda x, t_fm: (x - c) / t_fm[:, None, None, None]  # noqa: E731
    noise = jax.random.normal(jax.random.key(6), (steps, 3, 2, 4, 4))
    out = trigflow.sample(trigflow.flow_to_trigflow(v), noise, trigflow.schedule(steps))
    assert rel_err(out, c) < 1e-5


def test_schedules():
    np.testing.assert_allclose(trigflow.schedule(1), [1.5708, 0.0])
    np.testing.assert_allclose(trigflow.schedule(2), [1.5708, 1.3, 0.0])
    np.testing.assert_allclose(trigflow.schedule(2, t_mid=1.0), [1.5708, 1.0, 0.0])
    np.testing.assert_allclose(trigflow.schedule(4), np.linspace(1.5708, 0, 5), rtol=1e-6)
    with pytest.raises(ValueError):
        trigflow.schedule(0)


@pytest.mark.parametrize("p_mean,p_std", [(0.2, 1.6), (-0.6, 1.0)])
def test_logit_normal_time_proposal(p_mean, p_std):
    t = trigflow.sample_time(jax.random.key(7), (200_000,), p_mean, p_std)
    assert float(t.min()) > 0 and float(t.max()) < math.pi / 2
    # sigma = sigma_d tan t is log-normal: log(sigma) has mean P_mean and std P_std.
    log_sigma = np.log(0.5 * np.tan(np.asarray(t, np.float64)))
    assert abs(log_sigma.mean() - p_mean) < 0.02 and abs(log_sigma.std() - p_std) < 0.02


def test_guidance_enters_only_through_the_embedding():
    cfg = tiny(guidance_embeds=True, guidance_embeds_scale=0.1)
    model = SanaTransformer(cfg)
    params = model.init(jax.random.key(8))
    x, t, y, mask, _ = inputs(cfg, (8, 8))
    direct = trigflow.flow_to_trigflow(lambda xf, tf: model.apply(params, xf, tf, y, mask, jnp.full((2,), 0.5)))
    bound = trigflow_model(model, params, y, mask, guidance_scale=5.0)
    np.testing.assert_array_equal(bound(x, t + 0.3), direct(x, t + 0.3))
