"""A bare params checkpoint: an Orbax tree under `params/` plus the model config as `model_config.json`.

It is what `sprintjax import-diffusers` writes and what `sample` and `export-diffusers` read. Restores are
checked against the config's parameter shapes first, so a mismatch is one readable error listing every leaf.
A ControlNet's checkpoint names its config `controlnet_config.json` instead, so neither kind loads as the other.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from sprintjax.errors import CheckpointError, ConfigError
from sprintjax.fileio import atomic_dir
from sprintjax.model import SanaTransformer
from sprintjax.model_config import ModelConfig

CONFIG = "model_config.json"
CONTROLNET_CONFIG = "controlnet_config.json"
PARAMS = "params"


def _config_name(controlnet: bool) -> str:
    return CONTROLNET_CONFIG if controlnet else CONFIG


def _shapes(cfg: ModelConfig, controlnet: bool) -> dict:
    from sprintjax.controlnet import SanaControlNet

    return (SanaControlNet(cfg) if controlnet else SanaTransformer(cfg)).param_shapes()


def save_params(dst: str | Path, params: dict, cfg: ModelConfig, force: bool = False,
                controlnet: bool = False, extra: dict[str, str] | None = None) -> Path:
    """Writes the checkpoint atomically (nothing appears at `dst` unless the whole save succeeded); `extra`:
    more text files to write beside the config (name -> text), such as a pruned model's plan."""
    dst = Path(dst).absolute()
    with atomic_dir(dst, force=force) as tmp:
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(tmp / PARAMS, params)
        ckpt.wait_until_finished()
        ckpt.close()
        (tmp / _config_name(controlnet)).write_text(cfg.to_json() + "\n")
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
    return dst


def read_model_config(src: str | Path, controlnet: bool = False) -> ModelConfig:
    path = Path(src) / _config_name(controlnet)
    if not path.is_file():
        other = Path(src) / _config_name(not controlnet)
        hint = f" ({other.name} found: a {'ControlNet' if not controlnet else 'transformer'} checkpoint)" \
            if other.is_file() else ""
        kind = "ControlNet " if controlnet else ""
        raise CheckpointError(f"{src} is not a sprintjax {kind}params checkpoint: no {path.name}{hint}")
    try:
        return ModelConfig.from_json(path.read_text())
    except (json.JSONDecodeError, ConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def _leaves_by_path(tree) -> dict[str, tuple]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): tuple(leaf.shape) for p, leaf in flat}


def load_params(src: str | Path, cfg: ModelConfig | None = None, shardings=None,
                check_finite: bool = True, controlnet: bool = False) -> tuple[dict, ModelConfig]:
    """Restores params and the config; strict about names and shapes.

    `shardings` (a pytree of shardings like the params) restores each leaf straight onto its devices, with
    no full host copy (training on a mesh); `check_finite` scans every value (the CLI's default).
    """
    src = Path(src).absolute()
    cfg = cfg or read_model_config(src, controlnet)
    if not (src / PARAMS).is_dir():
        raise CheckpointError(f"{src} has no {PARAMS}/ folder")
    expected = _shapes(cfg, controlnet)
    if shardings is not None:
        expected = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), expected, shardings)
    ckpt = ocp.StandardCheckpointer()
    try:
        found = _leaves_by_path(ckpt.metadata(src / PARAMS).item_metadata.tree)
    except Exception as e:  # orbax raises many types for unreadable metadata
        raise CheckpointError(f"cannot read checkpoint metadata in {src / PARAMS}: {e}") from None
    want = _leaves_by_path(expected)
    problems = [f"  missing: {k} (expected {s})" for k, s in want.items() if k not in found]
    problems += [f"  unexpected: {k} (shape {s})" for k, s in found.items() if k not in want]
    problems += [f"  misshaped: {k}: expected {s}, found {found[k]}" for k, s in want.items()
                 if k in found and found[k] != s]
    if problems:
        raise CheckpointError(f"{src} does not match its model config:\n" + "\n".join(problems))
    try:
        params = ckpt.restore(src / PARAMS, expected)
    except Exception as e:
        raise CheckpointError(f"cannot restore {src / PARAMS} (corrupt?): {e}") from None
    finally:
        ckpt.close()
    bad = [k for k, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
           if check_finite and not np.all(np.isfinite(np.asarray(leaf)))]
    if bad:
        raise CheckpointError(f"{src}: non-finite values in {[jax.tree_util.keystr(k) for k in bad][:5]}")
    return params, cfg
