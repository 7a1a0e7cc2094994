"""The SANA Linear DiT with diffusers' `SanaTransformer2DModel` forward, used purely functionally.

`params` is a plain dict pytree whose top-level keys mirror diffusers' module names; the per-layer tensors of
`transformer_blocks` are stacked on a leading layer axis and the blocks run under `lax.scan` (optionally
rematerialised), so compile time does not grow with depth; `scan_layers=False` unrolls them instead (faster
backward on XLA:CPU, and XLA's cost analysis then counts every layer: it counts a loop body once).
Inputs and outputs are NCHW like diffusers.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sprintjax import tokens as token_sampler
from sprintjax.errors import ShapeError
from sprintjax.layers import (
    MASK_BIAS,
    CaptionProjection,
    CrossAttention,
    Dense,
    LayerNorm,
    LinearAttention,
    MixFFN,
    RMSNorm,
    TimeEmbed,
    hi,
    layer_norm,
)
from sprintjax.model_config import ModelConfig
from sprintjax.sharding import constrain_batch, fsdp_block

_REMAT = {  # the policies of remat full and dots (none: no jax.checkpoint)
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _table_init(dim):
    """diffusers initialises scale-shift tables as randn / sqrt(D)."""
    return lambda key, shape, dtype=jnp.float32: jax.random.normal(key, shape, dtype) / math.sqrt(dim)


class Embed(nn.Module):
    """Patch embedding, time (+ guidance) embedding, caption projection and caption RMSNorm.

    A ControlNet also passes its control latents, embedded by the same patch conv (diffusers'
    SanaControlNetModel: `self.patch_embed(controlnet_cond)`), returned as a fifth output."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_nhwc, timestep, caption, guidance, control_nhwc=None):
        cfg, d, p = self.cfg, self.cfg.hidden_size, self.cfg.patch_size
        conv = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=cfg.dtype, param_dtype=jnp.float32,
                       name="patch_embed")
        to_tokens = lambda h: hi(h.reshape(h.shape[0], -1, d))  # noqa: E731
        tokens = to_tokens(conv(x_nhwc))
        temb6, cond = TimeEmbed(d, cfg.guidance_embeds, cfg.dtype, name="time_embed")(timestep, guidance)
        y = CaptionProjection(d, cfg.dtype, name="caption_projection")(caption)
        y = RMSNorm(1e-5, name="caption_norm")(y)
        if control_nhwc is not None:
            return tokens, temb6, cond, y, to_tokens(conv(control_nhwc))
        return tokens, temb6, cond, y


class Block(nn.Module):
    """adaLN-modulated linear self-attention, ungated cross-attention, gated Mix-FFN (facts §7)."""

    cfg: ModelConfig
    hw: tuple[int, int]

    @nn.compact
    def __call__(self, x, temb6, y, y_bias):
        cfg, d = self.cfg, self.cfg.hidden_size
        table = self.param("scale_shift_table", _table_init(d), (6, d), jnp.float32)
        mod = table[None] + temb6.reshape(x.shape[0], 6, d)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=1)
        qk = cfg.qk_norm is not None
        h = layer_norm(x, cfg.norm_eps) * (1 + scale_msa) + shift_msa
        x = x + gate_msa * LinearAttention(cfg.num_attention_heads, qk, cfg.attention_bias, cfg.dtype,
                                           name="attn1")(h)
        x = x + CrossAttention(cfg.num_cross_attention_heads, cfg.cross_attention_head_dim, qk, cfg.dtype,
                               name="attn2")(x, y, y_bias)
        h = LayerNorm(cfg.norm_eps, cfg.norm_elementwise_affine, name="norm2")(x) * (1 + scale_mlp) + shift_mlp
        return x + gate_mlp * MixFFN(cfg.mlp_hidden, self.hw, cfg.dtype, name="ff")(h)


class Final(nn.Module):
    """shift, scale = table[2, D] + cond; LN(x)(1 + scale) + shift -> Linear(D -> p*p*C_out)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, cond):
        cfg, d = self.cfg, self.cfg.hidden_size
        table = self.param("scale_shift_table", _table_init(d), (2, d), jnp.float32)
        shift, scale = jnp.split(table[None] + cond[:, None], 2, axis=1)
        h = layer_norm(x, 1e-6) * (1 + scale) + shift
        return Dense(cfg.patch_size**2 * cfg.out_ch, dtype=cfg.dtype, name="proj_out")(h)


EMBED_KEYS = ("patch_embed", "time_embed", "caption_projection", "caption_norm")
FINAL_KEYS = ("scale_shift_table", "proj_out")


@dataclasses.dataclass(frozen=True)
class SanaTransformer:
    """Pure-functional SANA transformer: `init(rng) -> params`, `apply(params, ...) -> velocity`.

    Holds only hashable fields (the config, the blocks' layout), so it can be a static argument of `jax.jit`.
    """

    config: ModelConfig
    block_specs: tuple | None = None  # sharding.block_specs of the params' blocks (ZeRO-3 blocks: zero3_blocks)

    # ---- parameters ----
    def init(self, rng) -> dict:
        """Random float32 params (compiled once per config)."""
        return _init(self, rng)

    def _init(self, rng) -> dict:
        cfg = self.config
        k_embed, k_blocks, k_final = jax.random.split(rng, 3)
        x, t, y, g, tok, temb6, ybias = self._dummies()
        params = dict(Embed(cfg).init(k_embed, x, t, y, g)["params"])
        block = Block(cfg, (1, 1))
        init_block = lambda k: block.init(k, tok, temb6, tok, ybias)["params"]
        params["transformer_blocks"] = jax.vmap(init_block)(jax.random.split(k_blocks, cfg.num_layers))
        params.update(Final(cfg).init(k_final, tok, tok[:, 0])["params"])
        if cfg.token_sampler:
            params.update(token_sampler.init(jax.random.fold_in(k_blocks, 1), cfg.hidden_size))
        return params

    def param_shapes(self) -> dict:
        """Parameter shapes and dtypes without allocating (jax.eval_shape)."""
        return jax.eval_shape(self._init, jax.random.key(0))

    def _dummies(self):
        cfg, d, p = self.config, self.config.hidden_size, self.config.patch_size
        z = lambda *shape: jnp.zeros(shape, jnp.float32)  # noqa: E731
        return (z(1, p, p, cfg.in_channels), z(1), z(1, 1, cfg.caption_channels), z(1), z(1, 1, d), z(1, 6 * d),
                z(1, 1))

    # ---- forward ----
    def apply(self, params, x, timestep, caption, caption_mask=None, guidance=None, control=None):
        """Velocity of the flow model: diffusers' forward(x, caption, timestep, guidance, caption_mask).

        x: [B, C, H, W]; timestep: scalar or [B] (flow-matching time, t_FM in [0, 1] for SANA-Sprint);
        caption: [B, L, caption_channels]; caption_mask: [B, L] of 1 (keep) / 0 (pad) or None;
        guidance: [B] guidance-embedder input (already multiplied by guidance_embeds_scale, as diffusers'
        pipeline passes it), required iff config.guidance_embeds; control: a ControlNet's residuals
        [n, B, N, D] (`controlnet.SanaControlNet.apply`), added after blocks 1..n as diffusers'
        `controlnet_block_samples`. Returns float32 [B, C_out, H, W].
        """
        out, _ = self.forward(params, x, timestep, caption, caption_mask, guidance, control=control)
        return out

    def forward(self, params, x, timestep, caption, caption_mask=None, guidance=None, features_after=(),
                features_only=False, control=None):
        """Like `apply`, also returning aux: the conditioning embedding and block features.

        features_after: 0-based block indices whose output tokens [B, N, D] are returned in
        aux["features"] (in the order given); used by the LADD discriminator, which also sets
        features_only to skip the blocks after the last feature and the output layer (output None).
        """
        cfg = self.config
        b, hh, ww, timestep, caption_mask, guidance = self._check(x, timestep, caption, caption_mask, guidance)
        x_nhwc = jnp.transpose(x, (0, 2, 3, 1))
        tokens, temb6, cond, y = Embed(cfg).apply({"params": {k: params[k] for k in EMBED_KEYS}},
                                                  x_nhwc, timestep, caption, guidance)
        tokens, y = constrain_batch(tokens), constrain_batch(y)
        if control is not None and cfg.token_sampler:
            raise ShapeError("a ControlNet does not drive a token-sampled transformer (its residuals are full-grid)")
        if control is not None and (control.ndim != 4 or control.shape[1:] != tokens.shape):
            raise ShapeError(f"ControlNet residuals must be [n, {', '.join(map(str, tokens.shape))}] (blocks, batch, "
                             f"tokens, hidden size), got {tuple(control.shape)}")
        y_bias = (1.0 - hi(caption_mask)) * MASK_BIAS
        tokens, feats = self._blocks(params, tokens, temb6, y, y_bias, (hh, ww), features_after, features_only,
                                     control)
        if features_only:
            return None, {"cond": cond, "features": feats}
        out = Final(cfg).apply({"params": {k: params[k] for k in FINAL_KEYS}}, tokens, cond)
        p = cfg.patch_size
        out = out.reshape(b, hh, ww, p, p, cfg.out_ch).transpose(0, 5, 1, 3, 2, 4)
        out = hi(out.reshape(b, cfg.out_ch, hh * p, ww * p))
        return out, {"cond": cond, "features": feats}

    def _blocks(self, params, tokens, temb6, y, y_bias, hw, features_after, features_only=False, control=None):
        """The main blocks, split where a feature is read, a ControlNet residual starts or stops, or the token
        sampler halves or restores the grid (features read inside the half grid are half-grid tokens)."""
        cfg, stacked = self.config, params["transformer_blocks"]
        n_layers, n_ctrl = cfg.num_layers, 0 if control is None else control.shape[0]
        for end in features_after:
            if not 0 <= end < n_layers:
                raise ShapeError(f"feature layer {end} outside 0..{n_layers - 1}")
        if n_ctrl >= n_layers:
            raise ShapeError(f"a ControlNet of {n_ctrl} blocks needs a transformer of more than {n_ctrl} blocks "
                             f"(its residuals follow blocks 1..{n_ctrl}), this one has {n_layers}")
        last = max(features_after) + 1 if features_only and features_after else n_layers
        cuts = {0, last} | {f + 1 for f in features_after} | ({1, n_ctrl + 1} if n_ctrl else set())
        cuts |= {cfg.token_down, cfg.token_up} if cfg.token_sampler else set()
        cuts = sorted(c for c in cuts if c <= last)
        feats, grid, held = {}, hw, None  # held: (full-grid tokens, half-grid input) between down and up
        for start, stop in itertools.pairwise([*cuts, None]):
            if cfg.token_sampler and start == cfg.token_down:
                held = (tokens, token_sampler.down(params["token_down"], tokens, hw, cfg.dtype))
                tokens, grid = held[1], token_sampler.half(hw)
            if cfg.token_sampler and start == cfg.token_up:
                tokens = token_sampler.up(params["token_up"], tokens, held[1], held[0], hw, cfg.dtype)
                grid = hw
            if stop is None:
                break
            # diffusers' controlnet_block_samples: sample k-1 is added after block k, for 1 <= k <= n_ctrl
            res = control[start - 1:stop - 1] if n_ctrl and 1 <= start and stop <= n_ctrl + 1 else None
            tokens = self.run_blocks(stacked, tokens, start, stop, temb6, y, y_bias, grid, residuals=res)[0]
            if stop - 1 in features_after:
                feats[stop - 1] = tokens
        return tokens, [feats[i] for i in features_after]

    def run_blocks(self, stacked, h, start, stop, temb6, y, y_bias, hw, residuals=None, emit=None):
        """Blocks start..stop-1 (scanned or unrolled, rematerialised / ZeRO-3 as configured).

        residuals: [stop - start, B, N, D] added after each block, or None. emit: fn(params, h) -> out applied
        to each block's output with that layer's params, for a
        ControlNet's zero linears; emit = (fn, params stacked like the blocks), the outputs come back stacked
        as the second result.
        """
        block = Block(self.config, hw)

        def apply(h, p, temb6, y, y_bias):
            return block.apply({"params": p}, h, temb6, y, y_bias)

        remat = self.config.remat
        if remat != "none":  # fsdp_block without specs only rematerialises
            apply = fsdp_block(apply, self.block_specs if self._zero3() else None, _REMAT[remat],
                               self._compute_kernels)
        fn, emit_params = emit if emit is not None else (None, None)

        def body(h, xs):
            p, r, e = xs
            h = constrain_batch(apply(h, p, temb6, y, y_bias))
            h = h if r is None else h + r
            return h, None if fn is None else fn(e, h)

        take = lambda tree, sl: jax.tree.map(lambda a: a[sl], tree)  # noqa: E731
        if self.config.scan_layers:
            xs = (take(stacked, slice(start, stop)), residuals, take(emit_params, slice(start, stop)))
            return jax.lax.scan(body, h, xs)
        outs = []
        for i in range(start, stop):
            xs = (take(stacked, i), None if residuals is None else residuals[i - start], take(emit_params, i))
            h, o = body(h, xs)
            outs.append(o)
        return h, None if fn is None else jnp.stack(outs)

    def _zero3(self) -> bool:
        """Whether rematerialised blocks run as ZeRO-3 under an FSDP mesh (`zero3_blocks`): `auto` is the
        measured best, today always: on v5p-64 (2 x 32) it moves 1.06x the FSDP minimum where the partitioner
        moves 2.1x, and on v5p-32 its collectives are 1.36x against the partitioner's 1.17x but its whole step
        reads half the HBM bytes (the partitioner's windowed einsums re-read their operands every trip: MFU
        bound 0.33 against 0.19; BENCHMARKS.md §3, items 9 and 13)."""
        return self.config.zero3_blocks != "off"

    def _compute_kernels(self, block_params):
        """Matmul and conv kernels in the compute dtype (every layer casts them so before use: exact)."""
        dtype = jnp.dtype(self.config.dtype)
        cast = lambda path, a: a.astype(dtype) if path[-1].key == "kernel" else a  # noqa: E731
        return jax.tree_util.tree_map_with_path(cast, block_params)

    def _check(self, x, timestep, caption, caption_mask, guidance):
        """Shape checks with messages that name the mismatch; broadcasts timestep/guidance to [B]."""
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ShapeError(f"latents must be [B, {cfg.in_channels}, H, W], got {tuple(x.shape)}")
        b, _, h, w = x.shape
        if h % cfg.patch_size or w % cfg.patch_size:
            raise ShapeError(f"latent height/width {h}x{w} must be divisible by patch_size {cfg.patch_size}")
        if caption.ndim != 3 or caption.shape[0] != b or caption.shape[2] != cfg.caption_channels:
            raise ShapeError(f"caption embeddings must be [{b}, L, {cfg.caption_channels}], got "
                             f"{tuple(caption.shape)}")
        if caption_mask is None:
            caption_mask = jnp.ones(caption.shape[:2], jnp.float32)
        elif tuple(caption_mask.shape) != tuple(caption.shape[:2]):
            raise ShapeError(f"caption mask must be {tuple(caption.shape[:2])}, got {tuple(caption_mask.shape)}")
        if cfg.guidance_embeds and guidance is None:
            raise ShapeError("this model has a guidance embedder (guidance_embeds=True): pass guidance")
        if not cfg.guidance_embeds and guidance is not None:
            raise ShapeError("this model has no guidance embedder (guidance_embeds=False): guidance must be None")
        timestep = jnp.broadcast_to(jnp.asarray(timestep), (b,))
        if guidance is not None:
            guidance = jnp.broadcast_to(jnp.asarray(guidance), (b,))
        return b, h // cfg.patch_size, w // cfg.patch_size, timestep, caption_mask, guidance


@functools.partial(jax.jit, static_argnums=0)
def _init(model: SanaTransformer, rng):
    return model._init(rng)


def count_params(params) -> int:
    """Number of scalars in a params pytree (works on ShapeDtypeStructs too)."""
    return int(sum(np.prod(a.shape) for a in jax.tree.leaves(params)))
