"""Building blocks of the SANA Linear DiT (facts §7), each with diffusers' parameter names.

Numerics: matmuls and convolutions run in the config's compute dtype with float32 parameters; every
normalisation, both attentions and the softmax run in at least float32 (float64 when the inputs are float64,
which the finite-difference tests use). Nothing here has a `custom_vjp`, so `jax.jvp` goes through all of it.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

LINEAR_ATTN_EPS = 1e-15  # diffusers' SanaLinearAttnProcessor2_0 (the original Sana code uses 1e-8)
QK_NORM_EPS = 1e-5  # diffusers' Attention default eps for its RMSNorm q/k norms
MASK_BIAS = -10000.0  # additive bias on padded caption tokens, as diffusers builds it


def hi(x):
    """Promotes to at least float32 (keeps float64) for numerically sensitive ops."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def rms_norm(x, weight, eps):
    """RMSNorm over the last axis, computed in >= float32; `weight` may be None (no affine)."""
    x = hi(x)
    y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
    return y if weight is None else y * weight


def layer_norm(x, eps, weight=None, bias=None):
    """LayerNorm over the last axis in >= float32, optionally affine."""
    x = hi(x)
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
    y = (x - mu) * jax.lax.rsqrt(var + eps)
    if weight is not None:
        y = y * weight + bias
    return y


def timestep_features(t, dim: int = 256, max_period: float = 10000.0):
    """Sinusoidal features [cos, sin] (flip_sin_to_cos, shift 0): freqs exp(-ln(1e4) i / (dim/2)) (facts §7)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = hi(t)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class Dense(nn.Dense):
    """nn.Dense with float32 parameters (the compute dtype comes from the config). Leading axes are flattened
    into one before the product: the weight gradient is then a plain 2-D dot, which XLA:CPU runs 3-4x faster
    than the same contraction over (batch, tokens) fused with a transposing copy (benchmarks/step_cost.py);
    on TPU the reshape is free."""

    param_dtype: jnp.dtype = jnp.float32

    def __call__(self, x):
        lead = x.shape[:-1]
        return super().__call__(x.reshape(-1, x.shape[-1])).reshape(*lead, self.features)


class RMSNorm(nn.Module):
    """Affine RMSNorm; parameter `weight` as in diffusers."""

    eps: float

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        return rms_norm(x, w, self.eps)


class LayerNorm(nn.Module):
    """LayerNorm with optional affine `weight`/`bias` (diffusers' norm_elementwise_affine)."""

    eps: float
    affine: bool

    @nn.compact
    def __call__(self, x):
        if not self.affine:
            return layer_norm(x, self.eps)
        d = x.shape[-1]
        w = self.param("weight", nn.initializers.ones, (d,), jnp.float32)
        b = self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
        return layer_norm(x, self.eps, w, b)


class TimestepEmbedder(nn.Module):
    """Sinusoid 256 -> Linear -> SiLU -> Linear (diffusers' TimestepEmbedding)."""

    dim: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, t):
        h = Dense(self.dim, dtype=self.dtype, name="linear_1")(timestep_features(t))
        return Dense(self.dim, dtype=self.dtype, name="linear_2")(nn.silu(h))


class TimeEmbed(nn.Module):
    """Conditioning = t_emb (+ guidance emb); adaLN input = Linear(SiLU(cond)) -> 6D (facts §3, §7)."""

    dim: int
    guidance_embeds: bool
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, timestep, guidance):
        cond = TimestepEmbedder(self.dim, self.dtype, name="timestep_embedder")(timestep)
        if self.guidance_embeds:
            cond = cond + TimestepEmbedder(self.dim, self.dtype, name="guidance_embedder")(guidance)
        cond = hi(cond)
        temb6 = Dense(6 * self.dim, dtype=self.dtype, name="linear")(nn.silu(cond))
        return hi(temb6), cond


class CaptionProjection(nn.Module):
    """Linear(C_text -> D) -> GELU(tanh) -> Linear(D -> D) (PixArtAlphaTextProjection)."""

    dim: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, y):
        h = Dense(self.dim, dtype=self.dtype, name="linear_1")(y)
        return Dense(self.dim, dtype=self.dtype, name="linear_2")(nn.gelu(h, approximate=True))


class LinearAttention(nn.Module):
    """ReLU linear self-attention: out_n = sum_m v_m (k_m . q_n) / (sum_m k_m . q_n + eps) per head (§7)."""

    heads: int
    qk_norm: bool
    use_bias: bool
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        b, n, d = x.shape
        q = Dense(d, use_bias=self.use_bias, dtype=self.dtype, name="to_q")(x)
        k = Dense(d, use_bias=self.use_bias, dtype=self.dtype, name="to_k")(x)
        v = Dense(d, use_bias=self.use_bias, dtype=self.dtype, name="to_v")(x)
        if self.qk_norm:  # rms_norm_across_heads: one RMSNorm over all heads
            q, k = RMSNorm(QK_NORM_EPS, name="norm_q")(q), RMSNorm(QK_NORM_EPS, name="norm_k")(k)
        q = jax.nn.relu(hi(q)).reshape(b, n, self.heads, -1)
        k = jax.nn.relu(hi(k)).reshape(b, n, self.heads, -1)
        v = hi(v).reshape(b, n, self.heads, -1)
        kv = jnp.einsum("bmhd,bmhe->bhde", k, v)
        num = jnp.einsum("bnhd,bhde->bnhe", q, kv)
        den = jnp.einsum("bnhd,bhd->bnh", q, jnp.sum(k, axis=1))
        out = (num / (den[..., None] + LINEAR_ATTN_EPS)).reshape(b, n, d)
        return Dense(d, dtype=self.dtype, name="to_out")(out)


class CrossAttention(nn.Module):
    """Explicit softmax(q k^T / sqrt(d) + mask bias) v over caption tokens; forward-differentiable (§4, §7)."""

    heads: int
    head_dim: int
    qk_norm: bool
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, y, y_bias):
        b, n, d = x.shape
        inner = self.heads * self.head_dim
        q = Dense(inner, dtype=self.dtype, name="to_q")(x)
        k = Dense(inner, dtype=self.dtype, name="to_k")(y)
        v = Dense(inner, dtype=self.dtype, name="to_v")(y)
        if self.qk_norm:
            q, k = RMSNorm(QK_NORM_EPS, name="norm_q")(q), RMSNorm(QK_NORM_EPS, name="norm_k")(k)
        q = hi(q).reshape(b, n, self.heads, self.head_dim)
        k = hi(k).reshape(b, -1, self.heads, self.head_dim)
        v = hi(v).reshape(b, -1, self.heads, self.head_dim)
        logits = jnp.einsum("bnhd,blhd->bhnl", q, k) / math.sqrt(self.head_dim)
        probs = jax.nn.softmax(logits + y_bias[:, None, None, :].astype(logits.dtype), axis=-1)
        out = jnp.einsum("bhnl,blhd->bnhd", probs, v).reshape(b, n, inner)
        return Dense(d, dtype=self.dtype, name="to_out")(out)


def _depthwise_row_sums(x, kernel):
    """3x3 depthwise conv, padding 1, as shifted multiply-adds: the taps of each kernel row summed first, then
    the three row sums shifted along H (autodiff keeps three shifted inputs for the kernel gradient, not eight)."""
    h, w = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    rows = [sum(padded[:, :, dx:dx + w, :] * kernel[dy, dx, 0] for dx in range(3)) for dy in range(3)]
    return sum(row[:, dy:dy + h] for dy, row in enumerate(rows))


def _depthwise_grouped(x, kernel):
    """3x3 depthwise conv, padding 1, as one grouped convolution (NHWC, kernel HWIO with I = 1)."""
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=x.shape[-1])


class DepthwiseConv3x3(nn.Module):
    """3x3 depthwise conv (padding 1, bias), parameters `kernel` [3, 3, 1, C] (Flax's depthwise layout) and
    `bias` [C]. The formulation follows the platform the program is lowered for (`lax.platform_dependent`; the
    same math): on CPU shifted multiply-adds (`_depthwise_row_sums`: XLA:CPU runs a grouped conv ~8x slower
    forward and backward inside a Mix-FFN, benchmarks/op_profile.py --ffn), elsewhere one grouped convolution,
    which reads its input once where the shifted products materialise each shift (on v5p the row sums were 24%
    of the 0.6B generator step's HBM bytes; BENCHMARKS.md §3). Both are forward-mode differentiable."""

    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, 1, c), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        x, k = x.astype(self.dtype), kernel.astype(self.dtype)
        y = jax.lax.platform_dependent(x, k, cpu=_depthwise_row_sums, default=_depthwise_grouped)
        return y + bias.astype(self.dtype)


class MixFFN(nn.Module):
    """GLUMBConv: 1x1 D->2H (bias), SiLU, 3x3 depthwise (bias), value * SiLU(gate), 1x1 H->D (no bias)."""

    hidden: int
    hw: tuple[int, int]
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        b, n, d = x.shape
        h2 = 2 * self.hidden
        h = nn.silu(Dense(h2, dtype=self.dtype, name="conv_inverted")(x))  # a 1x1 conv is a Dense on tokens
        h = DepthwiseConv3x3(self.dtype, name="conv_depth")(h.reshape(b, *self.hw, h2))
        value, gate = jnp.split(h.reshape(b, n, h2), 2, axis=-1)
        return Dense(d, use_bias=False, dtype=self.dtype, name="conv_point")(value * nn.silu(gate))
