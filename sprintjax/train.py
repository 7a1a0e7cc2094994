"""`sprintjax train --config ... --workdir ...`: one trainer for every stage (distillation, teacher adaptation,
ControlNet training, recovery of a pruned student; their inputs: `sprintjax.stages`), sectioned like
big_vision's train.py. The same code runs on one CPU, on fake CPU devices, on several processes
(`jax.distributed`) and on a pod; rerunning the command on the same workdir resumes.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from sprintjax import trigflow
from sprintjax.checkpoints import Checkpoints
from sprintjax.configlib import RunConfig, resolve
from sprintjax.data import pipeline
from sprintjax.distill import Distiller
from sprintjax.errors import ConfigError
from sprintjax.fileio import atomic_write_bytes
from sprintjax.flow import TeacherTrainer
from sprintjax.observe import MetricsLog
from sprintjax.sharding import batch_sharding, make_mesh, tree_shardings
from sprintjax.stages import STUDENT_CONFIG, check_inputs, frozen_params, student_config
from sprintjax.workdir import claimed

log = logging.getLogger("sprintjax")


def _data_dir(rc: RunConfig, workdir: Path) -> Path:
    """The records to train on; a smoke config writes its synthetic dataset into the workdir once."""
    from jax.experimental import multihost_utils

    if rc.data.dir:
        return Path(rc.data.dir)
    target = workdir / "data"
    if jax.process_index() == 0 and not list(target.glob("*/*/dataset_info.json")):
        m = rc.model
        length = rc.data.caption_len
        shapes = {"latents": (m.in_channels, m.sample_size, m.sample_size), "caption": (length, m.caption_channels),
                  "caption_mask": (length,)}
        make = functools.partial(pipeline.synthetic_examples, rc.data.synthetic, shapes, rc.train.seed)
        null_mask = np.zeros(length, np.int32)
        null_mask[0] = 1
        pipeline.write_records(target, {rc.data.split: make}, shapes, np.zeros(shapes["caption"]), null_mask)
    multihost_utils.sync_global_devices("sprintjax data ready")
    return target


def _sampler(rc: RunConfig, runner, captions, masks, controls=None):
    """A jitted function state -> latents [N, C, H, W] from fixed captions (and controls) and noise (for
    sample grids)."""
    m = rc.model
    noise = jax.random.normal(jax.random.key(rc.train.seed + 7), (2, len(captions), m.in_channels, m.sample_size,
                                                                   m.sample_size))
    if rc.train.stage == "distill":
        from sprintjax.scm import student_fn

        def run(state):
            w = jnp.full((len(captions),), rc.distill.cfg_scales[len(rc.distill.cfg_scales) // 2])
            F = student_fn(runner.student, state.student, captions, masks, w,
                           runner._student_control({"control": controls}))
            return trigflow.sample(lambda x, t: F(x, t)[0], noise[:1], trigflow.schedule(1), rc.distill.sigma_d)
    elif rc.train.stage == "recover":
        from sprintjax.sampling import trigflow_model

        def run(state):
            params = state.ema if state.ema is not None else state.params
            F = trigflow_model(runner.model, params, captions, masks,
                               rc.distill.cfg_scales[len(rc.distill.cfg_scales) // 2])
            return trigflow.sample(F, noise[:1], trigflow.schedule(1), rc.distill.sigma_d)
    elif rc.train.stage == "controlnet":
        from sprintjax.controlnet import controlled_apply

        def run(state):
            params = state.ema if state.ema is not None else state.params

            def v(x, t):
                return controlled_apply(runner.model, state.teacher, runner.controlnet, params, x, t, captions,
                                        controls, masks, conditioning_scale=rc.control.conditioning_scale)
            return trigflow.euler_flow(v, noise[0], 20)
    else:
        def run(state):
            v = lambda x, t: runner.model.apply(state.params, x, t, captions, masks)  # noqa: E731
            return trigflow.euler_flow(v, noise[0], 20)
    return jax.jit(run)


def plan(rc: RunConfig, mesh, teacher_params, null_caption, teacher_sh) -> SimpleNamespace:
    """What a stage trains and how it is laid out: runner, init, pure steps, abstract state, state shardings.

    Works on concrete or abstract (ShapeDtypeStruct) teacher params, so `sprintjax compile` shares it.
    """
    if rc.train.stage == "distill":
        runner = Distiller(rc.model, rc.distill, control_layers=rc.control.num_layers,
                           conditioning_scale=rc.control.conditioning_scale, student_cfg=student_config(rc))
        init = runner.init
        if rc.train.student_checkpoint:  # a pruned student: its own weights, not a copy of the teacher's
            init = lambda tp, null, rng: runner.init(tp["teacher"], null, rng, tp["student"])  # noqa: E731
    elif rc.train.stage == "recover":
        from sprintjax.recover import Recoverer, pruned_student

        runner = Recoverer(rc.model, *pruned_student(rc), rc.train.lr, rc.train.warmup_steps, rc.distill.cfg_scales,
                           rc.train.feature_weight, rc.train.ema_decay, rc.distill.sigma_d)
        init = lambda tp, null, _: runner.init(tp, null)  # noqa: E731
    else:
        runner = TeacherTrainer(rc.model, rc.train.lr, rc.train.warmup_steps, ema_decay=rc.train.ema_decay,
                                control_layers=rc.control.num_layers,
                                conditioning_scale=rc.control.conditioning_scale)
        init = lambda tp, null, _: runner.init(tp, null)  # noqa: E731
    abstract = jax.eval_shape(init, teacher_params, null_caption, jax.random.key(0))
    state_sh = tree_shardings(abstract, mesh, rc.sharding.rules, rc.sharding.min_fsdp_size)
    if rc.train.stage in ("distill", "controlnet", "recover"):
        state_sh = state_sh.replace(teacher=teacher_sh["teacher"] if rc.train.student_checkpoint else teacher_sh)
    runner = runner.laid_out(state_sh)  # rematerialised blocks run as ZeRO-3 over this layout
    if rc.train.stage == "distill":
        steps = {"generator": runner.generator_step, "discriminator": runner.discriminator_step}
    else:
        steps = {"train": runner.step}
    return SimpleNamespace(runner=runner, init=init, steps=steps, abstract=abstract, state_sh=state_sh)


def guarded(step_fn, max_nonfinite: int):
    """step(state, batch, rng) -> step((state, streak), batch, rng) that stops at exactly `max_nonfinite`
    consecutive non-finite steps without a host sync per step: `streak` counts, on device, the steps in a row
    that were skipped (a step is skipped when its gradient is not finite: it leaves `state.step` where it
    was; a distillation phase program called out of turn, `ran` 0, counts neither way); once it reaches the
    limit, later calls return the state unchanged and report `halted`, and the host stops at its next metrics
    fetch. (A select, not a cond: no second trace of the step, and elementwise, so
    it fuses into the in-place update of the donated state.)"""
    def run(carry, batch, rng):
        state, streak = carry
        halted = streak >= max_nonfinite
        new, metrics = step_fn(state, batch, rng)
        new = jax.tree.map(lambda n, o: jnp.where(halted, o, n), new, state)
        counts = ~halted & (metrics.get("ran", 1) > 0)  # a phase program called out of turn is no step
        streak = jnp.where(counts, jnp.where(new.step > state.step, 0, streak + 1), streak)
        return (new, streak), dict(metrics, nonfinite_run=streak, halted=halted.astype(jnp.int32))

    return run


def compiled_step(step_fn, seed: int, state_sh, batch_sh, rep):
    """jit of step(state, batch, iteration) with explicit shardings and the state donated; the RNG of an
    iteration is fold_in(key(seed), iteration), so a resumed run draws exactly the same numbers. The step is
    traced under the batch sharding's mesh, so model activations keep their batch sharding (constrain_batch)."""
    base = jax.random.key_data(jax.random.key(seed))

    def run(state, batch, iteration):
        with jax.sharding.use_abstract_mesh(batch_sh.mesh.abstract_mesh):
            return step_fn(state, batch, jax.random.fold_in(jax.random.wrap_key_data(base), iteration))

    return jax.jit(run, in_shardings=(state_sh, batch_sh, rep), out_shardings=(state_sh, rep), donate_argnums=0)


def train(config, workdir: str | Path) -> str:
    """Runs (or resumes) a training job; returns "done" or "preempted".

    Everything the run could be refused for is checked before the workdir is created or locked; the workdir
    is then held by this job alone (sprintjax.workdir), and a run refused during setup leaves no trace.
    """
    # ------------------------------------------------------------------ 1. config, mesh, checks, workdir
    rc = resolve(config)
    mesh = make_mesh(rc.mesh, fsdp_group=rc.sharding.fsdp_group)
    check_inputs(rc, mesh)
    with claimed(workdir) as claim:
        return _run(rc, config, Path(workdir).absolute(), mesh, claim)


def _run(rc: RunConfig, config, workdir: Path, mesh, claim: dict) -> str:
    gb = rc.data.global_batch
    log.info("mesh %s over %d devices, %d process(es)", dict(mesh.shape), mesh.size, jax.process_count())

    # ------------------------------------------------------------------ 2. data
    data_dir = _data_dir(rc, workdir)
    null_caption, _ = pipeline.load_null_caption(data_dir)
    data_it = pipeline.train_iterator(data_dir, rc.data.split, gb, rc.train.seed, jax.process_index(),
                                      jax.process_count(), rc.data.worker_count, rc.data.prefetch)

    # ------------------------------------------------------------------ 3. models, optimisers, sharded state
    key = jax.random.key(rc.train.seed)
    teacher_params, teacher_sh = frozen_params(rc, mesh, jax.random.fold_in(key, 1))
    p = plan(rc, mesh, teacher_params, null_caption, teacher_sh)
    runner, state_sh = p.runner, p.state_sh
    state = jax.jit(p.init, out_shardings=state_sh)(teacher_params, null_caption, jax.random.fold_in(key, 2))
    del teacher_params

    # ------------------------------------------------------------------ 4. checkpoints: resume if any
    ckpts = Checkpoints(workdir / "checkpoints", rc.train.keep, rc.train.keep_every)
    start = 0
    restored = ckpts.restore_latest(state, data_it)
    if restored:
        start, trained, meta = restored
        state = trained.replace(**{k: getattr(state, k) for k in ("teacher", "null_caption") if hasattr(state, k)})
        start = int(meta["iteration"])
        log.info("resumed from the checkpoint at iteration %d", start)
        _truncate_metrics(workdir / "metrics.jsonl", start)
    elif jax.process_index() == 0:
        from clu import parameter_overview

        params = state.student if rc.train.stage == "distill" else state.params
        parameter_overview.log_parameter_overview(params, msg="trained parameters")

    # ------------------------------------------------------------------ 5. the compiled step
    rep = NamedSharding(mesh, PartitionSpec())
    batch_sh = batch_sharding(mesh)
    fns = [runner.phase_step(0), runner.phase_step(1)] if rc.train.stage == "distill" else [p.steps["train"]]
    programs = [compiled_step(guarded(fn, rc.train.max_nonfinite), rc.train.seed, (state_sh, rep), batch_sh, rep)
                for fn in fns]
    phase = int(state.phase) if rc.train.stage == "distill" else 0  # the host alternates from here, no sync
    streak = jax.device_put(np.int32(0), rep)  # consecutive skipped (non-finite) steps, kept on device
    to_global = lambda local: jax.tree.map(  # noqa: E731
        lambda a: jax.make_array_from_process_local_data(batch_sh, a, (gb,) + a.shape[1:]), local)

    # ------------------------------------------------------------------ 6. the loop and its periodic actions
    peek = to_global(next(pipeline.train_iterator(data_dir, rc.data.split, gb, rc.train.seed, jax.process_index(),
                                                  jax.process_count())))
    if rc.train.stage == "distill":
        loss_keys = {0: "g_loss", 1: "d_loss"}
    else:
        loss_keys = {0: "recover_loss" if rc.train.stage == "recover" else "flow_loss"}
    metrics = MetricsLog(workdir, loss_keys, rc.train.max_nonfinite, rc.train.num_steps,
                         rc.train.log_every)
    metrics.last_saved = ckpts.directory / str(start) if restored else None
    sampler = None
    if rc.train.sample_every:
        source = pipeline.open_split(data_dir, rc.data.split)
        examples = [source[i] for i in range(rc.train.num_samples)]
        stacked = lambda k: jnp.asarray(np.stack([e[k] for e in examples]), jnp.float32)  # noqa: E731
        sampler = _sampler(rc, runner, stacked("caption"), stacked("caption_mask"),
                           stacked("control") if rc.control.num_layers else None)
    diag = _diagnostics(rc, runner, peek) if rc.train.diag_every and rc.train.stage == "distill" else None
    if jax.process_index() == 0:
        atomic_write_bytes(workdir / "config.json", config.to_json(indent=2, sort_keys=True).encode())
        if rc.train.student_checkpoint:  # the trained model's shape, kept with the run (the input may move)
            atomic_write_bytes(workdir / STUDENT_CONFIG, student_config(rc).to_json().encode())
    claim["started"] = True  # from here on the workdir holds this run's work: an error keeps it
    preempted = []
    previous = signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))
    status = "done"
    try:
        for it in range(start, rc.train.num_steps):
            (state, streak), m = programs[phase]((state, streak), to_global(next(data_it)), np.int32(it))
            phase = (phase + 1) % len(programs)
            done = it + 1
            metrics.add(done, m)
            if rc.train.profile_at == done:
                jax.profiler.start_trace(str(workdir / "profile"))
            if rc.train.profile_at >= 0 and done == rc.train.profile_at + rc.train.profile_steps:
                jax.profiler.stop_trace()
            if done % rc.train.log_every == 0 or done == rc.train.num_steps:
                metrics.flush()
            if diag and done % rc.train.diag_every == 0:
                metrics.diagnostics(done, *diag(state))
            if sampler and done % rc.train.sample_every == 0:
                _write_samples(workdir, done, np.asarray(jax.device_get(sampler(state))), metrics)
            meta = {"iteration": done, "seed": rc.train.seed}
            if preempted or ckpts.reached_preemption(done):
                ckpts.save(done, state, data_it, meta, force=True)
                status = "preempted"
                log.warning("preemption signal: saved the checkpoint at iteration %d, exiting", done)
                break
            if done % rc.train.ckpt_every == 0 or done == rc.train.num_steps:
                if int(streak):  # a save inside a non-finite streak would not precede it
                    log.warning("not saving iteration %d: it is inside a run of non-finite steps", done)
                elif ckpts.save(done, state, data_it, meta):
                    metrics.last_saved = ckpts.directory / str(done)
    finally:
        signal.signal(signal.SIGTERM, previous)
        ckpts.wait()
        ckpts.close()
        metrics.close()
    return status


def _diagnostics(rc: RunConfig, runner, batch):
    """A jitted state -> (scalars, per-sample histograms) of the JVP diagnostics on a fixed batch."""
    from sprintjax import diagnostics

    if batch["latents"].shape[0] % rc.train.diag_bins:
        raise ConfigError(f"train.diag_bins {rc.train.diag_bins} must divide the global batch "
                          f"{batch['latents'].shape[0]}")

    @jax.jit
    def run(state):
        r = jnp.minimum(1.0, (state.step + 1) / rc.distill.tangent_warmup_steps)
        stats, samples = diagnostics.bin_stats(runner.student, state.student, runner.teacher, state.teacher,
                                               state.null_caption, batch, jax.random.key(rc.train.seed + 11),
                                               rc.distill, rc.train.diag_bins, r, compare_bf16=True,
                                               with_samples=True)
        return diagnostics.summarise(stats), samples
    return run


def _write_samples(workdir: Path, step: int, latents: np.ndarray, metrics: MetricsLog) -> None:
    from sprintjax.images import latents_to_rgb, save_grid

    if jax.process_index() != 0:
        return
    save_grid([latents], workdir / "samples" / f"step_{step:07d}.png")
    lo, hi = np.percentile(latents[:, :3], [1, 99])
    metrics.images(step, "samples", latents_to_rgb(latents, lo, hi))
    (workdir / "samples" / "latest.json").write_text(json.dumps({"step": step}))


def _truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drop metric lines past the checkpoint (their steps are about to be recomputed)."""
    if jax.process_index() != 0 or not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
    atomic_write_bytes(path, "".join(line + "\n" for line in keep).encode())
