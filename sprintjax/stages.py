"""What a training stage needs before its first step: the checks of its inputs (everything a run can be refused
for, before the workdir is touched) and the frozen (or adapted) params it holds, placed by their shardings.

Stages: distill (the teacher, with its ControlNet when controlled), teacher (the model to adapt), controlnet
(the teacher a ControlNet trains on), recover (the uncompressed student and its pruned copy).
"""

from __future__ import annotations

import dataclasses

import jax

from sprintjax.configlib import ControlConfig, RunConfig
from sprintjax.convert import diffusers_to_params, is_diffusers_folder, load_model, model_config_of
from sprintjax.convert.params_ckpt import load_params
from sprintjax.convert.source import kind_of
from sprintjax.data import pipeline
from sprintjax.errors import CheckpointError, ConfigError
from sprintjax.flow import adapt_params
from sprintjax.model import SanaTransformer
from sprintjax.model_config import ModelConfig
from sprintjax.sharding import data_parallel_size, tree_shardings


def check_inputs(rc: RunConfig, mesh) -> None:
    """Everything a run can be refused for, checked before the workdir is touched: the batch over the mesh
    and the processes, the teacher checkpoint (its kind and architecture) and the training records."""
    gb, dp = rc.data.global_batch, data_parallel_size(mesh)
    if gb % dp:
        raise ConfigError(f"global batch {gb} does not divide over the {dp} data-parallel devices of mesh "
                          f"{dict(mesh.shape)}")
    if gb % jax.process_count():
        raise ConfigError(f"global batch {gb} does not divide over {jax.process_count()} processes")
    if rc.train.teacher_checkpoint:
        from sprintjax.convert import model_config_of

        src = model_config_of(rc.train.teacher_checkpoint, "train.teacher_checkpoint")
        src = src.replace(**rc.model.compute_settings())
        if src != rc.model and (rc.train.stage != "teacher" or is_diffusers_folder(rc.train.teacher_checkpoint)):
            raise CheckpointError(f"teacher {rc.train.teacher_checkpoint} does not match config.model:\n{src}\n"
                                  f"vs\n{rc.model}")
    if rc.train.stage == "distill" and rc.control.num_layers:
        from sprintjax.controlnet import check_pair
        from sprintjax.convert import load_controlnet

        if not rc.control.teacher_checkpoint:
            raise ConfigError("distilling with control.num_layers set needs the teacher's ControlNet: set "
                              "control.teacher_checkpoint (a `train-teacher` controlnet-stage export)")
        if rc.train.diag_every:
            raise ConfigError("train.diag_every: the JVP diagnostics do not take a ControlNet yet; set it to 0")
        _, cn_cfg = load_controlnet(rc.control.teacher_checkpoint)
        check_pair(rc.model, cn_cfg)
        if cn_cfg.num_layers != rc.control.num_layers:
            raise ConfigError(f"control.teacher_checkpoint has {cn_cfg.num_layers} blocks, control.num_layers says "
                              f"{rc.control.num_layers}")
    student_config(rc)
    if rc.train.stage == "controlnet" and not rc.train.teacher_checkpoint:
        raise ConfigError("train.stage 'controlnet' trains a ControlNet on a trained teacher: set "
                          "train.teacher_checkpoint")
    if rc.data.dir:
        source = pipeline.open_split(rc.data.dir, rc.data.split)
        pipeline.load_null_caption(rc.data.dir)
        if rc.control.num_layers and "control" not in source[0]:
            raise ConfigError(f"{rc.data.dir} has no control latents (a ControlNet trains on them): prepare it "
                              f"with `sprintjax prepare-data ... --control canny` or a folder of control images")
    elif not rc.data.synthetic:
        raise ConfigError("data.dir is empty and data.synthetic is 0: there is nothing to train on")
    elif rc.control.num_layers:
        raise ConfigError("a ControlNet trains on control latents: synthetic data has none (set data.dir)")

STUDENT_CONFIG = "student_model_config.json"  # written into a workdir whose run trains a train.student_checkpoint


def student_config(rc: RunConfig) -> ModelConfig | None:
    """The model config of `train.student_checkpoint` (a pruned student, recovered or not) with the run's
    compute settings, checked against the teacher it trains with; None when the run has none."""
    if not rc.train.student_checkpoint:
        return None
    from sprintjax.recover import pruned_student

    if rc.train.stage == "recover":
        return pruned_student(rc)[0]
    if rc.train.stage != "distill":
        raise ConfigError(f"train.student_checkpoint applies to stages distill and recover, not {rc.train.stage!r}")
    cfg = model_config_of(rc.train.student_checkpoint, "train.student_checkpoint")
    cfg = cfg.replace(**rc.model.compute_settings())
    fields = ("in_channels", "out_channels", "caption_channels", "patch_size", "sample_size")
    bad = [f"{k} {getattr(cfg, k)} (teacher: {getattr(rc.model, k)})" for k in fields
           if getattr(cfg, k) != getattr(rc.model, k)]
    if not cfg.guidance_embeds:
        bad.append("no guidance embedder (a Sprint student has one)")
    if bad:
        raise CheckpointError(f"train.student_checkpoint {rc.train.student_checkpoint} cannot be this teacher's "
                              f"student: {'; '.join(bad)}")
    return cfg


def teacher_shapes(rc: RunConfig) -> dict:
    """The abstract params of what a stage holds frozen (or adapts): the teacher transformer; when distilling
    with control {"net": the transformer, "control": its ControlNet}; with a `train.student_checkpoint`
    {"teacher": the teacher (recover: the uncompressed student), "student": the student to train}."""
    shapes = SanaTransformer(rc.model).param_shapes()
    if rc.train.stage == "distill" and rc.control.num_layers:
        from sprintjax.controlnet import SanaControlNet, controlnet_config

        cn = SanaControlNet(controlnet_config(rc.model, rc.control.num_layers))
        return {"net": shapes, "control": cn.param_shapes()}
    if rc.train.student_checkpoint:
        return {"teacher": shapes, "student": SanaTransformer(student_config(rc)).param_shapes()}
    return shapes


def frozen_params(rc: RunConfig, mesh, key):
    """The frozen teacher (distillation, with its ControlNet when controlled), the model to adapt (teacher
    stage), with a `train.student_checkpoint` {"teacher", "student"} (teacher_shapes), placed by their
    shardings; the checkpoints' kind and architecture were checked by check_inputs."""
    if rc.train.stage == "distill" and rc.control.num_layers:
        from sprintjax.convert import load_controlnet

        shardings = tree_shardings(teacher_shapes(rc), mesh, rc.sharding.teacher_rules, rc.sharding.min_fsdp_size)
        net = frozen_params(dataclasses.replace(rc, control=ControlConfig()), mesh, key)[0]
        control = jax.device_put(load_controlnet(rc.control.teacher_checkpoint)[0], shardings["control"])
        return {"net": net, "control": control}, shardings
    if rc.train.student_checkpoint:
        shardings = tree_shardings(teacher_shapes(rc), mesh, rc.sharding.teacher_rules, rc.sharding.min_fsdp_size)
        alone = dataclasses.replace(rc, train=dataclasses.replace(rc.train, stage="teacher", student_checkpoint=""))
        teacher = frozen_params(alone, mesh, key)[0]
        if kind_of(rc.train.student_checkpoint) != "params":  # a run or a diffusers folder: read whole, then placed
            student = jax.device_put(load_model(rc.train.student_checkpoint, "train.student_checkpoint")[0],
                                     shardings["student"])
        else:
            student = load_params(rc.train.student_checkpoint, student_config(rc), shardings["student"])[0]
        return {"teacher": teacher, "student": student}, shardings
    model = SanaTransformer(rc.model)
    shardings = tree_shardings(model.param_shapes(), mesh, rc.sharding.teacher_rules, rc.sharding.min_fsdp_size)
    if not rc.train.teacher_checkpoint:
        return jax.jit(model.init, out_shardings=shardings)(key), shardings
    kind = kind_of(rc.train.teacher_checkpoint, "train.teacher_checkpoint")
    if kind == "diffusers":  # a diffusers transformer or pipeline folder
        params, _ = diffusers_to_params(rc.train.teacher_checkpoint)
        return jax.device_put(params, shardings), shardings
    src_cfg = model_config_of(rc.train.teacher_checkpoint).replace(**rc.model.compute_settings())
    if kind == "run":  # a training run's trained model (read whole, then placed)
        src = load_model(rc.train.teacher_checkpoint, "train.teacher_checkpoint")[0]
        if src_cfg == rc.model:
            return jax.device_put(src, shardings), shardings
    elif src_cfg == rc.model:
        return load_params(rc.train.teacher_checkpoint, src_cfg, shardings, check_finite=False)[0], shardings
    else:
        src, _ = load_params(rc.train.teacher_checkpoint, src_cfg, check_finite=False)  # e.g. without QK-norm
    return jax.jit(lambda p, k: adapt_params(p, model, k), out_shardings=shardings)(src, key), shardings
