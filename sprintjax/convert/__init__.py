"""Two-way conversion between diffusers transformer folders and sprintjax params checkpoints."""

from __future__ import annotations

from pathlib import Path

from sprintjax.convert.diffusers_io import read_diffusers, write_diffusers
from sprintjax.convert.params_ckpt import load_params, save_params
from sprintjax.convert.table import CONTROLNET_TABLE, params_to_state_dict, state_dict_to_params
from sprintjax.model import SanaTransformer
from sprintjax.model_config import ModelConfig


def diffusers_to_params(src: str | Path) -> tuple[dict, ModelConfig]:
    """Reads a diffusers folder into (params, config); strict about every tensor."""
    cfg, state = read_diffusers(src)
    return state_dict_to_params(state, cfg, SanaTransformer(cfg).param_shapes()), cfg


def params_to_diffusers(dst: str | Path, params: dict, cfg: ModelConfig, force: bool = False) -> None:
    """Writes params as a diffusers folder; checked before anything is written."""
    state = params_to_state_dict(params, cfg, SanaTransformer(cfg).param_shapes())
    write_diffusers(dst, cfg, state, force=force)


def diffusers_to_controlnet(src: str | Path) -> tuple[dict, ModelConfig]:
    """A diffusers SanaControlNetModel folder (or a pipeline's controlnet/) into (params, config); strict."""
    from sprintjax.controlnet import SanaControlNet

    cfg, state = read_diffusers(src, controlnet=True)
    return state_dict_to_params(state, cfg, SanaControlNet(cfg).param_shapes(), CONTROLNET_TABLE), cfg


def controlnet_to_diffusers(dst: str | Path, params: dict, cfg: ModelConfig, force: bool = False) -> None:
    """Writes ControlNet params as a diffusers SanaControlNetModel folder; checked before anything is written."""
    from sprintjax.controlnet import SanaControlNet

    state = params_to_state_dict(params, cfg, SanaControlNet(cfg).param_shapes(), CONTROLNET_TABLE)
    write_diffusers(dst, cfg, state, force=force, controlnet=True)


def load_controlnet(path: str | Path) -> tuple[dict, ModelConfig]:
    """ControlNet params and config from a sprintjax ControlNet checkpoint (controlnet_config.json) or a
    diffusers ControlNet folder."""
    from sprintjax.checks import finite_params
    from sprintjax.errors import CheckpointError

    path = Path(path)
    if (path / "controlnet_config.json").is_file():
        return load_params(path, controlnet=True)
    if (path / "config.json").is_file() or (path / "model_index.json").is_file():
        params, cfg = diffusers_to_controlnet(path)
        finite_params(params, f"ControlNet {path}")
        return params, cfg
    raise CheckpointError(f"ControlNet {path}: give a sprintjax ControlNet checkpoint (controlnet_config.json + "
                          f"params/) or a diffusers SanaControlNetModel folder (config.json + safetensors)")


def is_diffusers_folder(path: str | Path) -> bool:
    """A diffusers transformer folder or pipeline folder (not a sprintjax params checkpoint)."""
    path = Path(path)
    return ((path / "config.json").is_file() and not (path / "model_config.json").is_file()) \
        or (path / "model_index.json").is_file()


def model_config_of(path: str | Path, what: str = "model", part: str = "auto") -> ModelConfig:
    """The config of a model (a training run, a params checkpoint or a diffusers folder: `convert.source`),
    read without its weights: the cheap check a command makes before it loads models or writes anything."""
    from sprintjax.convert.source import source_config

    return source_config(path, part, what)


def load_model(path: str | Path, what: str = "model", part: str = "auto",
               step: int | None = None) -> tuple[dict, ModelConfig]:
    """Params and config of a model: a training run (its latest checkpoint or `step`; `part` as in
    `convert.source.read_source`), a sprintjax params checkpoint, or a diffusers transformer or pipeline folder."""
    from sprintjax.checks import finite_params
    from sprintjax.convert.source import kind_of, read_source
    from sprintjax.errors import CheckpointError

    kind = kind_of(path, what)
    if kind == "run":
        source = read_source(path, part, step, what)
        if source.controlnet is not None:
            raise CheckpointError(f"{what} {path} was distilled with a ControlNet: export it (export-diffusers) and "
                                  "give its controlnet/ folder too (sample --controlnet)")
        return source.params, source.cfg
    if kind == "diffusers":
        params, cfg = diffusers_to_params(path)
        finite_params(params, f"{what} {path}")
        return params, cfg
    return load_params(path)


def import_diffusers(src: str | Path, dst: str | Path, force: bool = False) -> ModelConfig:
    """`sprintjax import-diffusers`: diffusers folder -> Orbax params checkpoint + model config JSON."""
    params, cfg = diffusers_to_params(src)
    save_params(dst, params, cfg, force=force)
    return cfg


def export_diffusers(src: str | Path, dst: str | Path, force: bool = False) -> ModelConfig:
    """`sprintjax export-diffusers`: Orbax params checkpoint -> diffusers folder."""
    params, cfg = load_params(src)
    params_to_diffusers(dst, params, cfg, force=force)
    return cfg


__all__ = [
    "controlnet_to_diffusers", "diffusers_to_controlnet", "diffusers_to_params", "export_diffusers",
    "load_controlnet", "import_diffusers", "is_diffusers_folder", "load_model", "load_params",
    "model_config_of", "params_to_diffusers", "save_params",
]
