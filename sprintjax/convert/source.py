"""One way to name a model (issue 23): every command that reads one — `sample`, `eval`, `info`, the exports,
`compress`, `train.teacher_checkpoint` / `train.student_checkpoint` — takes the same three kinds of path:

- a training run directory (`checkpoints/` + `config.json`): its latest checkpoint, or `--step`; `--part` picks
  the student, its EMA or the frozen teacher of a distillation run (auto: the EMA when the run kept one);
- a sprintjax params checkpoint (`model_config.json` + `params/`: `import-diffusers`, `compress`);
- a diffusers `SanaTransformer2DModel` folder or a pipeline folder holding one.

`kind_of` tells them apart (one error saying what was looked for and what was found), `source_config` reads a
model's config without its weights (the cheap check before anything loads), `read_source` its weights.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from sprintjax.errors import CheckpointError
from sprintjax.model_config import ModelConfig

PARTS = ("auto", "student", "ema", "teacher")
KINDS = ("a training run (checkpoints/ + config.json), a sprintjax params checkpoint (model_config.json + "
         "params/) or a diffusers transformer or pipeline folder (config.json or model_index.json + safetensors)")


def kind_of(path: str | Path, what: str = "model") -> str:
    """"run", "params" or "diffusers"; a CheckpointError naming what was looked for and what was found."""
    from sprintjax.convert import is_diffusers_folder

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} {path} does not exist; give {KINDS}")
    if not path.is_dir():
        raise CheckpointError(f"{what} {path} is a file, not a folder; give {KINDS}")
    if is_workdir(path):
        return "run"
    if (path / "model_config.json").is_file():
        return "params"
    if is_diffusers_folder(path):
        return "diffusers"
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    found = ", ".join(entries[:8]) + (f" and {len(entries) - 8} more" if len(entries) > 8 else "") or "nothing"
    hint = ""
    if (path / "controlnet_config.json").is_file():
        hint = " (controlnet_config.json: a ControlNet checkpoint, which --controlnet takes)"
    elif (path / "checkpoints").is_dir():
        hint = " (checkpoints/ without config.json: a run whose first checkpoint was never written?)"
    raise CheckpointError(f"{what} {path} is not a model: looked for {KINDS}; found {found}{hint}")


def source_config(src: str | Path, part: str = "auto", what: str = "model") -> ModelConfig:
    """The config of the model `read_source(src, part)` would read, without reading weights."""
    from sprintjax.checkpoints import run_model_config
    from sprintjax.convert.diffusers_io import read_config
    from sprintjax.convert.params_ckpt import read_model_config

    src, kind = Path(src), kind_of(src, what)
    if part not in PARTS:
        raise CheckpointError(f"--part must be one of {PARTS}, got {part!r}")
    if kind == "params":
        return read_model_config(src)
    if kind == "diffusers":
        return read_config(src / "transformer" if (src / "model_index.json").is_file() else src)
    run, stage, teacher = _run(src, part)
    if teacher:
        return source_config(teacher, "auto", f"the teacher of {src}")
    return run_model_config(src, "student" if stage == "distill" else "params")


def _run(src: Path, part: str) -> tuple[dict, str, str | None]:
    """A training run's config.json, its stage, and (part teacher of a distillation run) its teacher checkpoint."""
    run = json.loads((src / "config.json").read_text())
    stage = run.get("train", {}).get("stage", "distill")
    if part != "teacher" or stage != "distill":
        return run, stage, None
    teacher = run["train"].get("teacher_checkpoint")
    if not teacher:
        raise CheckpointError(f"{src} was distilled from a randomly initialised teacher: it has no teacher to read")
    return run, stage, teacher


@dataclasses.dataclass
class Source:
    params: dict
    cfg: ModelConfig
    description: str  # what was read, for the model card and the log
    run: dict | None = None  # the training run's resolved config (a workdir source), else None
    step: int | None = None
    controlnet: tuple | None = None  # (params, ControlNet config) of a controlled distillation run's student


def is_workdir(path: Path) -> bool:
    return (path / "checkpoints").is_dir() and (path / "config.json").is_file()


def read_source(src: str | Path, part: str = "auto", step: int | None = None, what: str = "model") -> Source:
    """The params to export. part: auto (the EMA if the run kept one, else the trained model), student, ema, or
    teacher (a distillation run's frozen teacher, read from its train.teacher_checkpoint). Weights holding a
    NaN or Inf are refused (an export never writes them)."""
    from sprintjax.checks import finite_params

    source = _read_source(src, part, step, what)
    finite_params(source.params, source.description)
    return source


def _read_source(src: str | Path, part: str, step: int | None, what: str) -> Source:
    from sprintjax.checkpoints import trained_params
    from sprintjax.convert import load_model

    src = Path(src)
    if part not in PARTS:
        raise CheckpointError(f"--part must be one of {PARTS}, got {part!r}")
    kind = kind_of(src, what)
    if kind != "run":
        if step is not None or part not in ("auto", "student", "teacher"):
            raise CheckpointError(f"{src} is not a training run (no checkpoints/ and config.json): --step and "
                                  f"--part {part} apply only to training runs")
        params, cfg = load_model(src, what)
        return Source(params, cfg, f"{'params checkpoint' if kind == 'params' else 'diffusers folder'} {src.name}")
    run, stage, teacher = _run(src, part)
    if teacher:
        params, cfg = load_model(teacher, f"the teacher of {src}")
        return Source(params, cfg, f"the frozen teacher of {src.name} ({Path(teacher).name})", run)
    if stage == "distill":
        if part == "auto":
            part = "ema" if (run.get("distill") or {}).get("ema_decay") else "student"
        params, cfg, got = trained_params(src, part, step)
        controlnet = None
        if (run.get("control") or {}).get("num_layers"):
            controlnet = trained_params(src, f"{part}_control", got)[:2]
        return Source(params, cfg, f"{part} of distillation run {src.name}, step {got}", run, got, controlnet)
    if part == "ema" and not run["train"].get("ema_decay"):
        raise CheckpointError(f"teacher-stage run {src} kept no EMA (train.ema_decay = 0)")
    if part == "student":
        raise CheckpointError(f"{src} is a teacher-stage run: it has no student (use --part teacher or auto)")
    params, cfg, got = trained_params(src, "params", step)
    return Source(params, cfg, f"teacher-stage run {src.name}, step {got}", run, got)
