"""Configs as Python files (the big_vision convention): `--config path/to/file.py:arg` calls `get_config(arg)`,
then `--config.a.b=value` overrides are applied. Every section converts to a typed, frozen dataclass, so an
unknown key fails here, before anything compiles.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

import ml_collections

from sprintjax.distill_config import DistillConfig
from sprintjax.errors import ConfigError
from sprintjax.model_config import ModelConfig

STAGES = ("distill", "teacher", "controlnet", "recover")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dir: str = ""  # TFDS/ArrayRecord dataset folder; "" with synthetic > 0: written into WORKDIR/data
    split: str = "train"
    synthetic: int = 0  # number of synthetic examples to write (smoke configs), 0 for real data
    caption_len: int = 300  # caption tokens (SANA: 300); sets the synthetic data and the AOT compile shapes
    global_batch: int = 8
    worker_count: int = 0  # grain multiprocessing workers per process
    prefetch: int = 2


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # distill (sCM + LADD) | teacher (flow-matching teacher adaptation, paper §3.2) | controlnet (a ControlNet
    # trained by flow matching on the frozen teacher_checkpoint, paper §3.4; control section) | recover (a
    # pruned student_checkpoint distilled from the uncompressed student teacher_checkpoint; sprintjax.recover)
    stage: str = "distill"
    seed: int = 0
    num_steps: int = 100  # iterations = batches; G and D alternate 1:1 when distilling
    teacher_checkpoint: str = ""  # params checkpoint or diffusers folder; "" = random teacher (smoke runs only)
    log_every: int = 10
    ckpt_every: int = 50
    keep: int = 3  # keep the last N checkpoints ...
    keep_every: int = 0  # ... and every K-th step (0: none)
    sample_every: int = 0  # PNG + TensorBoard sample grids (0: off)
    num_samples: int = 4
    diag_every: int = 0  # JVP diagnostics per time bin on a fixed batch (distillation; 0: off)
    diag_bins: int = 8  # time bins of the diagnostics (must divide the global batch)
    profile_at: int = -1  # start a profiler window at this step (-1: never)
    profile_steps: int = 5
    max_nonfinite: int = 20  # stop after this many consecutive non-finite losses
    lr: float = 2e-5  # teacher stage only (distillation lrs live in the distill section)
    warmup_steps: int = 0  # teacher stage only
    ema_decay: float = 0.0  # teacher stage only: EMA of the weights (exported when on), 0 = off
    # recover: the pruned student to train (a `sprintjax compress` output); distill: a student of another shape
    # than the teacher (a pruned one) to start from instead of the teacher's copy
    student_checkpoint: str = ""
    feature_weight: float = 1.0  # recover: weight of the block-feature term beside the output term


@dataclasses.dataclass(frozen=True)
class ControlConfig:
    """ControlNet (paper §3.4, App. F.3): the copied blocks, the residual scale, the ControlNet teacher."""

    num_layers: int = 0  # blocks copied into the ControlNet; 0: no ControlNet (diffusers' default 7 of 28)
    conditioning_scale: float = 1.0  # the residuals' scale in training and in the sample grids
    teacher_checkpoint: str = ""  # distillation with control: the trained ControlNet of the teacher


@dataclasses.dataclass(frozen=True)
class ShardingConfig:
    # (regex over the state path, kind) for student, heads, optimisers. The depthwise conv kernels stay whole:
    # sharded on their channels, the grouped convolution makes XLA's partitioner move the activations by
    # all-to-all instead (BENCHMARKS.md §3 item 11)
    rules: tuple = ((".*conv_depth.*", "replicate"), (".*", "fsdp"))
    teacher_rules: tuple = ((".*conv_depth.*", "replicate"), (".*", "fsdp"))  # the frozen teacher's may differ
    min_fsdp_size: int = 1 << 14
    fsdp_group: int = 32  # a mesh with data and fsdp both -1: FSDP within up to this many devices, replicas above


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    distill: DistillConfig
    data: DataConfig
    train: TrainConfig
    sharding: ShardingConfig
    mesh: dict
    control: ControlConfig = ControlConfig()


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


def _type_name(like: Any) -> str:
    """How an expected type reads in an error message."""
    if isinstance(like, tuple | list):
        return "tuple (e.g. (1, 2))"
    return "number" if isinstance(like, float) else type(like).__name__


def _parse(raw: str, like: Any):
    """`raw` parsed like the current value `like`; a ValueError (without the key) when it does not fit."""
    if isinstance(like, bool):
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise ValueError("expected bool (true/false)")
    if isinstance(like, str):
        return raw
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        if like is None:
            return raw
        raise ValueError(f"expected {_type_name(like)}") from None
    if isinstance(like, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if like is not None and (not isinstance(value, type(like)) or isinstance(value, bool) != isinstance(like, bool)) \
            and not (isinstance(like, tuple | list) and isinstance(value, tuple | list)):
        raise ValueError(f"expected {_type_name(like)}, got a {type(value).__name__}")
    return tuple(value) if isinstance(value, list) else value


def apply_override(cfg: ml_collections.ConfigDict, dotted: str, raw: str) -> None:
    """Sets `a.b.c = raw` (parsed like the current value); an unknown key or a value of the wrong type is a
    ConfigError naming the key, the value and the expected type."""
    *parents, leaf = dotted.split(".")
    node = cfg
    for i, key in enumerate(parents):
        if key not in node or not isinstance(node[key], ml_collections.ConfigDict):
            raise ConfigError(f"unknown config key: {'.'.join(parents[: i + 1])}")
        node = node[key]
    if leaf not in node:
        raise ConfigError(f"unknown config key: {dotted}")
    try:
        node[leaf] = _parse(raw, node[leaf])
    except (ValueError, TypeError) as e:
        raise ConfigError(f"--config.{dotted}={raw!r}: {e}") from None


def parse_overrides(cfg: ml_collections.ConfigDict, argv: list[str]) -> ml_collections.ConfigDict:
    """Applies `--config.a.b=value` (or `--config.a.b value`) arguments in order."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--config."):
            raise ConfigError(f"unexpected argument {arg!r} (overrides look like --config.a.b=value)")
        key, eq, value = arg[len("--config."):].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"{arg} needs a value")
            value, i = argv[i + 1], i + 1
        apply_override(cfg, key, value)
        i += 1
    return cfg


def _typed(cls, section, name):
    fields = {f.name for f in dataclasses.fields(cls)}
    d = section.to_dict() if isinstance(section, ml_collections.ConfigDict) else dict(section or {})
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ConfigError(f"unknown config keys in {name}: {unknown}")
    d = {k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list | tuple) else v
         for k, v in d.items()}
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    for key, value in d.items():  # a config file's value of the wrong type (overrides are checked on parsing)
        like = defaults.get(key)
        if like is None or value is None:
            continue
        fits = isinstance(value, type(like)) and isinstance(value, bool) == isinstance(like, bool)
        if isinstance(like, float):
            fits = isinstance(value, int | float) and not isinstance(value, bool)
        if not fits:
            raise ConfigError(f"config.{name}.{key} = {value!r}: expected {_type_name(like)}, got a "
                              f"{type(value).__name__}")
    return cls(**d)


def resolve(cfg: ml_collections.ConfigDict) -> RunConfig:
    """Typed view of a run config; every unknown key, at any level, is a ConfigError."""
    known = {"model", "distill", "data", "train", "sharding", "mesh", "control"}
    unknown = sorted(set(cfg.keys()) - known)
    if unknown:
        raise ConfigError(f"unknown config sections: {unknown}")
    mesh = dict(cfg.get("mesh", {"data": -1}))
    if not mesh or not all(isinstance(v, int) for v in mesh.values()):
        raise ConfigError(f"mesh must map axis names to sizes, got {mesh}")
    train = _typed(TrainConfig, cfg.get("train"), "train")
    if train.stage not in STAGES:
        raise ConfigError(f"train.stage must be one of {STAGES}, got {train.stage!r}")
    control = _typed(ControlConfig, cfg.get("control"), "control")
    if train.stage == "controlnet" and control.num_layers < 1:
        raise ConfigError("train.stage 'controlnet' trains a ControlNet: set control.num_layers >= 1 (its blocks)")
    if train.stage in ("teacher", "recover") and control.num_layers:
        raise ConfigError(f"control.num_layers is set but train.stage is {train.stage!r}: a ControlNet trains in "
                          "stage 'controlnet' and distils in stage 'distill'")
    if train.student_checkpoint and control.num_layers:
        raise ConfigError("train.student_checkpoint (a pruned student) with a ControlNet is not supported: the "
                          "student's ControlNet copies the teacher's blocks")
    if train.stage == "recover" and not (train.student_checkpoint and train.teacher_checkpoint):
        raise ConfigError("train.stage 'recover' trains train.student_checkpoint (a pruned student) towards "
                          "train.teacher_checkpoint (the student it was pruned from): set both")
    model = _typed(ModelConfig, cfg.model, "model")
    if control.num_layers:
        from sprintjax.controlnet import controlnet_config

        controlnet_config(model, control.num_layers)  # fits the model (1 <= n < its depth)
    return RunConfig(model=model, distill=_typed(DistillConfig, cfg.get("distill"), "distill"),
                     data=_typed(DataConfig, cfg.get("data"), "data"), train=train,
                     sharding=_typed(ShardingConfig, cfg.get("sharding"), "sharding"), mesh=mesh, control=control)


def model_config(cd: ml_collections.ConfigDict) -> ModelConfig:
    """A ConfigDict of ModelConfig fields -> ModelConfig; unknown keys are an error."""
    return _typed(ModelConfig, cd, "model")


def section(obj, **overrides) -> ml_collections.ConfigDict:
    """A dataclass's fields (with overrides) as a ConfigDict section; unknown overrides are an error."""
    d = dataclasses.asdict(obj)
    unknown = sorted(set(overrides) - set(d))
    if unknown:
        raise ConfigError(f"unknown keys {unknown} for {type(obj).__name__}")
    d.update(overrides)
    return ml_collections.ConfigDict(d)


def run_config(model: ModelConfig, *, distill=None, data=None, train=None, sharding=None, mesh=None, control=None):
    """The ConfigDict skeleton every configs/*.py file starts from."""
    c = ml_collections.ConfigDict()
    c.model = section(model)
    c.control = section(ControlConfig(), **(control or {}))
    c.distill = section(DistillConfig(), **(distill or {}))
    c.data = section(DataConfig(), **(data or {}))
    c.train = section(TrainConfig(), **(train or {}))
    c.sharding = section(ShardingConfig(), **(sharding or {}))
    c.mesh = ml_collections.ConfigDict(mesh or {"data": -1, "fsdp": 1})
    return c


def official_recipe(teacher_preset: str, global_batch: int = 512):
    """SANA-Sprint's distillation recipe at 1024px (facts §6) around a teacher preset: CAME at
    lr 2e-6 x sqrt(global_batch / 256) for G and D, 5000-step G warmup, bf16 compute with float32 weights,
    ~20k G+D iteration pairs; FSDP over up to 32 devices, data-parallel replicas above, ZeRO-3 blocks
    (`zero3_blocks=auto`)."""
    import math

    from sprintjax.model_config import preset

    lr = 2e-6 * math.sqrt(global_batch / 256)
    return run_config(
        preset(teacher_preset, dtype="bfloat16", remat="dots"),
        # the JVP stays float32 (the official code autocasts it to bf16): in bf16 the miniature's quality holds
        # and the 0.6B generator step on v5p-64 reads 9% fewer HBM bytes, but its peak memory per chip goes
        # from 17.5 to 33 GiB, more than a v6e chip holds (BENCHMARKS.md §6)
        distill=dict(lr_g=lr, lr_d=lr, jvp_dtype="float32"),
        data=dict(global_batch=global_batch, worker_count=8, prefetch=4),
        train=dict(num_steps=40_000, log_every=50, ckpt_every=1000, keep=3, keep_every=5000, sample_every=1000),
        mesh={"data": -1, "fsdp": -1},  # picks itself: FSDP within 32 devices, replicas above (sharding.py)
    )
