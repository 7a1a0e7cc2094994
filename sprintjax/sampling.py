"""Few-step sampling from a SANA checkpoint (student or teacher), as `SanaSprintPipeline` does it.

The flow model is wrapped into TrigFlow (Prop. 3.1); the guidance scale, if the model has a guidance
embedder, enters only through that embedding (scale * guidance_embeds_scale, facts §3 and §8).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sprintjax import trigflow
from sprintjax.errors import ShapeError
from sprintjax.model import SanaTransformer

DEFAULT_GUIDANCE = 4.5  # SanaSprintPipeline's default guidance_scale


def trigflow_model(model: SanaTransformer, params, caption, caption_mask=None, guidance_scale=None):
    """F(x_hat, t) of a SANA flow model with its text (and guidance) bound; Prop. 3.1 around model.apply."""
    cfg = model.config
    guidance = None
    if cfg.guidance_embeds:
        scale = DEFAULT_GUIDANCE if guidance_scale is None else guidance_scale
        guidance = jnp.full((caption.shape[0],), scale, jnp.float32) * cfg.guidance_embeds_scale
    elif guidance_scale is not None:
        raise ShapeError("this model has no guidance embedder (a teacher): --guidance does not apply")

    def velocity(x_fm, t_fm):
        return model.apply(params, x_fm, t_fm, caption, caption_mask, guidance)

    return trigflow.flow_to_trigflow(velocity)


@functools.partial(jax.jit, static_argnames=("model", "guidance_scale"))
def sample_latents(model, params, caption, caption_mask, noise, times, guidance_scale=None):
    """Runs the few-step sampler; noise [K, B, C, H, W]; returns final latents x0 / sigma_d [B, C, H, W]."""
    F = trigflow_model(model, params, caption, caption_mask, guidance_scale)
    return trigflow.sample(F, noise, times)


def check_inputs(cfg, caption, caption_mask, noise, steps):
    """Clear errors for files that do not fit each other or the checkpoint's config (noise None: not given)."""
    if caption.ndim != 3 or caption.shape[-1] != cfg.caption_channels:
        raise ShapeError(f"caption embeddings must be [B, L, {cfg.caption_channels}] for this checkpoint, "
                         f"got {tuple(caption.shape)}")
    if caption_mask is not None and tuple(caption_mask.shape) != tuple(caption.shape[:2]):
        raise ShapeError(f"caption mask must be {tuple(caption.shape[:2])} (the embeddings' [B, L]), "
                         f"got {tuple(caption_mask.shape)}")
    if noise is None:  # drawn later from a seed, of the right shape
        return
    want = f"[{steps}, {caption.shape[0]}, {cfg.in_channels}, H, W]"
    if noise.ndim != 5 or noise.shape[0] != steps or noise.shape[1] != caption.shape[0] \
            or noise.shape[2] != cfg.in_channels:
        raise ShapeError(f"noise must be {want} (steps, batch, channels, height, width), got {tuple(noise.shape)}")
    if noise.shape[3] % cfg.patch_size or noise.shape[4] % cfg.patch_size:
        raise ShapeError(f"noise height/width {noise.shape[3:]} must be divisible by patch_size {cfg.patch_size}")


def sample_from_arrays(model, params, caption, caption_mask=None, *, steps: int, noise=None, seed: int = 0,
                       height: int | None = None, width: int | None = None, guidance_scale=None,
                       t_mid: float = trigflow.T_MID) -> np.ndarray:
    """Host entry point: numpy in, numpy out; draws the noise from `seed` unless `noise` is given."""
    cfg = model.config
    caption = jnp.asarray(caption, jnp.float32)
    if noise is None:
        h, w = height or cfg.sample_size, width or cfg.sample_size
        noise = jax.random.normal(jax.random.key(seed), (steps, caption.shape[0], cfg.in_channels, h, w))
    check_inputs(cfg, caption, caption_mask, noise, steps)
    mask = None if caption_mask is None else jnp.asarray(caption_mask, jnp.float32)
    out = sample_latents(model, params, caption, mask, jnp.asarray(noise, jnp.float32),
                         trigflow.schedule(steps, t_mid=t_mid), guidance_scale)
    return np.asarray(out)
