"""The JVP diagnostics against mathematics: the two parts sum to the full JVP, an analytic model's parts are
its closed-form derivatives, and the per-bin statistics agree with the sCM loss they dissect."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err, tiny

from sprintjax import diagnostics, scm
from sprintjax.distill_config import DistillConfig
from sprintjax.model import SanaTransformer


def test_time_grid_places_equal_counts_inside_each_bin():
    t = np.asarray(diagnostics.time_grid(4, 3))
    edges = np.asarray(diagnostics.bin_edges(4))
    assert t.shape == (12,) and 0 < t.min() and t.max() < math.pi / 2
    for i in range(4):
        assert np.all((edges[i] < t[3 * i:3 * i + 3]) & (t[3 * i:3 * i + 3] < edges[i + 1]))


def test_jvp_parts_of_an_analytic_model_are_its_partial_derivatives():
    """F(x, t) = sin(t) x^2 + t^3: dF/dt v_t = (cos t x^2 + 3 t^2) v_t and grad_x F v_x = 2 sin t x v_x."""
    F = lambda x, t: jnp.sin(t)[:, None] * x**2 + (t**3)[:, None]  # noqa: E731
    x = jnp.asarray([[0.5, -1.0], [2.0, 0.3]])
    t = jnp.asarray([0.2, 1.1])
    v_x, v_t = jnp.asarray([[1.0, 2.0], [-0.5, 0.7]]), jnp.asarray([0.3, -1.2])
    out, d_time, d_space = diagnostics.jvp_parts(F, x, t, v_x, v_t)
    np.testing.assert_allclose(d_time, (jnp.cos(t)[:, None] * x**2 + 3 * (t**2)[:, None]) * v_t[:, None], rtol=1e-6)
    np.testing.assert_allclose(d_space, 2 * jnp.sin(t)[:, None] * x * v_x, rtol=1e-6)
    full = jax.jvp(F, (x, t), (v_x, v_t))[1]
    np.testing.assert_allclose(d_time + d_space, full, rtol=1e-6)


@pytest.fixture(scope="module")
def models():
    tcfg = tiny(qk_norm="rms_norm_across_heads", num_layers=2)
    teacher = SanaTransformer(tcfg)
    tparams = teacher.init(jax.random.key(0))
    scfg, sparams = scm.init_student(tcfg, tparams, jax.random.key(1))
    rng = np.random.default_rng(0)
    b = 8
    mask = np.ones((b, 5), np.float32)
    mask[1::2, 3:] = 0
    batch = {"latents": jnp.asarray(rng.standard_normal((b, 4, 8, 8)), jnp.float32),
             "caption": jnp.asarray(rng.standard_normal((b, 5, 12)), jnp.float32), "caption_mask": jnp.asarray(mask)}
    null = jnp.asarray(rng.standard_normal((5, 12)), jnp.float32)
    return teacher, tparams, SanaTransformer(scfg), sparams, batch, null


def test_student_jvp_parts_sum_to_the_full_jvp(models):
    teacher, tparams, student, sparams, batch, null = models
    cfg = DistillConfig()
    t = diagnostics.time_grid(4, 2)
    ps = diagnostics.per_sample(student, sparams, teacher, tparams, null, batch, t, jax.random.key(3), cfg)
    x_t, dxt_dt, caption, mask, w = ps["inputs"]
    F = lambda x, tt: scm.student_fn(student, sparams, caption, mask, w)(x, tt)[0]  # noqa: E731
    cs = jnp.cos(t) * jnp.sin(t)
    full = jax.jvp(F, (x_t / cfg.sigma_d, t), (cs[:, None, None, None] * dxt_dt / cfg.sigma_d, cs))[1]
    assert rel_err(ps["dF"], full) < 1e-5
    assert bool(jnp.all(ps["finite"]))


def test_bin_stats_agree_with_the_scm_loss_they_dissect(models):
    teacher, tparams, student, sparams, batch, null = models
    cfg = DistillConfig()
    stats = jax.jit(lambda p: diagnostics.bin_stats(student, p, teacher, tparams, null, batch, jax.random.key(3),
                                                    cfg, n_bins=4, compare_bf16=True))(sparams)
    assert set(stats) == {"time_norm", "space_norm", "g_norm", "g_shrink", "grad_norm", "nonfinite", "bf16_rel_err"}
    assert all(v.shape == (4,) and bool(jnp.all(jnp.isfinite(v))) for v in stats.values())
    assert float(jnp.max(stats["nonfinite"])) == 0.0
    # bf16 JVPs deviate, but far less than 100%: the statistic measures rounding, not a different quantity
    assert 1e-4 < float(jnp.max(stats["bf16_rel_err"])) < 0.5
    # the raw tangent norm of bin 0 equals the sCM loss's own `tangent_norm_raw` on the same two samples
    t = diagnostics.time_grid(4, 2)
    ps = diagnostics.per_sample(student, sparams, teacher, tparams, null, batch, t, jax.random.key(3), cfg)
    x_t, dxt_dt, caption, mask, w = (a[:2] for a in ps["inputs"])
    _, m = scm.scm_loss(student, sparams, x_t, t[:2], dxt_dt, caption, mask, w, 1.0, cfg)
    assert rel_err(stats["g_norm"][0], m["tangent_norm_raw"]) < 1e-4
    flat = diagnostics.summarise(stats)
    assert "diag/g_norm/bin3" in flat and float(flat["diag/g_norm/max"]) == float(jnp.max(stats["g_norm"]))
