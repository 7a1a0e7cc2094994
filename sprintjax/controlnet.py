"""SANA ControlNet-Transformer with diffusers' `SanaControlNetModel` forward, used purely functionally.

The control branch (paper §3.4 and App. F.3; PixArt-delta's ControlNet-Transformer) is a copy of the first n
blocks of the transformer it controls. Its input is the noisy latent's patch embedding plus a zero-initialised
linear `input_block` of the control latents' patch embedding (same patch conv); after each copied block a
zero-initialised linear (`controlnet_blocks[k]`) gives a residual that, times `conditioning_scale`, is added
after main block k + 1 (diffusers' `controlnet_block_samples`). At initialisation the controlled model is
therefore exactly the base model.

Where a Sprint student has a guidance embedder and QK-norm, its ControlNet has them too: the official
ControlNet (NVlabs/Sana `SanaMSControlNet`) conditions its copied blocks on the base model's own timestep
embedding `t0` and deep-copies the base blocks, so a copy of a guidance-embedded, QK-normed model keeps both.
diffusers' `SanaControlNetModel` has neither option; such a ControlNet converts to the same key layout plus
the transformer's keys for those options (docs/controlnet.md).

A ControlNet's config is a `ModelConfig` equal to the base model's in every field but `num_layers` (its depth)
and `out_channels` (unused: it has no output layer).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from sprintjax.errors import ConfigError, ShapeError
from sprintjax.layers import MASK_BIAS, Dense, hi
from sprintjax.model import EMBED_KEYS, Embed, SanaTransformer
from sprintjax.model_config import COMPUTE_FIELDS, ModelConfig
from sprintjax.sharding import constrain_batch

CONTROL_KEYS = ("input_block", "controlnet_blocks")  # the ControlNet's own (zero-initialised) linears
_FREE = {"num_layers", "out_channels", *COMPUTE_FIELDS}  # fields a ControlNet may differ in from its base


def controlnet_config(base: ModelConfig, num_layers: int) -> ModelConfig:
    """The config of an n-block ControlNet for `base` (diffusers' default n: 7 of SANA-0.6B's 28)."""
    cfg = base.replace(num_layers=num_layers)
    check_pair(base, cfg)
    return cfg


def check_pair(base: ModelConfig, control: ModelConfig) -> None:
    """One clear error when a ControlNet cannot drive this transformer (width, options or depth differ)."""
    diff = [f"{f.name}: transformer {getattr(base, f.name)!r}, ControlNet {getattr(control, f.name)!r}"
            for f in dataclasses.fields(ModelConfig)
            if f.name not in _FREE and getattr(base, f.name) != getattr(control, f.name)]
    if not 1 <= control.num_layers < base.num_layers:
        diff.append(f"num_layers: a ControlNet of {control.num_layers} blocks needs 1 <= n < the transformer's "
                    f"{base.num_layers} (its residuals follow main blocks 1..n)")
    if diff:
        raise ConfigError("the ControlNet does not fit the transformer:\n  " + "\n  ".join(diff))


@dataclasses.dataclass(frozen=True)
class SanaControlNet:
    """Pure-functional ControlNet: `init(rng)`, `from_transformer(params)`, `apply(...) -> residuals`."""

    config: ModelConfig
    block_specs: tuple | None = None  # as SanaTransformer's (ZeRO-3 blocks)

    @property
    def blocks(self) -> SanaTransformer:
        """The copied blocks run exactly as the main model runs its own (scan, remat, ZeRO-3)."""
        return SanaTransformer(self.config, self.block_specs)

    # ---- parameters ----
    def init(self, rng) -> dict:
        """Random params as diffusers initialises a fresh SanaControlNetModel (zero linears zero)."""
        return _init(self, rng)

    def _init(self, rng) -> dict:
        d, n = self.config.hidden_size, self.config.num_layers
        base = self.blocks._init(rng)
        params = {k: base[k] for k in (*EMBED_KEYS, "transformer_blocks")}
        params["input_block"] = {"kernel": jnp.zeros((d, d)), "bias": jnp.zeros((d,))}
        params["controlnet_blocks"] = {"kernel": jnp.zeros((n, d, d)), "bias": jnp.zeros((n, d))}
        return params

    def param_shapes(self) -> dict:
        return jax.eval_shape(self._init, jax.random.key(0))

    def from_transformer(self, base_params: dict) -> dict:
        """The official initialisation (`initialize_all_and_copy_from_base`): the base model's embedders and
        first n blocks copied, the input and output linears zero, so the controlled model starts as the base."""
        d, n = self.config.hidden_size, self.config.num_layers
        params = {k: jax.tree.map(jnp.array, base_params[k]) for k in EMBED_KEYS}
        params["transformer_blocks"] = jax.tree.map(lambda a: jnp.array(a[:n]), base_params["transformer_blocks"])
        params["input_block"] = {"kernel": jnp.zeros((d, d)), "bias": jnp.zeros((d,))}
        params["controlnet_blocks"] = {"kernel": jnp.zeros((n, d, d)), "bias": jnp.zeros((n, d))}
        return params

    # ---- forward ----
    def apply(self, params, x, timestep, caption, control_cond, caption_mask=None, guidance=None,
              conditioning_scale=1.0):
        """diffusers' SanaControlNetModel.forward: residuals [n, B, N, D] for `SanaTransformer.apply(control=)`.

        control_cond: control latents [B, C, H, W] (the VAE's scale, like x); the other inputs as the
        transformer's (guidance only when the config has a guidance embedder).
        """
        cfg = self.config
        b, hh, ww, timestep, caption_mask, guidance = self.blocks._check(x, timestep, caption, caption_mask,
                                                                          guidance)
        if tuple(control_cond.shape) != tuple(x.shape):
            raise ShapeError(f"control latents must have the latents' shape {tuple(x.shape)}, "
                             f"got {tuple(control_cond.shape)}")
        nhwc = lambda a: jnp.transpose(a, (0, 2, 3, 1))  # noqa: E731
        tokens, temb6, _, y, ctrl = Embed(cfg).apply({"params": {k: params[k] for k in EMBED_KEYS}}, nhwc(x),
                                                     timestep, caption, guidance, nhwc(control_cond))
        dense = lambda p, h: Dense(cfg.hidden_size, dtype=cfg.dtype).apply({"params": p}, h)  # noqa: E731
        tokens = constrain_batch(tokens + dense(params["input_block"], ctrl))
        y_bias = (1.0 - hi(caption_mask)) * MASK_BIAS
        _, residuals = self.blocks.run_blocks(
            params["transformer_blocks"], tokens, 0, cfg.num_layers, temb6, constrain_batch(y), y_bias, (hh, ww),
            emit=(dense, params["controlnet_blocks"]))
        return hi(residuals) * conditioning_scale


@functools.partial(jax.jit, static_argnums=0)
def _init(model: SanaControlNet, rng):
    return model._init(rng)


def controlled_apply(model: SanaTransformer, params, controlnet: SanaControlNet, control_params, x, timestep,
                     caption, control_cond, caption_mask=None, guidance=None, conditioning_scale=1.0):
    """The velocity of the controlled model: diffusers' `transformer(..., controlnet_block_samples=
    controlnet(...))`, the ControlNet fed the same latents, time, caption and guidance."""
    residuals = controlnet.apply(control_params, x, timestep, caption, control_cond, caption_mask, guidance,
                                 conditioning_scale)
    return model.apply(params, x, timestep, caption, caption_mask, guidance, control=residuals)
