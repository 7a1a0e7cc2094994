"""The SANA-Sprint training steps: `generator_step` (sCM + LADD generator loss, paper Eq. 9 + 11) and
`discriminator_step` (hinge loss of the heads, Eq. 12), pure functions of (state, batch, rng).

A batch is {"latents": [B, C, H, W] in the VAE's scale, "caption": [B, L, C_text], "caption_mask": [B, L]}
(+ "control": [B, C, H, W] control latents when distilling a ControlNet teacher: teacher and student are then
each driven by a ControlNet, the teacher's frozen in `state.teacher["control"]`, the student's trained in
`state.student["control"]`; paper §3.4).
The steps alternate 1:1 on consecutive batches (the trainer's loop). `state.step` counts applied G and D
iterations (the official global step): it drives the tangent warmup; each optimiser's own count drives its
learning-rate schedule. A step whose gradient norm is non-finite changes nothing but its skip counter.
Each model call runs under a `jax.named_scope` (`teacher_cfg`, `student_scm`, ...), so profiles and
`sprintjax compile`'s collectives by model call can name it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from sprintjax import ladd, scm, trigflow
from sprintjax.came import scale_by_came
from sprintjax.controlnet import SanaControlNet, controlnet_config
from sprintjax.distill_config import DistillConfig
from sprintjax.model import SanaTransformer
from sprintjax.model_config import ModelConfig
from sprintjax.sharding import block_specs


class DistillState(flax.struct.PyTreeNode):
    step: jax.Array  # applied G + D iterations
    phase: jax.Array  # 0: the next iteration is a generator step, 1: a discriminator step
    student: Any  # {"net": SANA params with guidance embedder, "logvar": head (, "control": its ControlNet)}
    g_opt: Any
    heads: Any  # discriminator heads (trained)
    heads_state: Any  # spectral-norm vectors and batch-norm running statistics
    d_opt: Any
    ema: Any  # EMA of the student params, or None
    g_skipped: jax.Array
    d_skipped: jax.Array
    teacher: Any  # frozen teacher params (CFG teacher and discriminator trunk); {"net", "control"} with control
    null_caption: jax.Array  # [L, C_text] unconditional embedding stored with the teacher


def _stacked_mask(tree):
    """True for leaves that carry one parameter per scanned layer (under `transformer_blocks`)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    marks = [any(getattr(k, "key", None) == "transformer_blocks" for k in path) for path, _ in flat]
    return jax.tree.unflatten(jax.tree.structure(tree), marks)


def make_optimizer(cfg: DistillConfig, lr: float, warmup: int, params) -> optax.GradientTransformation:
    """Global-norm clip, CAME or AdamW, linear warmup to a constant lr (facts §6)."""
    sched = optax.linear_schedule(0.0, lr, warmup) if warmup else optax.constant_schedule(lr)
    if cfg.optimizer == "came":
        b1, b2, b3 = cfg.betas
        core = optax.chain(scale_by_came(b1, b2, b3, cfg.eps[0], cfg.eps[1], stacked=_stacked_mask(params)),
                           optax.add_decayed_weights(cfg.weight_decay), optax.scale_by_learning_rate(sched))
    else:
        core = optax.adamw(sched, b1=cfg.betas[0], b2=cfg.betas[1], eps=1e-8, weight_decay=cfg.weight_decay)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), core)


def apply_if_finite(tx, grads, opt_state, params):
    """One optimiser update, or (if the gradient norm is not finite) the inputs returned bit for bit."""
    gnorm = optax.global_norm(grads)
    ok = jnp.isfinite(gnorm)
    updates, new_opt = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
    return keep(new_params, params), keep(new_opt, opt_state), ok, gnorm


class Distiller:
    """Static description of a distillation run: models, config, optimisers. Holds no arrays."""

    def __init__(self, teacher_cfg: ModelConfig, cfg: DistillConfig, model_cls=SanaTransformer,
                 control_layers: int = 0, conditioning_scale: float = 1.0, student_cfg: ModelConfig | None = None):
        """model_cls: the transformer class of teacher and student (a subclass can pose a counterfactual
        architecture, e.g. notebooks/jvp_stability.ipynb's c_noise = 1000 t time embedding);
        control_layers: the depth of the teacher's ControlNet (0: text-to-image distillation);
        student_cfg: a student of another shape than the teacher (a pruned one, `sprintjax compress`), whose
        weights `init` then takes; default the teacher's shape with a guidance embedder."""
        self.cfg = cfg
        self.teacher = model_cls(teacher_cfg)
        self.student = model_cls(student_cfg or teacher_cfg.replace(guidance_embeds=True))
        self.blocks = cfg.disc_blocks(teacher_cfg.num_layers)
        self.control_teacher = self.control_student = None
        self.conditioning_scale = conditioning_scale
        if control_layers:
            self.control_teacher = SanaControlNet(controlnet_config(teacher_cfg, control_layers))
            self.control_student = SanaControlNet(controlnet_config(self.student.config, control_layers))

    def laid_out(self, state_sh) -> Distiller:
        """A copy whose models know their blocks' shardings (ZeRO-3 rematerialised blocks, model.py)."""
        new = copy.copy(self)
        specs = lambda tree: block_specs(tree["transformer_blocks"])  # noqa: E731
        new.student = dataclasses.replace(self.student, block_specs=specs(state_sh.student["net"]))
        new.teacher = dataclasses.replace(self.teacher, block_specs=specs(self._net(state_sh.teacher)))
        if self.control_teacher is not None:
            new.control_teacher = dataclasses.replace(self.control_teacher,
                                                      block_specs=specs(state_sh.teacher["control"]))
            new.control_student = dataclasses.replace(self.control_student,
                                                      block_specs=specs(state_sh.student["control"]))
        return new

    # ------------------------------------------------------------ ControlNets
    def _net(self, teacher):
        """The teacher transformer's params (the whole `teacher` unless it carries a ControlNet)."""
        return teacher if self.control_teacher is None else teacher["net"]

    def _teacher_control(self, teacher, batch, repeat: int = 1):
        if self.control_teacher is None:
            return None
        latents = jnp.concatenate([batch["control"]] * repeat) if repeat > 1 else batch["control"]
        return self.control_teacher, teacher["control"], latents, self.conditioning_scale

    def _student_control(self, batch):
        return None if self.control_student is None else (self.control_student, batch["control"],
                                                          self.conditioning_scale)

    # ------------------------------------------------------------ init
    def init(self, teacher_params, null_caption, rng, student_net=None) -> DistillState:
        """The initial state; the student is the teacher's copy (scm.init_student) or, given, `student_net`."""
        cfg = self.cfg
        k_s, k_h = jax.random.split(rng)
        _, student = scm.init_student(self.teacher.config, self._net(teacher_params), k_s)
        if student_net is not None:
            student["net"] = jax.tree.map(jnp.array, student_net)
        if self.control_student is not None:  # the teacher's ControlNet + the student's guidance embedder
            control = jax.tree.map(jnp.array, teacher_params["control"])
            control["time_embed"] = dict(control["time_embed"],
                                         guidance_embedder=student["net"]["time_embed"]["guidance_embedder"])
            student["control"] = control
        heads, heads_state = ladd.init_heads(k_h, self.teacher.config, self.blocks, cfg.disc_kernel)
        g_tx, d_tx = self.optimizers(student, heads)
        return DistillState(
            step=jnp.zeros([], jnp.int32), phase=jnp.zeros([], jnp.int32), student=student,
            g_opt=g_tx.init(student), heads=heads,
            heads_state=heads_state, d_opt=d_tx.init(heads),
            ema=jax.tree.map(jnp.array, student) if cfg.ema_decay else None,
            g_skipped=jnp.zeros([], jnp.int32), d_skipped=jnp.zeros([], jnp.int32),
            teacher=jax.tree.map(jnp.array, teacher_params), null_caption=jnp.array(null_caption, jnp.float32))

    def optimizers(self, student, heads):
        cfg = self.cfg
        return (make_optimizer(cfg, cfg.lr_g, cfg.warmup_steps_g, student),
                make_optimizer(cfg, cfg.lr_d, cfg.warmup_steps_d, heads))

    # ------------------------------------------------------------ shared pieces
    def _cond(self, batch):
        return batch["caption"], batch["caption_mask"].astype(jnp.float32)

    def _student_time(self, rng, b):
        """t ~ logit-normal(P_mean, P_std), replaced by max_time with probability max_time_prob (facts §5)."""
        k_t, k_m = jax.random.split(rng)
        t = trigflow.sample_time(k_t, (b,), self.cfg.p_mean, self.cfg.p_std, self.cfg.sigma_d)
        return jnp.where(jax.random.uniform(k_m, (b,)) < self.cfg.max_time_prob, self.cfg.max_time, t)

    def _d_time(self, rng, b):
        return trigflow.sample_time(rng, (b,), self.cfg.d_p_mean, self.cfg.d_p_std, self.cfg.sigma_d)

    def _z(self, rng, shape):
        return jax.random.normal(rng, shape) * self.cfg.sigma_d  # z ~ N(0, sigma_d^2 I) (facts §1)

    @staticmethod
    def _mix(x0, z, t):
        """x_t = cos t x0 + sin t z (facts §1)."""
        tb = t[:, None, None, None]
        return jnp.cos(tb) * x0 + jnp.sin(tb) * z

    def _noise(self, rng, x0, t):
        return self._mix(x0, self._z(rng, x0.shape), t)

    def generator_draws(self, rng, shape) -> dict:
        """Every random draw of one generator step for latents of `shape` [B, C, H, W]: guidance w; sCM time t
        and noise z; the student's LADD time t2 and noise z2; the discriminator's re-noising time t_d and noise
        z_d. (benchmarks/vs_pytorch.py feeds the same draws to its PyTorch step.)"""
        b = shape[0]
        k_w, k_t, k_z, k_t2, k_z2, k_td, k_zd = jax.random.split(rng, 7)
        cfg = self.cfg
        return {"w": self._guidance(k_w, b), "t": trigflow.sample_time(k_t, (b,), cfg.p_mean, cfg.p_std, cfg.sigma_d),
                "z": self._z(k_z, shape), "t2": self._student_time(k_t2, b), "z2": self._z(k_z2, shape),
                "t_d": self._d_time(k_td, b), "z_d": self._z(k_zd, shape)}

    def _guidance(self, rng, b):
        return jax.random.choice(rng, jnp.asarray(self.cfg.cfg_scales, jnp.float32), (b,))

    # ------------------------------------------------------------ generator step
    def generator_loss(self, student_params, state, batch, rng):
        """1.0 * L_sCM (Eq. 9) + 0.5 * L_adv^G (Eq. 11); returns (loss, metrics)."""
        cfg, sd = self.cfg, self.cfg.sigma_d
        x0 = batch["latents"].astype(jnp.float32) * sd
        y, mask = self._cond(batch)
        rv = self.generator_draws(rng, x0.shape)
        w = rv["w"]
        total, metrics = 0.0, {}
        teacher_params = jax.lax.stop_gradient(state.teacher)
        t_control, s_control = self._teacher_control(teacher_params, batch), self._student_control(batch)
        if cfg.use_scm:
            t = rv["t"]
            x_t = self._mix(x0, rv["z"], t)
            with jax.named_scope("teacher_cfg"):
                dxt_dt = jax.lax.stop_gradient(scm.teacher_dxt_dt(
                    self.teacher, self._net(teacher_params), state.null_caption, x_t, t, y, mask, w, sd, t_control))
            r = jnp.minimum(1.0, (state.step + 1) / cfg.tangent_warmup_steps)  # tangent warmup
            with jax.named_scope("student_scm"):
                loss, metrics = scm.scm_loss(self.student, student_params, x_t, t, dxt_dt, y, mask, w, r, cfg,
                                             s_control)
            total = total + cfg.scm_weight * loss
            metrics["tangent_warmup"] = r
        if cfg.use_ladd:
            t2, t_d = rv["t2"], rv["t_d"]
            with jax.named_scope("student_ladd"):
                x0_hat = scm.denoise(self.student, student_params, self._mix(x0, rv["z2"], t2), t2, y, mask, w, sd,
                                     s_control)
            with jax.named_scope("teacher_features"):
                feats = ladd.teacher_features(self.teacher, self._net(teacher_params),
                                              self._mix(x0_hat, rv["z_d"], t_d) / sd, t_d, y, mask, self.blocks,
                                              t_control)
            with jax.named_scope("heads"):
                logits, _ = ladd.heads_logits(jax.lax.stop_gradient(state.heads), state.heads_state, feats,
                                              self.blocks, virtual_batch=cfg.disc_virtual_batch)
            adv = ladd.generator_adv_loss(logits)
            total = total + cfg.adv_weight * adv
            metrics["adv_loss"] = adv
        metrics["g_loss"] = total
        return total, metrics

    def generator_step(self, state: DistillState, batch, rng):
        (_, metrics), grads = jax.value_and_grad(self.generator_loss, has_aux=True)(state.student, state, batch, rng)
        g_tx, _ = self.optimizers(state.student, state.heads)
        student, g_opt, ok, gnorm = apply_if_finite(g_tx, grads, state.g_opt, state.student)
        ema = state.ema
        if self.cfg.ema_decay:
            d = self.cfg.ema_decay
            ema = jax.tree.map(lambda e, p: jnp.where(ok, d * e + (1 - d) * p, e), state.ema, student)
        state = state.replace(student=student, g_opt=g_opt, ema=ema, step=state.step + ok,
                              phase=jnp.where(ok, 1, state.phase), g_skipped=state.g_skipped + (1 - ok))
        return state, dict(metrics, g_grad_norm=gnorm, g_skipped=state.g_skipped)

    # ------------------------------------------------------------ discriminator step
    def discriminator_step(self, state: DistillState, batch, rng):
        """Heads only: real latents vs student samples (+ misaligned pairs), independent re-noising times."""
        cfg, sd = self.cfg, self.cfg.sigma_d
        x0 = batch["latents"].astype(jnp.float32) * sd
        y, mask = self._cond(batch)
        b = x0.shape[0]
        k_w, k_t, k_z, k_tf, k_zf, k_tr, k_zr, k_ts, k_zs = jax.random.split(rng, 9)
        w = self._guidance(k_w, b)
        t_g = self._student_time(k_t, b)
        with jax.named_scope("student_fake"):
            fake = jax.lax.stop_gradient(scm.denoise(self.student, state.student, self._noise(k_z, x0, t_g), t_g,
                                                     y, mask, w, sd, self._student_control(batch)))
        t_fake = self._d_time(k_tf, b)
        t_real = self._d_time(k_tr, b) if cfg.independent_d_times else t_fake
        fakes, t_fakes, y_f, mask_f = self._noise(k_zf, fake, t_fake), t_fake, y, mask
        repeat = 1
        if cfg.misaligned_pairs and b > 1:  # real latents rolled by one, captions (and controls) not: fakes
            t_s = self._d_time(k_ts, b)
            shifted = self._noise(k_zs, jnp.roll(x0, 1, axis=0), t_s)
            fakes, t_fakes = jnp.concatenate([fakes, shifted]), jnp.concatenate([t_fake, t_s])
            y_f, mask_f, repeat = jnp.concatenate([y, y]), jnp.concatenate([mask, mask]), 2
        teacher_params = jax.lax.stop_gradient(state.teacher)
        feats = functools.partial(ladd.teacher_features, self.teacher, self._net(teacher_params), blocks=self.blocks)
        with jax.named_scope("teacher_features_fake"):
            f_fake = jax.lax.stop_gradient(feats(fakes / sd, t_fakes, y_f, mask_f,
                                                 control=self._teacher_control(teacher_params, batch, repeat)))
        with jax.named_scope("teacher_features_real"):
            f_real = jax.lax.stop_gradient(feats(self._noise(k_zr, x0, t_real) / sd, t_real, y, mask,
                                                 control=self._teacher_control(teacher_params, batch)))
        heads = functools.partial(ladd.heads_logits, blocks=self.blocks, virtual_batch=cfg.disc_virtual_batch,
                                  update=True)

        def loss_fn(params):
            with jax.named_scope("heads"):
                d_fake, hs = heads(params, state.heads_state, f_fake)
                d_real, hs = heads(params, hs, f_real)
            return ladd.discriminator_hinge_loss(d_real, d_fake), (d_real, d_fake, hs)

        (loss, (d_real, d_fake, hs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.heads)
        _, d_tx = self.optimizers(state.student, state.heads)
        new_heads, d_opt, ok, gnorm = apply_if_finite(d_tx, grads, state.d_opt, state.heads)
        hs = jax.tree.map(lambda n, o: jnp.where(ok, n, o), hs, state.heads_state)
        state = state.replace(heads=new_heads, d_opt=d_opt, heads_state=hs, step=state.step + ok,
                              phase=jnp.where(ok, 0, state.phase), d_skipped=state.d_skipped + (1 - ok))
        metrics = {"d_loss": loss, "d_real": jnp.mean(d_real), "d_fake": jnp.mean(d_fake),
                   **ladd.discriminator_metrics(d_real, d_fake), "d_grad_norm": gnorm, "d_skipped": state.d_skipped}
        return state, metrics

    # ------------------------------------------------------------ alternation
    def phase_step(self, phase: int):
        """The generator (0) or discriminator (1) step as a program of its own, applied only when
        `state.phase` says it is its turn (else the state comes back unchanged and `ran` is 0).

        The host alternates the two programs without reading the phase; the phase flips only when a step is
        applied, so a skipped (non-finite) step is retried at its next turn (one no-op call of the other
        program in between). One program per phase, not a `lax.cond` of both: inside the conditional,
        XLA:CPU ran the discriminator step 8.9x slower than alone (benchmarks/phase_cost.py).
        """
        step_fn = self.generator_step if phase == 0 else self.discriminator_step

        def run(state: DistillState, batch, rng):
            new, metrics = step_fn(state, batch, rng)
            turn = state.phase == phase
            new = jax.tree.map(lambda n, o: jnp.where(turn, n, o), new, state)
            return new, dict(metrics, phase=jnp.int32(phase), ran=turn.astype(jnp.int32))

        return run

    # ------------------------------------------------------------ compiled steps
    @functools.cached_property
    def jitted(self):
        """(generator_step, discriminator_step) compiled once each, donating the state."""
        return (jax.jit(self.generator_step, donate_argnums=0), jax.jit(self.discriminator_step, donate_argnums=0))
