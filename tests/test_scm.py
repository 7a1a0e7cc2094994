"""The sCM objective proved against mathematics: JVP vs finite differences, the continuous-time limit of the
discrete consistency loss, the teacher's tangent relation, and the two implementation forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err, tiny

from sprintjax import scm, trigflow
from sprintjax.distill_config import DistillConfig
from sprintjax.model import SanaTransformer

SD = 0.5


@pytest.fixture(scope="module")
def setup():
    tcfg = tiny(qk_norm="rms_norm_across_heads", num_layers=2)
    teacher = SanaTransformer(tcfg)
    tparams = teacher.init(jax.random.key(0))
    scfg, sparams = scm.init_student(tcfg, tparams, jax.random.key(1))
    # Move away from the exact-teacher point so every parameter matters.
    perturb = jax.jit(lambda p, ks: jax.tree.map(lambda a, k: a + 0.05 * jax.random.normal(k, a.shape), p, ks))
    sparams = perturb(sparams, _keys_like(sparams, jax.random.key(2)))
    rng = np.random.default_rng(0)
    b = 3
    data = dict(
        x0=jnp.asarray(rng.standard_normal((b, 4, 8, 8)) * SD, jnp.float32),
        y=jnp.asarray(rng.standard_normal((b, 5, 12)), jnp.float32),
        mask=jnp.asarray([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], jnp.float32),
        w=jnp.asarray([4.0, 4.5, 5.0]),
        t=jnp.asarray([0.3, 0.9, 1.4]),
        z=jnp.asarray(rng.standard_normal((b, 4, 8, 8)) * SD, jnp.float32),
        null=jnp.asarray(rng.standard_normal((5, 12)), jnp.float32),
    )
    return teacher, tparams, SanaTransformer(scfg), sparams, data


def _keys_like(tree, key):
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, list(jax.random.split(key, len(leaves))))


def _x_t(d):
    t = d["t"][:, None, None, None]
    return jnp.cos(t) * d["x0"] + jnp.sin(t) * d["z"]


def _f64(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)


def test_guidance_embedder_starts_as_an_exact_no_op_and_is_not_dead(setup):
    teacher, tparams, student, _, d = setup
    _, fresh = scm.init_student(teacher.config, tparams, jax.random.key(1))
    x_hat, t = _x_t(d) / SD, d["t"]
    F_teacher = trigflow.flow_to_trigflow(lambda x, tf: teacher.apply(tparams, x, tf, d["y"], d["mask"]))
    F_student = scm.student_fn(student, fresh, d["y"], d["mask"], d["w"])
    np.testing.assert_array_equal(jax.jit(F_student)(x_hat, t)[0], jax.jit(F_teacher)(x_hat, t))
    # Only the last layer is zero: its gradient is not, so the embedder can learn.
    sq = lambda p: jnp.sum(scm.student_fn(student, p, d["y"], d["mask"], d["w"])(x_hat, t)[0] ** 2)  # noqa: E731
    grads = jax.jit(jax.grad(sq))(fresh)
    assert float(jnp.abs(grads["net"]["time_embed"]["guidance_embedder"]["linear_2"]["kernel"]).max()) > 0


def test_student_jvp_matches_float64_central_difference(setup):
    """The tangent of the TrigFlow-wrapped student in x and t (through Prop. 3.1 and the time embedding)."""
    _, _, student, sparams, d = setup
    x_hat, t = _x_t(d) / SD, d["t"]
    rng = np.random.default_rng(1)
    dx, dt = rng.standard_normal(x_hat.shape), rng.standard_normal(t.shape) * 0.3
    with jax.enable_x64(True):
        s64 = SanaTransformer(student.config.replace(dtype="float64"))
        F = lambda x, tt: scm.student_fn(s64, _f64(sparams), _f64(d["y"]), d["mask"], _f64(d["w"]))(x, tt)[0]  # noqa: E731
        x64, t64, h = jnp.asarray(x_hat, jnp.float64), jnp.asarray(t, jnp.float64), 1e-6
        fd = np.asarray((F(x64 + h * dx, t64 + h * dt) - F(x64 - h * dx, t64 - h * dt)) / (2 * h))
        _, tangent = jax.jvp(F, (x64, t64), (jnp.asarray(dx), jnp.asarray(dt)))
        assert rel_err(tangent, fd) < 1e-6
    F32 = lambda x, tt: scm.student_fn(student, sparams, d["y"], d["mask"], d["w"])(x, tt)[0]  # noqa: E731
    _, tangent32 = jax.jit(lambda: jax.jvp(F32, (x_hat, t), (jnp.asarray(dx, jnp.float32),
                                                            jnp.asarray(dt, jnp.float32))))()
    assert rel_err(tangent32, fd) < 1e-4


def test_fused_and_two_pass_forms_give_the_same_gradients(setup):
    teacher, tparams, student, sparams, d = setup
    x_t = _x_t(d)
    dxt = scm.teacher_dxt_dt(teacher, tparams, d["null"], x_t, d["t"], d["y"], d["mask"], d["w"], SD)
    grads = {}
    for form in ("fused", "two_pass"):
        cfg = DistillConfig(scm_form=form)
        loss = lambda p, cfg=cfg: scm.scm_loss(student, p, x_t, d["t"], dxt, d["y"], d["mask"], d["w"], 0.7, cfg)[0]  # noqa: E731
        grads[form] = jax.jit(jax.grad(loss))(sparams)
    for a, b in zip(jax.tree.leaves(grads["fused"]), jax.tree.leaves(grads["two_pass"]), strict=True):
        assert rel_err(a, b) < 1e-5


def test_teacher_cfg_is_one_batched_call_of_both_branches(setup):
    teacher, tparams, _, _, d = setup
    x_t = _x_t(d)
    out = scm.teacher_dxt_dt(teacher, tparams, d["null"], x_t, d["t"], d["y"], d["mask"], d["w"], SD)
    F = lambda y: trigflow.flow_to_trigflow(lambda x, tf: teacher.apply(tparams, x, tf, y, d["mask"]))(x_t / SD, d["t"])  # noqa: E731
    F_c, F_u = F(d["y"]), F(jnp.broadcast_to(d["null"], d["y"].shape))
    w = d["w"][:, None, None, None]
    assert rel_err(out, SD * (F_u + w * (F_c - F_u))) < 1e-5


def test_continuous_time_limit_of_the_discrete_consistency_loss(setup):
    """Paper Eq. 2-3. With d = squared L2 and x_{t-dt} = x_t - dt dx_t/dt (the teacher's ODE step),

        grad L_dt = 2 E<df_theta/dtheta, f_theta(x_t, t) - f_theta-(x_{t-dt}, t - dt)>
                  = 2 dt E<df/dtheta, df-/dt> + O(dt^2)

    and df_theta/dtheta = -sin t sigma_d dF_theta/dtheta (Eq. 4), while the unnormalised, unweighted sCM loss
    E||F_theta - F- - g||^2 with g = cos t df-/dt (r = 1) has gradient -2 cos t E<dF/dtheta, df-/dt>. Hence
    grad L_dt / dt -> sigma_d tan t * grad L_sCM per sample: weighting each sample's discrete loss by
    1 / (sigma_d tan t) (the paper's w(t)) makes the limit exactly the sCM gradient. Checked in float64 with
    the error shrinking linearly in dt.
    """
    teacher, tparams, student, sparams, d = setup
    with jax.enable_x64(True):
        s64 = SanaTransformer(student.config.replace(dtype="float64"))
        t64 = SanaTransformer(teacher.config.replace(dtype="float64"))
        sp, tp = _f64(sparams), _f64(tparams)
        y, w, t = _f64(d["y"]), _f64(d["w"]), _f64(d["t"])
        x_t = _f64(_x_t(d))
        dxt = scm.teacher_dxt_dt(t64, tp, _f64(d["null"]), x_t, t, y, d["mask"], w, SD)
        cfg = DistillConfig(tangent_norm=False, time_weighting=False, adaptive_weighting=False, jvp_dtype="float64")
        target = jax.jit(jax.grad(lambda p: scm.scm_loss(s64, p, x_t, t, dxt, y, d["mask"], w, 1.0, cfg)[0]))(sp)

        @jax.jit
        def discrete_grad(dt):
            f = lambda p, x, tt: scm.denoise(s64, p, x, tt, y, d["mask"], w, SD)  # noqa: E731
            f_minus = jax.lax.stop_gradient(f(sp, x_t - dt * dxt, t - dt))
            per_sample = lambda p: jnp.mean(jnp.square(f(p, x_t, t) - f_minus), axis=(1, 2, 3))  # noqa: E731
            loss = lambda p: jnp.mean(per_sample(p) / (SD * jnp.tan(t))) / dt  # noqa: E731
            return jax.grad(loss)(sp)

        errs = []
        for dt in (1e-2, 1e-3, 1e-4):
            g = discrete_grad(dt)
            num = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(target),
                                                                  strict=True))
            den = sum(float(jnp.sum(b**2)) for b in jax.tree.leaves(target))
            errs.append((num / den) ** 0.5)
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-3, errs
    assert errs[1] / errs[2] > 5  # first order in dt


def test_teacher_tangent_relation_with_student_equal_to_teacher(setup):
    """With student = teacher (fresh init) and guidance scale 1, CFG reduces to the conditional teacher, so
    sigma_d F- = dx_t/dt exactly and the first term of g vanishes: g = -r (cos t sin t x_t + sigma_d dF-).
    With r = 1 this must equal cos t * df/dt, where df/dt is the derivative of the teacher's own denoiser
    f(x_t, t) = cos t x_t - sin t sigma_d F(x_t / sigma_d, t) along its PF-ODE dx_t/dt = sigma_d F (Eq. 5),
    measured here independently by a float64 central difference along the ODE.
    """
    teacher, tparams, _, _, d = setup
    with jax.enable_x64(True):
        t64 = SanaTransformer(teacher.config.replace(dtype="float64"))
        tp, y, t, x_t = _f64(tparams), _f64(d["y"]), _f64(d["t"]), _f64(_x_t(d))
        scfg, sp = scm.init_student(t64.config, tp, jax.random.key(1))
        s64 = SanaTransformer(scfg.replace(dtype="float64"))
        sp = _f64(sp)
        ones = jnp.ones(3, jnp.float64)
        dxt = scm.teacher_dxt_dt(t64, tp, _f64(d["null"]), x_t, t, y, d["mask"], ones, SD)
        F = scm.student_fn(s64, sp, y, d["mask"], ones)
        np.testing.assert_allclose(SD * F(x_t / SD, t)[0], dxt, rtol=1e-12, atol=1e-12)
        cs = (jnp.cos(t) * jnp.sin(t))
        _, dF = jax.jvp(lambda x, tt: F(x, tt)[0], (x_t / SD, t), (cs[:, None, None, None] * dxt / SD, cs))
        c, s = jnp.cos(t)[:, None, None, None], jnp.sin(t)[:, None, None, None]
        g = -(c * s * x_t + SD * dF)
        f = lambda x, tt: trigflow.consistency_fn(lambda a, b: F(a, b)[0], x, tt, SD)  # noqa: E731
        h = 1e-5
        df_dt = (f(x_t + h * dxt, t + h) - f(x_t - h * dxt, t - h)) / (2 * h)
        assert rel_err(g, c * df_dt) < 1e-7
