"""Teacher with classifier-free guidance, the student, and the sCM loss with the exact `jax.jvp` tangent.

Shapes: latents x [B, C, H, W] in TrigFlow scale (VAE latents * sigma_d), t [B] TrigFlow times, captions
[B, L, C_text] with masks [B, L], guidance scales w [B]. All functions are pure and jit-friendly.

ControlNet distillation (paper §3.4): `control` = (SanaControlNet, its params, control latents [B, C, H, W],
conditioning scale) binds a ControlNet to a model call; for the student its params are `params["control"]`.
The ControlNet sees the same latents, time, caption and guidance as its transformer, so the JVP runs through
both (the tangent of the controlled student).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sprintjax import trigflow
from sprintjax.controlnet import controlled_apply
from sprintjax.distill_config import DistillConfig
from sprintjax.model import SanaTransformer


def _b(t):
    return t[:, None, None, None]


# ---------------------------------------------------------------- teacher (facts §3)
def _velocity(model, params, caption, mask, guidance=None, control=None):
    """The flow velocity (x_fm, t_fm) -> v of a model, controlled when `control` is given."""
    if control is None:
        return lambda xf, tf: model.apply(params, xf, tf, caption, mask, guidance)
    controlnet, control_params, latents, scale = control
    return lambda xf, tf: controlled_apply(model, params, controlnet, control_params, xf, tf, caption, latents, mask,
                                           guidance, scale)


def teacher_dxt_dt(teacher: SanaTransformer, params, null_caption, x_t, t, caption, mask, w, sigma_d, control=None):
    """dx_t/dt = sigma_d [F_u + w (F_c - F_u)]; both branches in one batched call.

    The unconditional branch uses the stored null-caption embedding [L, C_text] with the conditional mask;
    a ControlNet teacher gets its control in both branches (diffusers' SanaControlNetPipeline does so).
    """
    b = x_t.shape[0]
    null = jnp.broadcast_to(null_caption[None], (b,) + null_caption.shape).astype(caption.dtype)
    both = lambda a, c: jnp.concatenate([a, c])  # noqa: E731
    if control is not None:
        control = (*control[:2], both(control[2], control[2]), control[3])
    v = _velocity(teacher, params, both(null, caption), both(mask, mask), control=control)
    F = trigflow.flow_to_trigflow(v)(both(x_t, x_t) / sigma_d, both(t, t))
    F_u, F_c = F[:b], F[b:]
    return sigma_d * (F_u + _b(w) * (F_c - F_u))


# ---------------------------------------------------------------- student (facts §3-4)
def init_student(teacher_cfg, teacher_params, rng):
    """Student = teacher + guidance embedder (last layer zero: an exact no-op at init) + logvar head.

    Only the guidance embedder's *last* linear layer is zeroed; zeroing both would make it a dead constant.
    Returns (student model config, params {"net": SANA params, "logvar": {"kernel", "bias"}}).
    """
    cfg = teacher_cfg.replace(guidance_embeds=True)
    k_net, k_logvar = jax.random.split(rng)
    fresh = SanaTransformer(cfg).init(k_net)
    guidance = dict(fresh["time_embed"]["guidance_embedder"])
    guidance["linear_2"] = jax.tree.map(jnp.zeros_like, guidance["linear_2"])
    net = jax.tree.map(jnp.array, teacher_params)  # a copy: the student is trained, the teacher is not
    net["time_embed"] = dict(net["time_embed"], guidance_embedder=guidance)
    d = cfg.hidden_size
    logvar = {"kernel": jax.random.normal(k_logvar, (d, 1)) / jnp.sqrt(d), "bias": jnp.zeros((1,))}
    return cfg, {"net": net, "logvar": logvar}


def student_fn(student: SanaTransformer, params, caption, mask, w, control=None):
    """F_theta(x_hat, t) -> (F, logvar [B]) via Prop. 3.1; guidance enters as w * guidance_embeds_scale.
    control: (student ControlNet, control latents, scale), its params `params["control"]`, or None."""
    g = w * student.config.guidance_embeds_scale

    def velocity(x_fm, t_fm):
        residuals = None
        if control is not None:
            controlnet, latents, scale = control
            residuals = controlnet.apply(params["control"], x_fm, t_fm, caption, latents, mask, g, scale)
        v, aux = student.forward(params["net"], x_fm, t_fm, caption, mask, g, control=residuals)
        logvar = aux["cond"] @ params["logvar"]["kernel"] + params["logvar"]["bias"]  # Linear(cond) -> [B, 1]
        return v, logvar[:, 0]

    return trigflow.flow_to_trigflow(velocity, has_aux=True)


def denoise(student, params, x_t, t, caption, mask, w, sigma_d, control=None):
    """Eq. 4 with the student: f_theta(x_t, t) = cos t x_t - sin t sigma_d F_theta(x_t / sigma_d, t)."""
    F = student_fn(student, params, caption, mask, w, control)
    return trigflow.consistency_fn(lambda x, tt: F(x, tt)[0], x_t, t, sigma_d)


# ---------------------------------------------------------------- sCM loss (facts §4, paper Eq. 9)
def scm_loss(student, params, x_t, t, dxt_dt, caption, mask, w, r, cfg: DistillConfig, control=None):
    """L_sCM (Eq. 9) with the rearranged JVP tangent; returns (loss, aux with F_theta, logvar, metrics).

    r is the tangent-warmup factor min(1, step / warmup). The JVP and the loss run in `cfg.jvp_dtype`.
    """
    sd = cfg.sigma_d
    jvp_model = dataclasses.replace(student, config=student.config.replace(dtype=cfg.jvp_dtype))
    jvp_control = control
    if control is not None:  # the ControlNet's JVP in the same dtype as the student's
        cn = control[0]
        jvp_control = (dataclasses.replace(cn, config=cn.config.replace(dtype=cfg.jvp_dtype)), *control[1:])
    x_hat = x_t / sd
    cs = jnp.cos(t) * jnp.sin(t)
    tangents = (_b(cs) * dxt_dt / sd, cs)  # v_x = cos t sin t dx_t/dt / sigma_d, v_t = cos t sin t
    if cfg.scm_form == "fused":  # one jax.jvp: the primal output carries the gradient, the tangent is stopped
        F = student_fn(jvp_model, params, caption, mask, w, jvp_control)
        F_theta, dF, logvar = jax.jvp(F, (x_hat, t), tangents, has_aux=True)
        dF = jax.lax.stop_gradient(dF)
    else:  # reference: JVP with stop-gradient parameters, then an ordinary forward for the gradient
        F_minus_fn = student_fn(jvp_model, jax.lax.stop_gradient(params), caption, mask, w, jvp_control)
        _, dF, _ = jax.jvp(F_minus_fn, (x_hat, t), tangents, has_aux=True)
        F_theta, logvar = student_fn(student, params, caption, mask, w, control)(x_hat, t)
    F_theta = F_theta.astype(jnp.float32)
    F_minus = jax.lax.stop_gradient(F_theta)
    c, s = jnp.cos(_b(t)), jnp.sin(_b(t))
    g = -c * c * (sd * F_minus - dxt_dt) - r * (c * s * x_t + sd * dF)  # g = cos t * df/dt (Eq. 5, 9)
    g_norm = jnp.sqrt(jnp.sum(g * g, axis=(1, 2, 3)))
    if cfg.tangent_norm:
        g = g / (_b(g_norm) + cfg.tangent_norm_c)  # tangent normalisation
    weight = 1.0 / (sd * jnp.tan(t)) if cfg.time_weighting else jnp.ones_like(t)  # w(t) = 1 / (sigma_d tan t)
    sq = jnp.square(F_theta - F_minus - g)
    if cfg.adaptive_weighting:
        per = _b(weight / jnp.exp(logvar)) * sq + _b(logvar)  # adaptive logvar weighting
    else:
        per = _b(weight) * sq
    loss = jnp.mean(per)
    metrics = {
        "scm_loss": loss,
        "scm_loss_no_logvar": jnp.mean(_b(weight) * sq),
        "tangent_norm_raw": jnp.mean(g_norm),
        "tangent_norm": jnp.mean(jnp.sqrt(jnp.sum(g * g, axis=(1, 2, 3)))),
        "logvar": jnp.mean(logvar),
    }
    return loss, metrics
