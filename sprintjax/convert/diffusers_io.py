"""Reading and writing diffusers transformer folders with safetensors and numpy only (no torch needed).

A folder holds `config.json` and `diffusion_pytorch_model.safetensors`, or sharded safetensors files listed in
`diffusion_pytorch_model.safetensors.index.json`. Pickle files (`.bin`, `.pt`) are never opened.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import safetensors
import safetensors.numpy

from sprintjax.errors import CheckpointError, ConfigError
from sprintjax.fileio import atomic_dir
from sprintjax.model_config import ModelConfig

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = WEIGHTS + ".index.json"


def read_config(folder: Path, controlnet: bool = False) -> ModelConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a diffusers {'ControlNet' if controlnet else 'transformer'} "
                              f"folder: no config.json")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    try:
        return ModelConfig.from_diffusers(cfg, controlnet=controlnet)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def _load_file(path: Path) -> dict[str, np.ndarray]:
    try:
        return safetensors.numpy.load_file(str(path))
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path} (corrupt or not safetensors): {e}") from None


def read_state_dict(folder: Path) -> dict[str, np.ndarray]:
    """All tensors of the folder as numpy arrays, from one file or from the shards of the index."""
    single, index = folder / WEIGHTS, folder / INDEX
    if single.is_file():
        return _load_file(single)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
        state = {}
        for shard in sorted(set(weight_map.values())):
            tensors = _load_file(folder / shard)
            stray = sorted(k for k in tensors if weight_map.get(k) != shard)
            if stray:
                raise CheckpointError(f"{folder / shard} holds tensors its index does not list: {stray[:5]}")
            state.update(tensors)
        absent = sorted(set(weight_map) - set(state))
        if absent:
            raise CheckpointError(f"index lists tensors no shard holds: {absent[:10]}")
        return state
    pickles = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    hint = f" (found {pickles}: pickle files are never loaded; convert them to safetensors)" if pickles else ""
    raise CheckpointError(f"{folder} has neither {WEIGHTS} nor {INDEX}{hint}")


def read_diffusers(src: str | Path, controlnet: bool = False) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """A transformer (or ControlNet) folder, or a pipeline folder (model_index.json) through its
    transformer/ (or controlnet/)."""
    folder = Path(src)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder")
    part = "controlnet" if controlnet else "transformer"
    if (folder / "model_index.json").is_file() and (folder / part).is_dir():
        folder = folder / part
    return read_config(folder, controlnet), read_state_dict(folder)


def write_diffusers(dst: str | Path, cfg: ModelConfig, state: dict[str, np.ndarray], force: bool = False,
                    controlnet: bool = False):
    """Writes config.json + one safetensors file atomically; `from_pretrained(dst)` loads it."""
    config = cfg.to_diffusers(controlnet=controlnet)
    with atomic_dir(dst, force=force) as tmp:
        safetensors.numpy.save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
