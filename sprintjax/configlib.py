"""Configs as Python files (the big_vision convention): `path/to/file.py:arg` calls `get_config(arg)`."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import ml_collections

from sprintjax.errors import ConfigError
from sprintjax.model_config import ModelConfig


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads `file.py[:arg]` and returns its `get_config(arg)` (arg None when absent)."""
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise ConfigError(f"config file not found: {path}")
    module_spec = importlib.util.spec_from_file_location(f"_sprintjax_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config(arg)")
    return module.get_config(arg or None)


def model_config(cd: ml_collections.ConfigDict) -> ModelConfig:
    """A ConfigDict of ModelConfig fields -> ModelConfig; unknown keys are an error."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    fields = cd.to_dict()
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"unknown model config keys: {unknown}")
    return ModelConfig(**fields)
