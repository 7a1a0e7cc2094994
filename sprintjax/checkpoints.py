"""Training checkpoints: one Orbax CheckpointManager with named items.

Items per step: `state` (the trained parts of the state: student, discriminator heads and their state, both
optimiser states, counters; the frozen teacher is not stored), `data` (each process's grain iterator state),
`meta` (iteration, base RNG key, resolved config). Saves are asynchronous; orbax writes each step to a
temporary folder and renames it when complete, so a half-written checkpoint is never picked up. Once a save
has finished, process 0 seals it with a manifest of CRC32 checksums of every file (`sprintjax_checksums.json`);
a checkpoint whose files no longer match, or that fails to restore, is reported and the previous one is used.
Restores take the target shardings, so a run saved on one mesh resumes on another.
"""

from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger("sprintjax")
CHECKSUMS = "sprintjax_checksums.json"


def _crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def seal(step_dir: Path) -> None:
    """Writes the checksum manifest of a finished checkpoint folder (atomically)."""
    from sprintjax.fileio import atomic_write_bytes

    files = {str(p.relative_to(step_dir)): [p.stat().st_size, _crc(p)] for p in sorted(step_dir.rglob("*"))
             if p.is_file() and p.name != CHECKSUMS}
    atomic_write_bytes(step_dir / CHECKSUMS, json.dumps(files, indent=0).encode())


def verify(step_dir: Path) -> list[str]:
    """Problems of a sealed checkpoint folder ([] when intact; unsealed folders are trusted, with a warning)."""
    manifest = step_dir / CHECKSUMS
    if not manifest.is_file():
        log.warning("checkpoint %s is not sealed (the run stopped right after saving it); trusting orbax's "
                    "commit marker", step_dir)
        return []
    problems = []
    for rel, (size, crc) in json.loads(manifest.read_text()).items():
        p = step_dir / rel
        if not p.is_file():
            problems.append(f"{rel} is missing")
        elif p.stat().st_size != size or _crc(p) != crc:
            problems.append(f"{rel} does not match its checksum")
    return problems


def trained_view(state):
    """The state without the frozen teacher and null caption (what checkpoints store)."""
    return state.replace(teacher=None, null_caption=None) if hasattr(state, "teacher") \
        else state.replace(null_caption=None)


class Checkpoints:
    def __init__(self, directory: str | Path, keep: int, keep_every: int = 0):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_every or None, create=True,
                                               enable_async_checkpointing=True)
        self.directory = Path(directory).absolute()
        self.mngr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))
        self._unsealed: list[int] = []

    def _seal_finished(self) -> None:
        """Waits for the save in flight (usually long done) and seals every finished, unsealed step."""
        self.mngr.wait_until_finished()
        if jax.process_index() == 0:
            for step in self._unsealed:
                if (self.directory / str(step)).is_dir():
                    seal(self.directory / str(step))
        self._unsealed = []

    def save(self, step: int, state, data_iter, meta: dict, force: bool = False) -> bool:
        self._seal_finished()
        args = ocp.args.Composite(state=ocp.args.StandardSave(trained_view(state)),
                                  data=grain.checkpoint.CheckpointSave(data_iter), meta=ocp.args.JsonSave(meta))
        saved = self.mngr.save(step, args=args, force=force)
        if saved:
            self._unsealed.append(step)
        return saved

    def restore_latest(self, state_like, data_iter):
        """(step, trained state, meta) of the newest checkpoint that restores, or None when there is none.

        `state_like`: the (abstract or concrete) full state whose shardings the restore targets.
        """
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                              trained_view(state_like))
        result = None
        for step in sorted(self.mngr.all_steps(), reverse=True):
            args = ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                      data=grain.checkpoint.CheckpointRestore(data_iter), meta=ocp.args.JsonRestore())
            problems = verify(self.directory / str(step))
            if not problems:
                try:
                    restored = self.mngr.restore(step, args=args)
                    result = step, restored.state, restored.meta
                    break
                except Exception as e:  # orbax/tensorstore raise many types for damaged files
                    problems = [f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"]
            log.error("checkpoint at step %d is corrupt (%s); moved to %s, falling back to the previous one",
                      step, "; ".join(problems[:3]), self.quarantine)
            self._quarantine(step)
        return result

    @property
    def quarantine(self) -> Path:
        return self.directory.parent / (self.directory.name + "_corrupt")

    def _quarantine(self, step: int) -> None:
        """Moves a damaged step aside (kept for inspection, never reused) so it is neither resumed nor
        in the way of a fresh save of the same step."""
        from jax.experimental import multihost_utils

        if jax.process_index() == 0:
            self.quarantine.mkdir(exist_ok=True)
            dst = self.quarantine / str(step)
            n = 0
            while dst.exists():
                n += 1
                dst = self.quarantine / f"{step}.{n}"
            (self.directory / str(step)).rename(dst)
        multihost_utils.sync_global_devices(f"sprintjax quarantine {step}")
        self.mngr.reload()

    def reached_preemption(self, step: int) -> bool:
        """JAX's preemption sync point (multi-process runs under jax.distributed)."""
        return jax.process_count() > 1 and self.mngr.reached_preemption(step)

    def wait(self):
        self._seal_finished()

    def close(self):
        self.mngr.close()


def trained_params(workdir: str | Path, part: str = "student", step: int | None = None):
    """(params, model config, step) from a training workdir's checkpoint (the latest sealed one by default).

    part: "student" (a distillation run: the student's SANA params, without the logvar head), "ema" (its EMA),
    "student_control" / "ema_control" (a controlled distillation run: the student's ControlNet, or its EMA)
    or "params" (a teacher-stage run: its EMA weights if it kept them; a controlnet-stage run: its ControlNet's,
    with the ControlNet's config; a recover-stage run: the pruned student's). The model config comes from the
    run's config.json.
    """
    from sprintjax.errors import CheckpointError

    workdir = Path(workdir)
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").glob("[0-9]*") if p.is_dir())
    if not steps:
        raise CheckpointError(f"{workdir} has no training checkpoints")
    step = steps[-1] if step is None else step
    step_dir = workdir / "checkpoints" / str(step)
    if step not in steps:
        raise CheckpointError(f"{workdir} has no checkpoint at step {step} (it has {steps})")
    problems = verify(step_dir)
    if problems:
        raise CheckpointError(f"checkpoint {step_dir} is corrupt: {'; '.join(problems[:3])}")
    cfg = run_model_config(workdir, part)
    ckpt = ocp.StandardCheckpointer()
    tree = ckpt.restore((step_dir / "state").absolute())
    ckpt.close()
    if part in ("student", "ema", "student_control", "ema_control"):
        which, _, control = part.partition("_")
        if "student" not in tree:
            raise CheckpointError(f"{workdir} is not a distillation run (no student in its state)")
        if which == "ema" and not tree.get("ema"):
            raise CheckpointError(f"{workdir} kept no EMA of the student (distill.ema_decay unset)")
        if control and "control" not in tree[which]:
            raise CheckpointError(f"{workdir} distilled no ControlNet (control.num_layers unset)")
        return tree[which]["control" if control else "net"], cfg, step
    if "params" not in tree:
        raise CheckpointError(f"{workdir} is not a teacher-stage run (no params in its state)")
    return tree.get("ema") or tree["params"], cfg, step  # the EMA weights when the run kept them


def run_model_config(workdir: str | Path, part: str = "student"):
    """The model config of `trained_params(workdir, part)`, from the run's config.json alone (no restore)."""
    import ml_collections

    from sprintjax.configlib import resolve

    workdir = Path(workdir)
    rc = resolve(ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text())))
    if part in ("student", "ema", "student_control", "ema_control"):
        student_cfg = _student_config(workdir, rc) or rc.model.replace(guidance_embeds=True)
        if not part.endswith("_control"):
            return student_cfg
        from sprintjax.controlnet import controlnet_config

        return controlnet_config(student_cfg, rc.control.num_layers)
    if rc.train.stage == "controlnet":
        from sprintjax.controlnet import controlnet_config

        return controlnet_config(rc.model, rc.control.num_layers)
    if rc.train.stage == "recover":  # the pruned student's config
        return _student_config(workdir, rc)
    return rc.model


def _student_config(workdir: Path, rc):
    """The config of a run's train.student_checkpoint as the run recorded it (None without one)."""
    from sprintjax.errors import CheckpointError
    from sprintjax.model_config import ModelConfig
    from sprintjax.stages import STUDENT_CONFIG

    if not rc.train.student_checkpoint:
        return None
    path = workdir / STUDENT_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{workdir} trained a train.student_checkpoint but has no {STUDENT_CONFIG}")
    return ModelConfig.from_json(path.read_text())
