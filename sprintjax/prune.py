"""Structured pruning of a SANA transformer by measured sensitivity (issue 22; NanoFLUX's progressive pruning).

What can go while the result stays a diffusers `SanaTransformer2DModel` (one config for every block):
- whole blocks (`num_layers`);
- cross-attention heads (`num_cross_attention_heads`): the same count in every block, each block keeping its
  own most important heads;
- Mix-FFN channels (`mlp_ratio`): the same count in every block, each block keeping its own channels (a GLU
  channel j is the value channel j and the gate channel H + j of `conv_inverted` / `conv_depth`, and input j of
  `conv_point`).
Self-attention heads are not prunable on their own: diffusers ties their width to the residual stream
(`num_attention_heads * attention_head_dim` is the hidden size), so removing one is width pruning.

Sensitivity (`sensitivities`): the loss change when one unit is ablated, on held-out batches: the mean squared
difference between the ablated and the intact model's one-step denoiser outputs (Eq. 4) at the few-step sampler's
times — the recovery distillation's loss, so a unit's score is what removing it costs before recovery.
Ablation zeroes the unit's contribution (`ablate`); removing a zeroed unit changes nothing (tested), except for
a head under QK-norm across heads, whose RMS statistic also loses the head (recovery absorbs it).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

from sprintjax import trigflow
from sprintjax.errors import ConfigError
from sprintjax.model import SanaTransformer
from sprintjax.model_config import ModelConfig
from sprintjax.sampling import DEFAULT_GUIDANCE, trigflow_model

KINDS = ("block", "head", "channel")


@dataclasses.dataclass(frozen=True)
class PrunePlan:
    """The units of a source transformer that a pruned one keeps (0-based indices of the source)."""

    blocks: tuple[int, ...]  # kept blocks, in order
    cross_heads: tuple[tuple[int, ...], ...]  # per kept block: its kept cross-attention heads
    ffn_channels: tuple[tuple[int, ...], ...]  # per kept block: its kept Mix-FFN channels

    @classmethod
    def full(cls, cfg: ModelConfig) -> PrunePlan:
        """The plan that keeps everything."""
        return cls(tuple(range(cfg.num_layers)), ((*range(cfg.num_cross_attention_heads),),) * cfg.num_layers,
                   ((*range(cfg.mlp_hidden),),) * cfg.num_layers)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> PrunePlan:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"a pruning plan is JSON: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError("a pruning plan is a JSON object with blocks, cross_heads and ffn_channels")
        missing = sorted({"blocks", "cross_heads", "ffn_channels"} - set(d))
        if missing:
            raise ConfigError(f"a pruning plan needs the keys {missing}")
        return cls(tuple(d["blocks"]), tuple(map(tuple, d["cross_heads"])), tuple(map(tuple, d["ffn_channels"])))


def compose(outer: PrunePlan, inner: PrunePlan) -> PrunePlan:
    """The plan, relative to `outer`'s source, of pruning by `outer` then by `inner` (whose indices count the
    units `outer` kept): progressive pruning keeps every rung's plan relative to the uncompressed student, which
    its recovery pairs blocks with."""
    _check(inner, len(outer.blocks), len(outer.cross_heads[0]), len(outer.ffn_channels[0]))
    return PrunePlan(tuple(outer.blocks[b] for b in inner.blocks),
                     tuple(tuple(outer.cross_heads[b][h] for h in heads)
                           for b, heads in zip(inner.blocks, inner.cross_heads, strict=True)),
                     tuple(tuple(outer.ffn_channels[b][c] for c in chans)
                           for b, chans in zip(inner.blocks, inner.ffn_channels, strict=True)))


def check_plan(plan: PrunePlan, cfg: ModelConfig) -> None:
    """One ConfigError naming every way the plan does not fit the source config or a diffusers config."""
    _check(plan, cfg.num_layers, cfg.num_cross_attention_heads, cfg.mlp_hidden)


def _check(plan: PrunePlan, n: int, heads: int, channels: int) -> None:
    problems = []
    if not plan.blocks:
        problems.append("the plan keeps no block")
    bad = [b for b in plan.blocks if not 0 <= b < n]
    if bad:
        problems.append(f"blocks {bad} do not exist: the transformer has blocks 0..{n - 1}")
    if len(set(plan.blocks)) != len(plan.blocks) or list(plan.blocks) != sorted(plan.blocks):
        problems.append(f"kept blocks must be distinct and in order, got {list(plan.blocks)}")
    for what, per_block, total in (("cross_heads", plan.cross_heads, heads),
                                   ("ffn_channels", plan.ffn_channels, channels)):
        if len(per_block) != len(plan.blocks):
            problems.append(f"{what} lists {len(per_block)} blocks, the plan keeps {len(plan.blocks)}")
            continue
        counts = sorted({len(k) for k in per_block})
        if len(counts) > 1:
            problems.append(f"{what}: every block must keep the same number (one diffusers config), got {counts}")
        if 0 in counts:
            problems.append(f"{what}: a block keeps none")
        for b, kept in zip(plan.blocks, per_block, strict=True):
            out = [i for i in kept if not 0 <= i < total]
            if out or len(set(kept)) != len(kept):
                problems.append(f"{what} of block {b}: indices must be distinct and in 0..{total - 1}, got "
                                f"{sorted(kept)[:8]}{'...' if len(kept) > 8 else ''}")
    if problems:
        raise ConfigError("invalid pruning plan: " + "; ".join(problems))


def mlp_ratio_for(channels: int, hidden: int) -> float:
    """The mlp_ratio whose GLUMBConv width int(ratio * hidden) is exactly `channels` (c / d, or c + 1/2 over d
    where c / d rounds below c)."""
    for ratio in (channels / hidden, (channels + 0.5) / hidden):
        if int(ratio * hidden) == channels:
            return ratio
    raise ConfigError(f"no mlp_ratio gives {channels} Mix-FFN channels at hidden size {hidden}")


def pruned_config(cfg: ModelConfig, plan: PrunePlan) -> ModelConfig:
    check_plan(plan, cfg)
    return cfg.replace(num_layers=len(plan.blocks), num_cross_attention_heads=len(plan.cross_heads[0]),
                       mlp_ratio=mlp_ratio_for(len(plan.ffn_channels[0]), cfg.hidden_size))


def _head_columns(heads, head_dim: int) -> np.ndarray:
    return np.concatenate([np.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


def prune(params: dict, cfg: ModelConfig, plan: PrunePlan) -> tuple[dict, ModelConfig]:
    """The pruned params (numpy float32) and config: the kept blocks, and in each its kept heads and channels."""
    new_cfg = pruned_config(cfg, plan)
    hd, hidden = cfg.cross_attention_head_dim, cfg.mlp_hidden
    blocks = jax.tree.map(np.asarray, params["transformer_blocks"])
    layers = []
    for b, heads, chans in zip(plan.blocks, plan.cross_heads, plan.ffn_channels, strict=True):
        p = jax.tree.map(lambda a, b=b: a[b], blocks)
        cols, chans = _head_columns(heads, hd), np.asarray(chans)
        glu = np.concatenate([chans, hidden + chans])  # value channels, then their gates
        a2, ff = p["attn2"], p["ff"]
        for name in ("to_q", "to_k", "to_v"):
            a2[name] = {k: v[..., cols] for k, v in a2[name].items()}
        for name in ("norm_q", "norm_k"):
            if name in a2:
                a2[name] = {"weight": a2[name]["weight"][cols]}
        a2["to_out"] = {**a2["to_out"], "kernel": a2["to_out"]["kernel"][cols]}
        ff["conv_inverted"] = {k: v[..., glu] for k, v in ff["conv_inverted"].items()}
        ff["conv_depth"] = {k: v[..., glu] for k, v in ff["conv_depth"].items()}
        ff["conv_point"] = {"kernel": ff["conv_point"]["kernel"][chans]}
        layers.append(p)
    out = {k: jax.tree.map(np.asarray, v) for k, v in params.items() if k != "transformer_blocks"}
    out["transformer_blocks"] = jax.tree.map(lambda *a: np.stack(a), *layers)
    return out, new_cfg


def ablate(params: dict, cfg: ModelConfig, block_mask, head_mask, channel_mask) -> dict:
    """params with each unit's contribution scaled by its mask (1 keeps, 0 removes): a block's attention, cross-
    attention and Mix-FFN outputs [L]; a head's rows of the cross-attention output projection [L, heads]; a
    channel's row of `conv_point` [L, channels]. Traceable: the masks may be traced (vmapped) values."""
    p = params["transformer_blocks"]
    heads = jnp.repeat(head_mask, cfg.cross_attention_head_dim, axis=1)
    out = dict(p)
    out["attn1"] = {**p["attn1"], "to_out": {"kernel": p["attn1"]["to_out"]["kernel"] * block_mask[:, None, None],
                                             "bias": p["attn1"]["to_out"]["bias"] * block_mask[:, None]}}
    out["attn2"] = {**p["attn2"], "to_out": {
        "kernel": p["attn2"]["to_out"]["kernel"] * (block_mask[:, None] * heads)[:, :, None],
        "bias": p["attn2"]["to_out"]["bias"] * block_mask[:, None]}}
    point = p["ff"]["conv_point"]["kernel"] * (block_mask[:, None] * channel_mask)[:, :, None]
    out["ff"] = {**p["ff"], "conv_point": {"kernel": point}}
    return {**params, "transformer_blocks": out}


def sampler_times(max_steps: int = 4) -> np.ndarray:
    """The distinct nonzero times of the 1..max_steps-step samplers (facts §8): where the student is used."""
    times = np.concatenate([np.asarray(trigflow.schedule(k))[:-1] for k in range(1, max_steps + 1)])
    return np.unique(np.round(times, 6))[::-1].copy()


def _denoised(model, params, x_t, t, caption, mask, guidance_scale):
    """Eq. 4 with the model (its guidance embedder fed the scale when it has one)."""
    g = guidance_scale if model.config.guidance_embeds else None
    F = trigflow_model(model, params, caption, mask, g)
    return trigflow.consistency_fn(F, x_t, t)


def heldout_inputs(latents, caption, mask, times, seed: int = 0):
    """Every (sample, time) pair noised by Eq. 1 with seeded noise: x_t = cos t x0 + sin t sigma_d eps, with
    x0 = latents * sigma_d (the TrigFlow scale)."""
    n, k = latents.shape[0], len(times)
    eps = np.random.default_rng(seed).standard_normal((k, *latents.shape)).astype(np.float32)
    t = np.repeat(np.asarray(times, np.float32), n)
    x0 = np.tile(latents * trigflow.SIGMA_D, (k, 1, 1, 1))
    cb, sb = np.cos(t)[:, None, None, None], np.sin(t)[:, None, None, None]
    x_t = cb * x0 + sb * trigflow.SIGMA_D * eps.reshape(-1, *latents.shape[1:])
    return x_t.astype(np.float32), t, np.tile(caption, (k, 1, 1)), np.tile(mask, (k, 1))


def units(cfg: ModelConfig, channel_group: int = 1) -> np.ndarray:
    """Every prunable unit as (kind, block, index): blocks, cross-attention heads, groups of FFN channels."""
    if cfg.mlp_hidden % channel_group:
        raise ConfigError(f"channel_group {channel_group} must divide the {cfg.mlp_hidden} Mix-FFN channels")
    out = [(0, b, 0) for b in range(cfg.num_layers)]
    out += [(1, b, h) for b in range(cfg.num_layers) for h in range(cfg.num_cross_attention_heads)]
    out += [(2, b, g) for b in range(cfg.num_layers) for g in range(cfg.mlp_hidden // channel_group)]
    return np.asarray(out, np.int32)


def sensitivities(params, cfg: ModelConfig, latents, caption, mask, times=None, channel_group: int = 1,
                  guidance_scale: float = DEFAULT_GUIDANCE, chunk: int = 16, seed: int = 0, log=None) -> dict:
    """Each unit's loss change on the held-out batch (module docstring): {"block": [L], "head": [L, H],
    "channel": [L, C / channel_group]} of mean squared denoiser differences (the intact model scores 0)."""
    model = SanaTransformer(cfg.replace(dtype="float32", remat="none"))
    times = sampler_times() if times is None else times
    x_t, t, cap, m = (jnp.asarray(a) for a in heldout_inputs(latents, caption, mask, times, seed))
    n_l, n_h, n_c = cfg.num_layers, cfg.num_cross_attention_heads, cfg.mlp_hidden // channel_group
    full = _denoised(model, params, x_t, t, cap, m, guidance_scale)

    def loss(unit):
        kind, layer, index = unit[0], unit[1], unit[2]
        at = jax.nn.one_hot(layer, n_l)
        block = 1.0 - (kind == 0) * at
        head = 1.0 - (kind == 1) * at[:, None] * jax.nn.one_hot(index, n_h)[None]
        group = jnp.repeat(jax.nn.one_hot(index, n_c), channel_group)
        channel = 1.0 - (kind == 2) * at[:, None] * group[None]
        out = _denoised(model, ablate(params, cfg, block, head, channel), x_t, t, cap, m, guidance_scale)
        return jnp.mean(jnp.square(out - full))

    all_units = units(cfg, channel_group)
    if log:
        log(f"sensitivity of {len(all_units)} units on {x_t.shape[0]} held-out (sample, time) pairs ...")
    scores = np.asarray(jax.jit(lambda u: jax.lax.map(loss, u, batch_size=chunk))(jnp.asarray(all_units)))
    return {"block": scores[:n_l], "head": scores[n_l:n_l + n_l * n_h].reshape(n_l, n_h),
            "channel": scores[n_l + n_l * n_h:].reshape(n_l, n_c), "channel_group": channel_group}


def select(cfg: ModelConfig, sens: dict | None, num_layers: int, cross_heads: int, ffn_channels: int) -> PrunePlan:
    """The plan keeping the `num_layers` blocks, and in each the `cross_heads` heads and `ffn_channels` channels,
    whose removal costs most (the least sensitive go); ties (and `sens=None`: evenly spaced blocks, the first
    heads and channels) keep the earlier unit."""
    problems = []
    for what, want, have in (("num_layers", num_layers, cfg.num_layers),
                             ("cross_heads", cross_heads, cfg.num_cross_attention_heads),
                             ("ffn_channels", ffn_channels, cfg.mlp_hidden)):
        if not 1 <= want <= have:
            problems.append(f"{what} must be in 1..{have} (the source's), got {want}")
    group = 1 if sens is None else sens["channel_group"]
    if ffn_channels % group:
        problems.append(f"ffn_channels {ffn_channels} is not a multiple of the sensitivities' channel group {group}")
    if problems:
        raise ConfigError("cannot prune to that size: " + "; ".join(problems))

    def top(scores, k):  # the k highest scores, in index order; stable on ties
        return tuple(sorted(np.argsort(-np.asarray(scores), kind="stable")[:k].tolist()))

    if sens is None:
        blocks = tuple(np.round(np.linspace(0, cfg.num_layers - 1, num_layers)).astype(int).tolist())
        return PrunePlan(blocks, ((*range(cross_heads),),) * num_layers, ((*range(ffn_channels),),) * num_layers)
    blocks = top(sens["block"], num_layers)
    heads = tuple(top(sens["head"][b], cross_heads) for b in blocks)
    chans = []
    for b in blocks:
        groups = top(sens["channel"][b], ffn_channels // group)
        chans.append(tuple(g * group + i for g in groups for i in range(group)))
    return PrunePlan(blocks, heads, tuple(chans))
