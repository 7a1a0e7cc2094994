"""LADD: a discriminator made of the frozen teacher trunk and small per-feature heads (facts §5).

A head (StyleGAN-T's DiscHead, unconditional) maps teacher tokens [B, N, C] to per-token logits [B, N]:
spectral-norm conv k=1 -> local batch norm -> LeakyReLU(0.2), a residual block of the same at kernel 9 with
circular padding, (f(x) + x) / sqrt(2), then a spectral-norm conv C -> 1. Heads are pure functions of
(params, state, x); the state holds the power-iteration vectors (u, v) of every spectral norm and running
statistics of every batch norm, and changes only when `update=True` (the discriminator step).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sprintjax import trigflow
from sprintjax.errors import ShapeError
from sprintjax.model import SanaTransformer

LEAKY = 0.2
BN_EPS = 1e-5
BN_MOMENTUM = 0.1  # running statistics: new = (1 - m) old + m batch (PyTorch's convention)


def _normalize(v):
    return v / (jnp.linalg.norm(v) + 1e-12)


# ---------------------------------------------------------------- spectral-norm conv1d
def _conv_init(rng, k, c_in, c_out):
    kw, ku, kv = jax.random.split(rng, 3)
    bound = 1.0 / math.sqrt(c_in * k)  # PyTorch's Conv1d default init
    params = {"kernel": jax.random.uniform(kw, (k, c_in, c_out), minval=-bound, maxval=bound),
              "bias": jax.random.uniform(jax.random.fold_in(kw, 1), (c_out,), minval=-bound, maxval=bound)}
    state = {"u": _normalize(jax.random.normal(ku, (c_out,))), "v": _normalize(jax.random.normal(kv, (k * c_in,)))}
    return params, state


def _sn_conv(params, state, x, update):
    """Conv1d with weight / sigma_max(weight) (one power iteration when update), circular padding."""
    kernel = params["kernel"]
    k, c_in, c_out = kernel.shape
    w_mat = kernel.reshape(k * c_in, c_out).T  # PyTorch flattens (out, in, k) -> (out, in * k); order is irrelevant
    u, v = state["u"], state["v"]
    if update:
        w_sg = jax.lax.stop_gradient(w_mat)
        v = _normalize(w_sg.T @ u)
        u = _normalize(w_sg @ v)
    sigma = u @ (w_mat @ v)
    if k > 1:
        x = jnp.pad(x, ((0, 0), (k // 2, k // 2), (0, 0)), mode="wrap")
    y = jax.lax.conv_general_dilated(x, kernel / sigma, (1,), "VALID", dimension_numbers=("NWC", "WIO", "NWC"))
    return y + params["bias"], {"u": u, "v": v}


# ---------------------------------------------------------------- local batch norm
def _bn_init(c):
    return {"scale": jnp.ones((c,)), "bias": jnp.zeros((c,))}, {"mean": jnp.zeros((c,)), "var": jnp.ones((c,))}


def _local_bn(params, state, x, virtual_batch, update, running):
    """Batch norm whose statistics come from groups of about `virtual_batch` samples (StyleGAN-T)."""
    b = x.shape[0]
    if running:
        mean, var = state["mean"], state["var"]
        y = (x - mean) * jax.lax.rsqrt(var + BN_EPS)
    else:
        groups = -(-b // virtual_batch)
        if b % groups:
            raise ShapeError(f"discriminator batch {b} does not split into {groups} equal virtual batches")
        xg = x.reshape(groups, b // groups, *x.shape[1:])
        mean = jnp.mean(xg, axis=(1, 2), keepdims=True)
        var = jnp.mean(jnp.square(xg - mean), axis=(1, 2), keepdims=True)
        y = ((xg - mean) * jax.lax.rsqrt(var + BN_EPS)).reshape(x.shape)
        if update:
            m = BN_MOMENTUM
            state = {"mean": (1 - m) * state["mean"] + m * jax.lax.stop_gradient(jnp.mean(mean, axis=(0, 1, 2))),
                     "var": (1 - m) * state["var"] + m * jax.lax.stop_gradient(jnp.mean(var, axis=(0, 1, 2)))}
    return y * params["scale"] + params["bias"], state


# ---------------------------------------------------------------- one head
def head_init(rng, channels: int, kernel: int):
    ks = jax.random.split(rng, 3)
    params, state = {}, {}
    for name, k, key, c_out in (("conv_in", 1, ks[0], channels), ("conv_res", kernel, ks[1], channels),
                                ("cls", 1, ks[2], 1)):
        params[name], state[name] = _conv_init(key, k, channels, c_out)
    for name in ("bn_in", "bn_res"):
        params[name], state[name] = _bn_init(channels)
    return params, state


def head_apply(params, state, x, *, virtual_batch: int, update: bool = False, running: bool = False):
    """tokens [B, N, C] -> per-token logits [B, N], and the new state."""
    new = {}

    def block(x, conv, bn):
        h, new[conv] = _sn_conv(params[conv], state[conv], x, update)
        h, new[bn] = _local_bn(params[bn], state[bn], h, virtual_batch, update, running)
        return jax.nn.leaky_relu(h, LEAKY)

    h = block(x, "conv_in", "bn_in")
    h = (block(h, "conv_res", "bn_res") + h) / math.sqrt(2.0)  # residual block
    logits, new["cls"] = _sn_conv(params["cls"], state["cls"], h, update)
    return logits[..., 0], new


# ---------------------------------------------------------------- the discriminator
def init_heads(rng, teacher_cfg, blocks, kernel: int = 9):
    """One head per feature block; keys name the block (`block_2`, ...)."""
    keys = jax.random.split(rng, len(blocks))
    pairs = {f"block_{i}": head_init(k, teacher_cfg.hidden_size, kernel) for i, k in zip(blocks, keys, strict=True)}
    return {n: p for n, (p, _) in pairs.items()}, {n: s for n, (_, s) in pairs.items()}


def teacher_features(teacher: SanaTransformer, params, x_hat, t, caption, mask, blocks, control=None):
    """Tokens after the chosen teacher blocks, on the TrigFlow-transformed input (Prop. 3.1, Eq. 6-7).
    control: (teacher ControlNet, its params, control latents, scale): the controlled teacher's features."""
    tf = trigflow.t_fm_of(t)
    scale = jnp.sqrt(tf**2 + (1 - tf) ** 2)[:, None, None, None]
    x_fm, residuals = x_hat * scale, None
    if control is not None:
        controlnet, control_params, latents, cscale = control
        residuals = controlnet.apply(control_params, x_fm, tf, caption, latents, mask, None, cscale)
    _, aux = teacher.forward(params, x_fm, tf, caption, mask, features_after=blocks, features_only=True,
                             control=residuals)
    return aux["features"]


def heads_logits(heads, state, features, blocks, *, virtual_batch, update=False, running=False):
    """Concatenated per-token logits of all heads [B, sum N], and the new head state."""
    outs, new = [], {}
    for i, f in zip(blocks, features, strict=True):
        name = f"block_{i}"
        out, new[name] = head_apply(heads[name], state[name], f, virtual_batch=virtual_batch, update=update,
                                    running=running)
        outs.append(out)
    return jnp.concatenate(outs, axis=1), new


def generator_adv_loss(fake_logits):
    """L_adv^G = -mean D(fake) (hinge generator loss)."""
    return -jnp.mean(fake_logits)


def discriminator_hinge_loss(real_logits, fake_logits):
    """L_D = 0.5 (mean relu(1 - D_real) + mean relu(1 + D_fake))."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits)))


def discriminator_metrics(real_logits, fake_logits):
    """What a researcher needs to see whether D discriminates, from per-token logits.

    real_logits [B, N]; fake_logits [B, N] (student samples) or [2B, N] (then rows B.. are the misaligned
    pairs). A sample's score is the mean of its token logits. Accuracies threshold the score at 0, so they
    also move with a shared offset, which the hinge loss does not pin while |D| < 1 (its offset gradient
    cancels between reals and fakes); `d_auc`, the fraction of (real, student fake) pairs ordered correctly,
    is offset-free: 0.5 is chance, 1.0 a perfect ranking.
    """
    b = real_logits.shape[0]
    real, fake = jnp.mean(real_logits, axis=1), jnp.mean(fake_logits, axis=1)
    out = {"d_acc_real": jnp.mean(real > 0), "d_acc_fake": jnp.mean(fake[:b] < 0),
           "d_auc": jnp.mean(real[:, None] > fake[None, :b])}
    if fake.shape[0] > b:
        out["d_acc_misaligned"] = jnp.mean(fake[b:] < 0)
    return out
