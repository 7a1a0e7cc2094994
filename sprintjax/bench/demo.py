"""`make demo`: the main job on the embedded default, end to end on a CPU.

1. the shapes dataset (built once through `prepare-data`, cached in runs/shapes_ae_data),
2. distillation of the shipped teacher into a one-step student with sCM + LADD (configs/shapes.py),
3. the student exported as a params checkpoint and a diffusers folder,
4. the run's health (per-term losses, discriminator accuracy on reals and fakes, tangent norm and warmup, by
   half of the run; also in `training.json`) and the benchmark: teacher 20 steps with CFG and 1 step against
   the student at 1, 2 and 4 steps,
5. where everything lives. Nothing here is special-cased: it is the benchmark config, run as a user would.
"""

from __future__ import annotations

import json
from pathlib import Path

import sprintjax

REPO = Path(sprintjax.__file__).resolve().parents[1]
DATA_DIR = Path("runs/shapes_ae_data")  # the benchmark's records (configs/shapes.py's data.dir), built once


def ensure_dataset(data_dir: Path, num: int = 10000, num_validation: int = 1000) -> Path:
    from sprintjax.bench import shapes
    from sprintjax.data.prepare import prepare

    if list(data_dir.glob("*/*/dataset_info.json")):
        return data_dir
    prepare(shapes.caption_pairs(num, num_validation), data_dir, "builtin-ae", "minilm", max_length=16,
            batch_size=256, source="shapes")
    return data_dir


def run_demo(workdir: Path, data_dir: Path = DATA_DIR, overrides=(), num_eval: int = 500) -> dict:
    from sprintjax.bench import evaluate
    from sprintjax.checkpoints import trained_params
    from sprintjax.configlib import load_config, parse_overrides
    from sprintjax.convert import params_to_diffusers, save_params
    from sprintjax.fileio import atomic_write_bytes
    from sprintjax.observe import format_summary, training_summary
    from sprintjax.train import train

    workdir = Path(workdir)
    print(f"[1/5] dataset -> {data_dir}", flush=True)
    ensure_dataset(data_dir)
    cfg = parse_overrides(load_config(str(REPO / "configs" / "shapes.py")),
                          [f"--config.data.dir={data_dir}", *overrides])
    print(f"[2/5] distilling {cfg.train.teacher_checkpoint} for {cfg.train.num_steps} iterations -> "
          f"{workdir / 'train'}", flush=True)
    if train(cfg, workdir / "train") != "done":
        print(f"training was preempted; rerun the same command to resume it from {workdir / 'train'}")
        return {}
    params, scfg, step = trained_params(workdir / "train", "student")
    scfg = scfg.replace(dtype="float32", remat="none")
    print(f"[3/5] student (iteration {step}) -> {workdir / 'student'} and {workdir / 'student_diffusers'}", flush=True)
    save_params(workdir / "student", params, scfg, force=True)
    params_to_diffusers(workdir / "student_diffusers", params, scfg, force=True)
    health = training_summary(workdir / "train" / "metrics.jsonl")
    atomic_write_bytes(workdir / "training.json", (json.dumps(health, indent=2) + "\n").encode())
    print(f"[4/5] training health (means by half of the run):\n{format_summary(health)}\n"
          "      benchmark: teacher 20 (CFG) and 1 step vs student 1, 2, 4 steps", flush=True)
    results = evaluate.run_benchmark(data_dir, workdir, {"teacher": cfg.train.teacher_checkpoint,
                                                         "student": workdir / "student"},
                                     {"teacher": [20, 1], "student": [1, 2, 4]}, num_eval)
    print((workdir / "results.md").read_text())
    print(f"[5/5] results: {workdir / 'results.json'}, {workdir / 'results.md'}\n"
          f"      sample grid (rows: teacher_20, teacher_1, student_1, student_2, student_4): {workdir / 'grid.png'}\n"
          f"      TensorBoard logs: {workdir / 'train' / 'tensorboard'}; training health: {workdir / 'training.json'}\n"
          f"      student as a diffusers transformer: {workdir / 'student_diffusers'}")
    return results
