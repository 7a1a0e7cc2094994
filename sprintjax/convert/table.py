"""One declarative table maps diffusers' `SanaTransformer2DModel` state dict to sprintjax params, both ways.

Each row names a diffusers key, a sprintjax params path and a layout transform. Rows containing `{i}` are
per-layer: the tensors of all layers stack on axis 0 of the sprintjax leaf (the blocks run under `lax.scan`).
Rows are switched on by the config (guidance embedder, QK-norm, attention bias, affine norm2). Conversion is
strict in both directions: every missing, unexpected or misshaped tensor is listed in one error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from sprintjax.errors import CheckpointError
from sprintjax.model_config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Layout:
    """A tensor layout change: diffusers (PyTorch) <-> sprintjax (Flax)."""

    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


SAME = Layout(lambda a: a, lambda a: a)
LINEAR = Layout(lambda w: w.T, lambda k: k.T)  # (out, in) <-> (in, out)
CONV = Layout(lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1))  # OIHW <-> HWIO
CONV1X1 = Layout(lambda w: w[:, :, 0, 0].T, lambda k: k.T[:, :, None, None])  # (O, I, 1, 1) <-> Dense (I, O)


@dataclasses.dataclass(frozen=True)
class Row:
    torch: str
    flax: str
    layout: Layout
    when: Callable[[ModelConfig], bool] = lambda c: True

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.torch


def _lin(torch, flax, bias=True, when=lambda c: True):
    rows = [Row(f"{torch}.weight", f"{flax}/kernel", LINEAR, when)]
    return rows + ([Row(f"{torch}.bias", f"{flax}/bias", SAME, when)] if bias else [])


def _time(c):  # diffusers nests the plain timestep embedder under AdaLayerNormSingle.emb
    return "time_embed" if c.guidance_embeds else "time_embed.emb"


_guid = lambda c: c.guidance_embeds  # noqa: E731
_qk = lambda c: c.qk_norm is not None  # noqa: E731
_bias = lambda c: c.attention_bias  # noqa: E731
_affine = lambda c: c.norm_elementwise_affine  # noqa: E731
_B = "transformer_blocks.{i}"
_F = "transformer_blocks"

TABLE: list[Row] = [
    Row("patch_embed.proj.weight", "patch_embed/kernel", CONV),
    Row("patch_embed.proj.bias", "patch_embed/bias", SAME),
    *_lin("{time}.timestep_embedder.linear_1", "time_embed/timestep_embedder/linear_1"),
    *_lin("{time}.timestep_embedder.linear_2", "time_embed/timestep_embedder/linear_2"),
    *_lin("time_embed.guidance_embedder.linear_1", "time_embed/guidance_embedder/linear_1", when=_guid),
    *_lin("time_embed.guidance_embedder.linear_2", "time_embed/guidance_embedder/linear_2", when=_guid),
    *_lin("time_embed.linear", "time_embed/linear"),
    *_lin("caption_projection.linear_1", "caption_projection/linear_1"),
    *_lin("caption_projection.linear_2", "caption_projection/linear_2"),
    Row("caption_norm.weight", "caption_norm/weight", SAME),
    Row(f"{_B}.scale_shift_table", f"{_F}/scale_shift_table", SAME),
    *[r for p in ("to_q", "to_k", "to_v") for r in (
        Row(f"{_B}.attn1.{p}.weight", f"{_F}/attn1/{p}/kernel", LINEAR),
        Row(f"{_B}.attn1.{p}.bias", f"{_F}/attn1/{p}/bias", SAME, _bias))],
    *_lin(f"{_B}.attn1.to_out.0", f"{_F}/attn1/to_out"),
    Row(f"{_B}.attn1.norm_q.weight", f"{_F}/attn1/norm_q/weight", SAME, _qk),
    Row(f"{_B}.attn1.norm_k.weight", f"{_F}/attn1/norm_k/weight", SAME, _qk),
    *[r for p in ("to_q", "to_k", "to_v") for r in _lin(f"{_B}.attn2.{p}", f"{_F}/attn2/{p}")],
    *_lin(f"{_B}.attn2.to_out.0", f"{_F}/attn2/to_out"),
    Row(f"{_B}.attn2.norm_q.weight", f"{_F}/attn2/norm_q/weight", SAME, _qk),
    Row(f"{_B}.attn2.norm_k.weight", f"{_F}/attn2/norm_k/weight", SAME, _qk),
    Row(f"{_B}.norm2.weight", f"{_F}/norm2/weight", SAME, _affine),
    Row(f"{_B}.norm2.bias", f"{_F}/norm2/bias", SAME, _affine),
    Row(f"{_B}.ff.conv_inverted.weight", f"{_F}/ff/conv_inverted/kernel", CONV1X1),
    Row(f"{_B}.ff.conv_inverted.bias", f"{_F}/ff/conv_inverted/bias", SAME),
    Row(f"{_B}.ff.conv_depth.weight", f"{_F}/ff/conv_depth/kernel", CONV),
    Row(f"{_B}.ff.conv_depth.bias", f"{_F}/ff/conv_depth/bias", SAME),
    Row(f"{_B}.ff.conv_point.weight", f"{_F}/ff/conv_point/kernel", CONV1X1),
    Row("scale_shift_table", "scale_shift_table", SAME),
    *_lin("proj_out", "proj_out"),
]

# diffusers' SanaControlNetModel: the transformer's embedders and blocks (no output layer), plus its zero
# linears. A ControlNet of a guidance-embedded or QK-normed model keeps those rows (sprintjax.controlnet).
CONTROLNET_TABLE: list[Row] = [
    *[r for r in TABLE if r.flax.split("/")[0] not in ("scale_shift_table", "proj_out")],
    *_lin("input_block", "input_block"),
    *_lin("controlnet_blocks.{i}", "controlnet_blocks"),
]


def rows_for(cfg: ModelConfig, table: list[Row] = TABLE) -> list[Row]:
    """The rows of `table` that apply to this config, with `{time}` resolved."""
    out = []
    for r in table:
        if r.when(cfg):
            out.append(dataclasses.replace(r, torch=r.torch.replace("{time}", _time(cfg))))
    return out


def _get(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def _set(tree, path, value):
    *parents, leaf = path.split("/")
    for k in parents:
        tree = tree.setdefault(k, {})
    tree[leaf] = value


def _flat_paths(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flat_paths(v, f"{prefix}{k}/")
    else:
        yield prefix[:-1]


def _torch_shape(row: Row, flax_shape: tuple) -> tuple:
    """The diffusers shape of one (per-layer) tensor, derived from the sprintjax shape without allocating."""
    shape = flax_shape[1:] if row.per_layer else flax_shape
    return row.layout.to_torch(np.broadcast_to(np.zeros((), np.float32), shape)).shape


def _report(what: str, missing, unexpected, misshaped):
    lines = [f"  missing: {k} (expected shape {s})" for k, s in missing]
    lines += [f"  unexpected: {k} (shape {s})" for k, s in unexpected]
    lines += [f"  misshaped: {k}: expected {e}, found {f}" for k, e, f in misshaped]
    if lines:
        raise CheckpointError(f"{what}: {len(lines)} problem(s)\n" + "\n".join(lines))


def state_dict_to_params(state: dict[str, np.ndarray], cfg: ModelConfig, shapes: dict,
                         table: list[Row] = TABLE) -> dict:
    """diffusers state dict -> sprintjax params (float32), checked against `shapes` (from param_shapes)."""
    missing, misshaped, params, seen = [], [], {}, set()
    for row in rows_for(cfg, table):
        fshape = tuple(_get(shapes, row.flax).shape)
        tshape = _torch_shape(row, fshape)
        layers = range(cfg.num_layers) if row.per_layer else [None]
        arrays = []
        for i in layers:
            key = row.torch.format(i=i) if i is not None else row.torch
            seen.add(key)
            if key not in state:
                missing.append((key, tshape))
            elif tuple(state[key].shape) != tshape:
                misshaped.append((key, tshape, tuple(state[key].shape)))
            else:
                arrays.append(row.layout.to_flax(np.asarray(state[key], np.float32)))
        if len(arrays) == len(layers):
            _set(params, row.flax, np.stack(arrays) if row.per_layer else np.ascontiguousarray(arrays[0]))
    unexpected = [(k, tuple(v.shape)) for k, v in sorted(state.items()) if k not in seen]
    _report("diffusers weights do not match the model config", missing, unexpected, misshaped)
    return params


def params_to_state_dict(params: dict, cfg: ModelConfig, shapes: dict,
                         table: list[Row] = TABLE) -> dict[str, np.ndarray]:
    """sprintjax params -> diffusers state dict (numpy, contiguous), checked against `shapes`."""
    cfg.to_diffusers()  # a model diffusers has no class for (a token sampler) is refused by name first
    missing, misshaped, state, seen = [], [], {}, set()
    for row in rows_for(cfg, table):
        seen.add(row.flax)
        want = tuple(_get(shapes, row.flax).shape)
        try:
            leaf = np.asarray(_get(params, row.flax))
        except (KeyError, TypeError):
            missing.append((row.flax, want))
            continue
        if tuple(leaf.shape) != want:
            misshaped.append((row.flax, want, tuple(leaf.shape)))
            continue
        if row.per_layer:
            for i in range(cfg.num_layers):
                state[row.torch.format(i=i)] = np.ascontiguousarray(row.layout.to_torch(leaf[i]))
        else:
            state[row.torch] = np.ascontiguousarray(row.layout.to_torch(leaf))
    unexpected = [(p, tuple(np.shape(_get(params, p)))) for p in _flat_paths(params) if p not in seen]
    _report("params do not match the model config", missing, unexpected, misshaped)
    return state
