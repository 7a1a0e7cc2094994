"""Few-step sampling from a SANA checkpoint (student or teacher), as `SanaSprintPipeline` does it.

The flow model is wrapped into TrigFlow (Prop. 3.1); the guidance scale, if the model has a guidance
embedder, enters only through that embedding (scale * guidance_embeds_scale, facts §3 and §8).
Image-to-image starts from given latents noised to a time set by `strength` (SanaSprintImg2ImgPipeline);
a ControlNet adds its residuals at every step, fed the same control latents throughout.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sprintjax import trigflow
from sprintjax.controlnet import controlled_apply
from sprintjax.errors import ShapeError
from sprintjax.model import SanaTransformer

DEFAULT_GUIDANCE = 4.5  # SanaSprintPipeline's default guidance_scale
DEFAULT_STRENGTH = 0.6  # SanaSprintImg2ImgPipeline's default strength


def trigflow_model(model: SanaTransformer, params, caption, caption_mask=None, guidance_scale=None, control=None):
    """F(x_hat, t) of a SANA flow model with its text (and guidance) bound; Prop. 3.1 around model.apply.

    control: None, or (SanaControlNet, its params, control latents [B, C, H, W], conditioning_scale)."""
    cfg = model.config
    guidance = None
    if cfg.guidance_embeds:
        scale = DEFAULT_GUIDANCE if guidance_scale is None else guidance_scale
        guidance = jnp.full((caption.shape[0],), scale, jnp.float32) * cfg.guidance_embeds_scale
    elif guidance_scale is not None:
        raise ShapeError("this model has no guidance embedder (a teacher): --guidance does not apply")

    def velocity(x_fm, t_fm):
        if control is None:
            return model.apply(params, x_fm, t_fm, caption, caption_mask, guidance)
        controlnet, control_params, control_latents, scale = control
        return controlled_apply(model, params, controlnet, control_params, x_fm, t_fm, caption, control_latents,
                                caption_mask, guidance, scale)

    return trigflow.flow_to_trigflow(velocity)


@functools.partial(jax.jit, static_argnames=("model", "guidance_scale", "controlnet"))
def sample_latents(model, params, caption, caption_mask, noise, times, guidance_scale=None, init=None,
                   controlnet=None, control_params=None, control=None, conditioning_scale=1.0):
    """Runs the few-step sampler; noise [K, B, C, H, W]; returns final latents x0 / sigma_d [B, C, H, W].

    init: image latents for image-to-image (times from `trigflow.img2img_schedule`); controlnet,
    control_params, control: a ControlNet, its params and the control latents [B, C, H, W]."""
    bound = None if controlnet is None else (controlnet, control_params, control, conditioning_scale)
    F = trigflow_model(model, params, caption, caption_mask, guidance_scale, bound)
    return trigflow.sample(F, noise, times, init=init)


def check_latents(cfg, what: str, latents, batch: int, hw=None):
    """[B, C, H, W] latents that fit the model (and the noise's H, W when given)."""
    want = f"[{batch}, {cfg.in_channels}, {'H, W' if hw is None else ', '.join(map(str, hw))}]"
    if latents.ndim != 4 or latents.shape[0] != batch or latents.shape[1] != cfg.in_channels \
            or (hw is not None and tuple(latents.shape[2:]) != tuple(hw)):
        raise ShapeError(f"{what} must be {want} (batch, channels, height, width), got {tuple(latents.shape)}")
    if latents.shape[2] % cfg.patch_size or latents.shape[3] % cfg.patch_size:
        raise ShapeError(f"{what} height/width {latents.shape[2:]} must be divisible by patch_size "
                         f"{cfg.patch_size}")


def check_inputs(cfg, caption, caption_mask, noise, steps):
    """Clear errors for files that do not fit each other or the checkpoint's config (noise None: not given);
    `steps` is the number of model calls (fewer than asked for in image-to-image)."""
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


def sampler_times(steps: int, strength: float | None = None, t_mid: float = trigflow.T_MID):
    """The schedule of a text-to-image run, or of an image-to-image run at `strength`."""
    if strength is None:
        return trigflow.schedule(steps, t_mid=t_mid)
    return trigflow.img2img_schedule(steps, strength, t_mid=t_mid)


def sample_from_arrays(model, params, caption, caption_mask=None, *, steps: int, noise=None, seed: int = 0,
                       height: int | None = None, width: int | None = None, guidance_scale=None,
                       t_mid: float = trigflow.T_MID, init_latents=None, strength: float = DEFAULT_STRENGTH,
                       controlnet=None, control_params=None, control=None,
                       conditioning_scale: float = 1.0) -> np.ndarray:
    """Host entry point: numpy in, numpy out; draws the noise from `seed` unless `noise` is given.

    init_latents: image-to-image from these latents at `strength`; control (with controlnet and its params):
    control latents. Both [B, C, H, W] in the VAE's scale (what `sample` writes)."""
    cfg = model.config
    caption = jnp.asarray(caption, jnp.float32)
    times = sampler_times(steps, None if init_latents is None else strength, t_mid)
    calls = int(times.shape[0]) - 1
    given = next((a for a in (init_latents, control) if a is not None), None)
    if noise is None:
        hw = given.shape[2:] if given is not None else (height or cfg.sample_size, width or cfg.sample_size)
        noise = jax.random.normal(jax.random.key(seed), (calls, caption.shape[0], cfg.in_channels, *hw))
    check_inputs(cfg, caption, caption_mask, noise, calls)
    for what, latents in (("init latents", init_latents), ("control latents", control)):
        if latents is not None:
            check_latents(cfg, what, latents, caption.shape[0], noise.shape[3:])
    if (controlnet is None) != (control is None):
        raise ShapeError("a ControlNet needs control latents and control latents need a ControlNet")
    as_f32 = lambda a: None if a is None else jnp.asarray(a, jnp.float32)  # noqa: E731
    out = sample_latents(model, params, caption, as_f32(caption_mask), as_f32(noise), times, guidance_scale,
                         as_f32(init_latents), controlnet, control_params, as_f32(control), conditioning_scale)
    return np.asarray(out)
