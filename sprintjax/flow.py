"""Flow-matching training of a SANA teacher: the adaptation stage of the paper's §3.2 (dense time embedding,
QK-norm added) and teacher pretraining. A pure, jitted `teacher_step(state, batch, rng)`.

x_t = (1 - t) x0 + t eps, target velocity eps - x0, t = sigmoid(n), n ~ N(0, 1) (SANA's logit-normal time);
the model sees t in [0, 1] (c_noise = t). Captions are replaced by the null caption with probability
`cond_drop` so that the teacher also learns the unconditional branch its classifier-free guidance needs.

With a ControlNet (stage `controlnet`, paper §3.4: "continuing the training of a pre-trained text-to-image
model with a diffusion objective" on control data) the same loss trains only the ControlNet, initialised
as a copy of the frozen teacher's first blocks (sprintjax.controlnet), the teacher held in `state.teacher`.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from sprintjax.controlnet import SanaControlNet, controlled_apply, controlnet_config
from sprintjax.distill import apply_if_finite
from sprintjax.model import SanaTransformer
from sprintjax.sharding import block_specs


class TeacherState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any  # the trained params: the teacher's, or its ControlNet's
    opt: Any
    ema: Any  # exponential moving average of params (what is exported), or None
    skipped: jax.Array
    null_caption: jax.Array  # [L, C_text]
    teacher: Any = None  # the frozen teacher a ControlNet is trained on (not checkpointed), or None


def adapt_params(src_params, dst: SanaTransformer, rng):
    """Params for `dst` from a checkpoint of another config: shared leaves copied, new ones (e.g. QK-norm
    weights, initialised to 1) from `dst.init`. Shapes of shared leaves must agree."""
    fresh = dst.init(rng)
    src = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(src_params)[0]}

    def pick(path, leaf):
        old = src.get(jax.tree_util.keystr(path))
        return leaf if old is None or old.shape != leaf.shape else jnp.array(old)

    return jax.tree_util.tree_map_with_path(pick, fresh)


def make_teacher_optimizer(lr: float, warmup: int, clip: float = 1.0) -> optax.GradientTransformation:
    sched = optax.linear_schedule(0.0, lr, warmup) if warmup else optax.constant_schedule(lr)
    return optax.chain(optax.clip_by_global_norm(clip), optax.adamw(sched, b1=0.9, b2=0.999, weight_decay=0.0))


def flow_loss(model: SanaTransformer, params, batch, rng, null_caption, cond_drop: float, control=None):
    """Flow-matching loss of `params`; control = (SanaControlNet, frozen teacher params, conditioning scale):
    `params` are then the ControlNet's, fed batch["control"]."""
    x0 = batch["latents"].astype(jnp.float32)
    b = x0.shape[0]
    k_t, k_e, k_d = jax.random.split(rng, 3)
    t = jax.nn.sigmoid(jax.random.normal(k_t, (b,)))
    eps = jax.random.normal(k_e, x0.shape)
    tb = t[:, None, None, None]
    x_t = (1 - tb) * x0 + tb * eps
    drop = jax.random.uniform(k_d, (b,)) < cond_drop
    caption = jnp.where(drop[:, None, None], null_caption[None].astype(jnp.float32), batch["caption"])
    if control is None:
        v = model.apply(params, x_t, t, caption, batch["caption_mask"])
    else:
        controlnet, teacher, scale = control
        v = controlled_apply(model, teacher, controlnet, params, x_t, t, caption, batch["control"],
                             batch["caption_mask"], conditioning_scale=scale)
    loss = jnp.mean(jnp.square(v - (eps - x0)))
    return loss, {"flow_loss": loss}


def apply_step(state: TeacherState, grads, metrics, tx, ema_decay: float):
    """One optimiser update of `state.params` (skipped, counted, if the gradient is not finite) and its EMA."""
    params, opt, ok, gnorm = apply_if_finite(tx, grads, state.opt, state.params)
    ema = state.ema
    if ema_decay:
        ema = jax.tree.map(lambda e, p: jnp.where(ok, ema_decay * e + (1 - ema_decay) * p, e), state.ema, params)
    state = state.replace(params=params, opt=opt, ema=ema, step=state.step + ok, skipped=state.skipped + (1 - ok))
    return state, dict(metrics, grad_norm=gnorm, skipped=state.skipped)


class TeacherTrainer:
    """Static description of teacher training; `step` is the pure function the trainer jits."""

    def __init__(self, model_cfg, lr: float, warmup: int, cond_drop: float = 0.1, ema_decay: float = 0.0,
                 control_layers: int = 0, conditioning_scale: float = 1.0):
        self.model = SanaTransformer(model_cfg)
        self.controlnet = SanaControlNet(controlnet_config(model_cfg, control_layers)) if control_layers else None
        self.tx = make_teacher_optimizer(lr, warmup)
        self.cond_drop, self.ema_decay, self.conditioning_scale = cond_drop, ema_decay, conditioning_scale

    def laid_out(self, state_sh) -> TeacherTrainer:
        """A copy whose models know their blocks' shardings (ZeRO-3 rematerialised blocks, model.py)."""
        new = copy.copy(self)
        specs = block_specs(state_sh.params["transformer_blocks"])
        if self.controlnet is None:
            new.model = dataclasses.replace(self.model, block_specs=specs)
        else:
            new.controlnet = dataclasses.replace(self.controlnet, block_specs=specs)
            new.model = dataclasses.replace(self.model,
                                            block_specs=block_specs(state_sh.teacher["transformer_blocks"]))
        return new

    def init(self, params, null_caption) -> TeacherState:
        teacher = None
        if self.controlnet is not None:  # the official init: a copy of the teacher's embedders and first blocks
            teacher, params = params, self.controlnet.from_transformer(params)
        params = jax.tree.map(jnp.array, params)
        return TeacherState(step=jnp.zeros([], jnp.int32), params=params, opt=self.tx.init(params),
                            ema=jax.tree.map(jnp.array, params) if self.ema_decay else None,
                            skipped=jnp.zeros([], jnp.int32), null_caption=jnp.array(null_caption, jnp.float32),
                            teacher=teacher)

    def step(self, state: TeacherState, batch, rng):
        control = None if self.controlnet is None else (self.controlnet, state.teacher, self.conditioning_scale)
        grad_fn = jax.value_and_grad(flow_loss, argnums=1, has_aux=True)
        (_, metrics), grads = grad_fn(self.model, state.params, batch, rng, state.null_caption, self.cond_drop,
                                      control)
        return apply_step(state, grads, metrics, self.tx, self.ema_decay)
