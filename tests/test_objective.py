"""The distillation objective pinned against sources independent of its code: Eq. 9's terms, weights and
constant on a closed-form student; the discriminator step's draws and pairs (facts §5); the discriminator's
teacher features against diffusers' own blocks (forward hooks); and the adversarial gradient reaching the
student through the frozen teacher, against a float64 finite difference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import inputs, rel_err, tiny

from sprintjax import convert, ladd, scm
from sprintjax.convert import torch_ref
from sprintjax.distill import Distiller
from sprintjax.distill_config import DistillConfig
from sprintjax.model import SanaTransformer

SD = 0.5


# ---------------------------------------------------------------- Eq. 9 on a closed-form student
def _closed_form_student(student, params, caption, mask, w, control=None):
    """F(x_hat, t) = A x_hat + B t (elementwise), logvar = params["lv"] [B]: its total time derivative along
    the teacher's ODE is A (dx_t/dt) / sigma_d + B, by hand."""
    def F(x_hat, t):
        return params["A"] * x_hat + params["B"] * t[:, None, None, None], params["lv"]
    return F


def _closed_form_case(seed=0):
    rng = np.random.default_rng(seed)
    shape = (3, 2, 2, 2)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    params = {"A": f32(rng.uniform(0.5, 1.5, shape[1:])), "B": f32(rng.uniform(-0.3, 0.3, shape[1:])),
              "lv": f32([-0.7, 0.2, 0.9])}
    x_t, dxt_dt = f32(rng.standard_normal(shape) * 0.05), f32(rng.standard_normal(shape) * 0.05)
    return params, x_t, f32([0.3, 0.8, 1.3]), dxt_dt


def _expected_scm(params, x_t, t, dxt_dt, r, c_norm):
    """Facts §4 transcribed in float64 with the derivative of F written out by hand."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    x_t, dxt_dt, t = (np.asarray(a, np.float64) for a in (x_t, dxt_dt, t))
    tb = t[:, None, None, None]
    c, s = np.cos(tb), np.sin(tb)
    F = p["A"] * x_t / SD + p["B"] * tb
    dF_dt = p["A"] * dxt_dt / SD + p["B"]  # d/dt F(x_t / sigma_d, t) along dx_t/dt
    g = -c**2 * (SD * F - dxt_dt) - r * c * s * (x_t + SD * dF_dt)
    g = g / (np.sqrt(np.sum(g**2, axis=(1, 2, 3), keepdims=True)) + c_norm)
    weight = 1.0 / (SD * np.tan(tb))
    lv = p["lv"][:, None, None, None]
    sq = g**2  # F_theta - F- vanishes in value
    loss = np.mean(np.broadcast_to(weight / np.exp(lv) * sq + lv, x_t.shape))
    # d loss / dA: F_theta carries the gradient, F- and g do not.
    grad_A = np.sum(2 * weight / np.exp(lv) * (-g) * x_t / SD, axis=0) / x_t.size
    grad_lv = np.mean(-weight / np.exp(lv) * sq + 1.0, axis=(1, 2, 3)) * x_t[0].size / x_t.size
    return loss, grad_A, grad_lv, g


@pytest.mark.parametrize("form,r", [("fused", 1.0), ("fused", 0.3), ("two_pass", 0.3)])
def test_scm_loss_terms_weights_and_constant_match_a_closed_form_student(monkeypatch, form, r):
    monkeypatch.setattr(scm, "student_fn", _closed_form_student)
    params, x_t, t, dxt_dt = _closed_form_case()
    student = SanaTransformer(tiny())  # only its config is read; the closed-form F replaces the network
    cfg = DistillConfig(scm_form=form)
    assert cfg.tangent_norm_c == 0.1
    loss_fn = lambda p: scm.scm_loss(student, p, x_t, t, dxt_dt, None, None, None, r, cfg)  # noqa: E731
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    want, grad_A, grad_lv, _ = _expected_scm(params, x_t, t, dxt_dt, r, 0.1)
    np.testing.assert_allclose(float(loss), want, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(grads["A"]), grad_A, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.asarray(grads["lv"]), grad_lv, rtol=1e-4, atol=1e-7)
    # The case is sensitive to every choice: another constant, weight * exp(logvar), or no + logvar differ.
    assert abs(_expected_scm(params, x_t, t, dxt_dt, r, 0.2)[0] / want - 1) > 0.05
    assert abs(float(metrics["scm_loss_no_logvar"]) - want) / abs(want) > 0.05


def test_tangent_at_full_warmup_is_cos_t_times_the_consistency_derivative(monkeypatch):
    """At r = 1, g = cos t df/dt for f(x_t, t) = cos t x_t - sin t sigma_d F(x_t / sigma_d, t) (Eq. 4-5),
    measured by a float64 central difference along the ODE, not by the formula above."""
    monkeypatch.setattr(scm, "student_fn", _closed_form_student)
    params, x_t, t, dxt_dt = _closed_form_case(1)
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}

    def f(x, tt):
        tb = tt[:, None, None, None]
        return np.cos(tb) * x - np.sin(tb) * SD * (p["A"] * x / SD + p["B"] * tb)

    x64, t64, v64 = (np.asarray(a, np.float64) for a in (x_t, t, dxt_dt))
    h = 1e-6
    df_dt = (f(x64 + h * v64, t64 + h) - f(x64 - h * v64, t64 - h)) / (2 * h)
    g_fd = np.cos(t64)[:, None, None, None] * df_dt
    g_fd = g_fd / (np.sqrt(np.sum(g_fd**2, axis=(1, 2, 3), keepdims=True)) + 0.1)
    _, _, _, g = _expected_scm(params, x_t, t, dxt_dt, 1.0, 0.1)
    assert rel_err(g, g_fd) < 1e-7
    # and the module's loss, with adaptive weighting off and unit weights, is exactly mean(g^2)
    cfg = DistillConfig(time_weighting=False, adaptive_weighting=False)
    loss, _ = scm.scm_loss(SanaTransformer(tiny()), params, x_t, t, dxt_dt, None, None, None, 1.0, cfg)
    np.testing.assert_allclose(float(loss), np.mean(g_fd**2), rtol=2e-5)


# ---------------------------------------------------------------- the discriminator step
TEACHER = tiny(qk_norm="rms_norm_across_heads", num_layers=3)
FAST = dict(disc_layers=(0, 2), lr_g=1e-3, lr_d=1e-3, warmup_steps_g=0, disc_virtual_batch=4)


def _batch(b=4, seed=0):
    rng = np.random.default_rng(seed)
    return {"latents": rng.standard_normal((b, 4, 8, 8)).astype(np.float32),
            "caption": rng.standard_normal((b, 5, 12)).astype(np.float32),
            "caption_mask": np.ones((b, 5), np.float32)}


_FEATURES = jax.jit(ladd.teacher_features, static_argnums=(0, 6))
_DENOISE = jax.jit(scm.denoise, static_argnums=(0, 7))


class _Seen(Exception):
    """Stops the step once the trunk has seen the reals: the heads' update is not under test here."""


def _spied_d_step(monkeypatch, cfg):
    """Runs one discriminator step eagerly up to its second trunk call and records what the teacher trunk
    and the student were given (the model calls themselves jitted, for speed)."""
    calls = {"features": [], "denoise": []}

    def features(teacher, params, x_hat, t, caption, mask, blocks, control=None):
        assert control is None  # text-to-image distillation: no ControlNet
        out = _FEATURES(teacher, params, x_hat, t, caption, mask, blocks)
        calls["features"].append(dict(x_hat=np.asarray(x_hat), t=np.asarray(t), caption=np.asarray(caption)))
        if len(calls["features"]) == 2:
            raise _Seen
        return out

    def denoise(student, params, x_t, t, caption, mask, w, sigma_d, control=None):
        assert control is None
        out = _DENOISE(student, params, x_t, t, caption, mask, w, sigma_d)
        calls["denoise"].append(dict(t=np.asarray(t), out=np.asarray(out)))
        return out

    monkeypatch.setattr(ladd, "teacher_features", features)
    monkeypatch.setattr(scm, "denoise", denoise)
    d = Distiller(TEACHER, cfg)
    state = d.init(SanaTransformer(TEACHER).init(jax.random.key(0)), np.zeros((5, 12), np.float32),
                   jax.random.key(1))
    batch = _batch()
    with pytest.raises(_Seen):
        d.discriminator_step(state, batch, jax.random.key(7))
    return batch, calls


def test_discriminator_step_pairs_fakes_misaligned_reals_and_reals(monkeypatch):
    """With re-noising times near 0 the trunk's inputs are the clean latents: the fakes are the student's
    samples followed by the real latents rolled by one under the un-rolled captions; the reals are the batch."""
    batch, calls = _spied_d_step(monkeypatch, DistillConfig(**FAST, d_p_mean=-14.0, d_p_std=1e-3))
    (fake, real), (student,) = calls["features"], calls["denoise"]
    lat, cap, b = batch["latents"], batch["caption"], len(batch["latents"])
    assert fake["x_hat"].shape[0] == 2 * b and real["x_hat"].shape[0] == b
    np.testing.assert_allclose(fake["x_hat"][:b], student["out"] / SD, atol=1e-4)
    np.testing.assert_allclose(fake["x_hat"][b:], np.roll(lat, 1, axis=0), atol=1e-4)
    np.testing.assert_allclose(real["x_hat"], lat, atol=1e-4)
    np.testing.assert_array_equal(fake["caption"], np.concatenate([cap, cap]))
    np.testing.assert_array_equal(real["caption"], cap)
    assert np.abs(fake["x_hat"][:b] - lat).mean() > 0.1  # the student's samples are not the data


def test_discriminator_times_are_independent_draws_from_the_re_noising_distribution(monkeypatch):
    _, calls = _spied_d_step(monkeypatch, DistillConfig(**FAST))
    (fake, real), b = calls["features"], 4
    t_fake, t_shift, t_real = fake["t"][:b], fake["t"][b:], real["t"]
    assert not np.allclose(t_fake, t_real) and not np.allclose(t_fake, t_shift)
    _, calls = _spied_d_step(monkeypatch, DistillConfig(**FAST, independent_d_times=False))
    np.testing.assert_array_equal(calls["features"][0]["t"][:b], calls["features"][1]["t"])
    # Marginals (facts §1, §5): log(sigma_d tan t) ~ N(P_mean, P_std^2); the student's sample time is pi/2
    # with probability 0.5 and otherwise from the generator's proposal (0.2, 1.6).
    d, n = Distiller(TEACHER, DistillConfig(**FAST)), 40_000
    log_sigma = np.log(SD * np.tan(np.asarray(d._d_time(jax.random.key(3), n), np.float64)))
    assert abs(log_sigma.mean() + 0.6) < 0.03 and abs(log_sigma.std() - 1.0) < 0.03
    t_g = np.asarray(d._student_time(jax.random.key(4), n), np.float64)
    top = np.isclose(t_g, 1.5708)
    assert abs(top.mean() - 0.5) < 0.02
    log_sigma = np.log(SD * np.tan(t_g[~top]))
    assert abs(log_sigma.mean() - 0.2) < 0.05 and abs(log_sigma.std() - 1.6) < 0.05


# ---------------------------------------------------------------- teacher features vs diffusers' blocks
def test_teacher_features_are_diffusers_block_outputs_on_the_trigflow_input(diffusers_models):
    cfg, hw, model_pt, folder = diffusers_models["cross_shape_p2"]
    params, _ = convert.diffusers_to_params(folder)
    x_hat, _, y, mask, _ = inputs(cfg, hw)
    t = np.asarray([0.4, 1.2], np.float32)
    ours = ladd.teacher_features(SanaTransformer(cfg), params, x_hat, t, y, mask, (0, 2))
    captured = {}
    hooks = [model_pt.transformer_blocks[i].register_forward_hook(
        lambda m, a, out, i=i: captured.__setitem__(i, out.detach().numpy().copy())) for i in (0, 2)]
    try:  # Prop. 3.1 / Eq. 6-7 written out: x_FM = x_hat sqrt(t_FM^2 + (1 - t_FM)^2), t_FM = sin / (sin + cos)
        t_fm = np.sin(t) / (np.sin(t) + np.cos(t))
        x_fm = x_hat * np.sqrt(t_fm**2 + (1 - t_fm) ** 2)[:, None, None, None]
        torch_ref.diffusers_velocity(model_pt, x_fm, t_fm, y, mask)
    finally:
        for h in hooks:
            h.remove()
    assert len(ours) == 2
    for f, i in zip(ours, (0, 2), strict=True):
        assert f.shape == captured[i].shape
        assert rel_err(f, captured[i]) < 1e-5, i
    assert rel_err(ours[0], captured[2]) > 1e-2  # the blocks' outputs differ: the index matters


# ---------------------------------------------------------------- the adversarial gradient
def test_adversarial_loss_gradient_reaches_the_student_through_the_frozen_teacher():
    """LADD only, float64: the student's gradient of L_adv^G is non-zero in every transformer block and equals a
    central finite difference of the loss along a random direction; the logvar head (sCM only) gets none."""
    with jax.enable_x64(True):
        tcfg = TEACHER.replace(dtype="float64")
        d = Distiller(tcfg, DistillConfig(**FAST, use_scm=False))
        tp = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), SanaTransformer(tcfg).init(jax.random.key(0)))
        state = d.init(tp, np.zeros((5, 12)), jax.random.key(1))
        state = state.replace(student=jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), state.student),
                              heads=jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), state.heads))
        batch = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), _batch())
        rng = jax.random.key(5)
        value_and_grad = jax.jit(jax.value_and_grad(lambda p: d.generator_loss(p, state, batch, rng)[0]))
        loss = lambda p: value_and_grad(p)[0]  # noqa: E731  (one compilation serves all three evaluations)
        grads = value_and_grad(state.student)[1]
        blocks = grads["net"]["transformer_blocks"]
        for leaf in jax.tree.leaves(blocks["attn1"]) + jax.tree.leaves(blocks["ff"]):
            assert float(jnp.abs(leaf).max()) > 0
        assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(grads["logvar"]))
        leaves, treedef = jax.tree.flatten(state.student)
        keys = jax.random.split(jax.random.key(9), len(leaves))
        v = jax.tree.unflatten(treedef, [jax.random.normal(k, a.shape, jnp.float64)
                                         for k, a in zip(keys, leaves, strict=True)])
        h = 1e-6
        shift = lambda s: jax.tree.map(lambda p, d_: p + s * d_, state.student, v)  # noqa: E731
        fd = (float(loss(shift(h))) - float(loss(shift(-h)))) / (2 * h)
        analytic = sum(float(jnp.sum(g * d_)) for g, d_ in zip(jax.tree.leaves(grads), jax.tree.leaves(v), strict=True))
        assert abs(analytic) > 1e-6
        assert abs(analytic - fd) / abs(fd) < 1e-6, (analytic, fd)

