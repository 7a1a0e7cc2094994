"""Recovery of a pruned student (issue 22; NanoFLUX's distillation after each pruning step): train stage `recover`.

The pruned student (`sprintjax compress`, `train.student_checkpoint`) learns to reproduce the uncompressed
Sprint student it was cut from (`train.teacher_checkpoint`, frozen): on training batches noised (Eq. 1) to the
few-step sampler's times (facts §8; the times `prune.sensitivities` scores at), the loss is
    || f_small(x_t, t) - f_source(x_t, t) ||^2  +  feature_weight * mean_i ||h_i - g_{b_i}||^2 / ||g_{b_i}||^2
with f the one-step denoiser (Eq. 4), h_i the output tokens of the pruned model's block i and g_{b_i} those of
the source block it was cut from (the plan's `blocks`), each relative to the source's feature energy so the
weight does not depend on the activations' scale; a block that runs on the token sampler's half grid
(`sprintjax.tokens`) is compared with its source block's tokens pooled to that grid. The guidance embedding is
fed one of the distillation's `cfg_scales` per sample, as in sCM training. After recovery the pruned student can
be distilled further by sCM + LADD (`train.student_checkpoint` in a distillation run).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp

from sprintjax import tokens, trigflow
from sprintjax.errors import CheckpointError
from sprintjax.flow import TeacherState, apply_step, make_teacher_optimizer
from sprintjax.model import SanaTransformer
from sprintjax.model_config import ModelConfig
from sprintjax.prune import PrunePlan, pruned_config, sampler_times
from sprintjax.sharding import block_specs


def denoised_with_features(model: SanaTransformer, params, x_t, t, caption, mask, guidance, features_after,
                           sigma_d: float = trigflow.SIGMA_D):
    """Eq. 4's f(x_t, t) of the flow model through Prop. 3.1, and its tokens after the given blocks."""
    def velocity(x_fm, t_fm):
        v, aux = model.forward(params, x_fm, t_fm, caption, mask, guidance, features_after=features_after)
        return v, aux["features"]

    F, held = trigflow.flow_to_trigflow(velocity, has_aux=True), {}

    def F_out(x_hat, tt):
        out, held["features"] = F(x_hat, tt)
        return out

    return trigflow.consistency_fn(F_out, x_t, t, sigma_d), held["features"]


def pruned_student(rc) -> tuple[ModelConfig, PrunePlan]:
    """A recover run's pruned student: its config (with the run's compute settings) and the plan that cut it from
    the run's model (the source student), checked against each other."""
    from sprintjax.convert.params_ckpt import read_model_config

    path = Path(rc.train.student_checkpoint)
    if not (path / "prune_plan.json").is_file():
        raise CheckpointError(f"{path} has no prune_plan.json: train.student_checkpoint must be a `sprintjax "
                              "compress` output")
    plan = PrunePlan.from_json((path / "prune_plan.json").read_text())
    cfg = read_model_config(path).replace(**rc.model.compute_settings())
    if cfg.replace(token_down=0, token_up=0) != pruned_config(rc.model, plan):  # (+ its token sampler, if any)
        raise CheckpointError(f"{path} is not its prune_plan.json applied to config.model (the source student): "
                              f"{cfg} vs {pruned_config(rc.model, plan)}")
    return cfg, plan


class Recoverer:
    """Static description of a recovery run (the trainer's `runner` for stage `recover`)."""

    def __init__(self, source_cfg: ModelConfig, student_cfg: ModelConfig, plan: PrunePlan, lr: float, warmup: int,
                 cfg_scales, feature_weight: float = 1.0, ema_decay: float = 0.0, sigma_d: float = trigflow.SIGMA_D):
        self.model = SanaTransformer(student_cfg)  # the trained (pruned) model
        self.source = SanaTransformer(source_cfg)
        self.plan, self.cfg_scales, self.feature_weight = plan, tuple(cfg_scales), feature_weight
        self.tx = make_teacher_optimizer(lr, warmup)
        self.ema_decay, self.sigma_d = ema_decay, sigma_d
        self.times = tuple(float(t) for t in sampler_times())

    def laid_out(self, state_sh) -> Recoverer:
        new = copy.copy(self)
        new.model = dataclasses.replace(self.model, block_specs=block_specs(state_sh.params["transformer_blocks"]))
        new.source = dataclasses.replace(self.source, block_specs=block_specs(state_sh.teacher["transformer_blocks"]))
        return new

    def init(self, params, null_caption) -> TeacherState:
        """params: {"teacher": the uncompressed student (frozen), "student": the pruned one (trained)}."""
        student = jax.tree.map(jnp.array, params["student"])
        return TeacherState(step=jnp.zeros([], jnp.int32), params=student, opt=self.tx.init(student),
                            ema=jax.tree.map(jnp.array, student) if self.ema_decay else None,
                            skipped=jnp.zeros([], jnp.int32), null_caption=jnp.array(null_caption, jnp.float32),
                            teacher=params["teacher"])

    def loss(self, params, source_params, batch, rng):
        sd = self.sigma_d
        x0 = batch["latents"].astype(jnp.float32) * sd
        b = x0.shape[0]
        k_t, k_e, k_w = jax.random.split(rng, 3)
        t = jnp.asarray(self.times)[jax.random.randint(k_t, (b,), 0, len(self.times))]
        eps = jax.random.normal(k_e, x0.shape)
        tb = t[:, None, None, None]
        x_t = jnp.cos(tb) * x0 + jnp.sin(tb) * sd * eps  # Eq. 1
        w = jnp.asarray(self.cfg_scales)[jax.random.randint(k_w, (b,), 0, len(self.cfg_scales))]
        g = w * self.source.config.guidance_embeds_scale
        cap, mask = batch["caption"], batch["caption_mask"]
        want, targets = denoised_with_features(self.source, source_params, x_t, t, cap, mask, g, self.plan.blocks,
                                               sd)
        got, feats = denoised_with_features(self.model, params, x_t, t, cap, mask, g,
                                            tuple(range(len(self.plan.blocks))), sd)
        want, targets = jax.lax.stop_gradient((want, targets))
        p = self.model.config.patch_size
        hw = (x0.shape[2] // p, x0.shape[3] // p)
        targets = [g_ if h.shape == g_.shape else tokens.pool(g_, hw) for h, g_ in zip(feats, targets, strict=True)]
        out_loss = jnp.mean(jnp.square(got - want))
        feat_loss = jnp.mean(jnp.stack([jnp.mean(jnp.square(h - g_)) / jnp.mean(jnp.square(g_))
                                        for h, g_ in zip(feats, targets, strict=True)]))
        loss = out_loss + self.feature_weight * feat_loss
        return loss, {"recover_loss": loss, "output_loss": out_loss, "feature_loss": feat_loss}

    def step(self, state: TeacherState, batch, rng):
        (_, metrics), grads = jax.value_and_grad(self.loss, has_aux=True)(state.params, state.teacher, batch, rng)
        return apply_step(state, grads, metrics, self.tx, self.ema_decay)
