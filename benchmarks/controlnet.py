"""SANA-Sprint-ControlNet at small scale (paper §3.4, App. F.3), on the shapes benchmark's Canny edges (not in CI).

    python benchmarks/controlnet.py            # distil, then measure (resumable: a finished run is reused)

1. Distils the shipped teacher and its shipped ControlNet (configs/shapes.py `controlnet_distill`) into a
   student and a student ControlNet by sCM + LADD, controls on both sides, into --out/train.
2. Evaluates the 20-step ControlNet teacher (Flow-Euler, CFG 4.5) and the 1/2/4-step controlled student on the
   validation prompts and their edge maps: FD, compositional score, edge F1 (sprintjax.data.edges), with a grid whose
   first row is the control maps (--out/results.md, results.json, grid.png).
3. Times the 1-step student with and without its ControlNet at batch 1 in this process, interleaved
   (median of --repeats rounds), and writes the issue's ratios with their floors to --out/summary.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = Path(__file__).resolve().parents[1]
TARGETS = {  # issue 21: (floor, goal) and the direction of "better"
    "edge_f1_ratio": (0.85, 0.95, "min"), "fd_ratio": (1.5, 1.2, "max"), "latency_ratio": (1.6, 1.3, "max")}


def ensure_control_data(data: Path) -> None:
    from sprintjax.bench import shapes
    from sprintjax.data.prepare import prepare

    if list(data.glob("*/*/dataset_info.json")) or (data / "dataset_info.json").is_file():
        return
    print(f"preparing the shapes records with Canny control latents -> {data}", flush=True)
    prepare(shapes.caption_pairs(10000, 1000), data, "builtin-ae", "minilm", max_length=16, batch_size=250,
            source="shapes", control="canny")


def distil(args) -> tuple[Path, Path]:
    """Trains (or resumes) the controlled distillation; exports the student and its ControlNet."""
    from sprintjax.checkpoints import trained_params
    from sprintjax.configlib import load_config, parse_overrides
    from sprintjax.convert import save_params
    from sprintjax.train import train

    cfg = load_config(str(REPO / "configs" / "shapes.py") + ":controlnet_distill")
    cfg = parse_overrides(cfg, [f"--config.data.dir={args.data}", *args.overrides])
    work = args.out / "train"
    print(f"distilling for {cfg.train.num_steps} iterations -> {work}", flush=True)
    train(cfg, work)
    student, cn = args.out / "student", args.out / "student_controlnet"
    params, scfg, _ = trained_params(work, "student")
    save_params(student, params, scfg.replace(dtype="float32", remat="none"), force=True)
    params, ccfg, _ = trained_params(work, "student_control")
    save_params(cn, params, ccfg.replace(dtype="float32", remat="none"), force=True, controlnet=True)
    return student, cn


def latency_ratio(student: Path, controlnet: Path, data: Path, repeats: int) -> dict:
    """Median batch-1 seconds of the 1-step student with and without its ControlNet, timed alternately."""
    import numpy as np

    from sprintjax.bench import evaluate
    from sprintjax.controlnet import SanaControlNet
    from sprintjax.convert import load_controlnet, load_model
    from sprintjax.model import SanaTransformer

    params, cfg = load_model(student)
    cn_params, cn_cfg = load_controlnet(controlnet)
    caption, mask, _ = evaluate.prompts(data, 1)
    control = evaluate.control_latents(data, 1)
    noise = evaluate.noise_for(1, 1, cfg.in_channels)
    plain = evaluate.student_sampler(SanaTransformer(cfg), params, 1)[0]
    ctrl = evaluate.student_sampler(SanaTransformer(cfg), params, 1, controlnet=(SanaControlNet(cn_cfg), cn_params))[0]
    calls = {"text_to_image": lambda: plain(noise, caption, mask), "controlnet": lambda: ctrl(noise, caption, mask,
                                                                                              control)}
    times = {k: [] for k in calls}
    for fn in calls.values():  # compile and warm up
        np.asarray(fn())
    for _ in range(repeats):
        for k, fn in calls.items():
            t0 = time.perf_counter()
            np.asarray(fn())
            times[k].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {"latency_text_to_image_s": med["text_to_image"], "latency_controlnet_s": med["controlnet"],
            "latency_ratio": med["controlnet"] / med["text_to_image"], "repeats": repeats}


def summary(results: dict, timing: dict) -> dict:
    t, s = results["teacher_20"], results["student_1"]
    return {"edge_f1_ratio": s["edge_f1"] / t["edge_f1"], "fd_ratio": s["fd"] / t["fd"], **timing}


def write_summary(out: Path, summ: dict) -> str:
    lines = ["| what | measured | floor | goal | floor met |", "|---|---|---|---|---|"]
    for k, (floor, goal, better) in TARGETS.items():
        v = summ[k]
        met = v >= floor if better == "min" else v <= floor
        lines.append(f"| {k} | {v:.3f} | {floor} | {goal} | {'yes' if met else 'MISSED'} |")
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(summ, indent=2) + "\n")
    return text


def main(argv=None) -> None:
    import platform

    import jax

    from sprintjax.bench import evaluate
    from sprintjax.configlib import load_config

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=REPO / "runs" / "shapes_control_data")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "controlnet")
    p.add_argument("--num", type=int, default=500, help="validation prompts")
    p.add_argument("--seed", type=int, default=0, help="seed of the shared noise")
    p.add_argument("--repeats", type=int, default=30, help="timing rounds")
    args, args.overrides = p.parse_known_args(argv)

    ensure_control_data(args.data)
    student, student_cn = distil(args)
    shipped = load_config(str(REPO / "configs" / "shapes.py") + ":controlnet_distill")
    results = evaluate.run_benchmark(
        args.data, args.out, {"teacher": shipped.train.teacher_checkpoint, "student": str(student)},
        {"teacher": [20], "student": [1, 2, 4]}, args.num, args.seed,
        {"teacher": shipped.control.teacher_checkpoint, "student": str(student_cn)})
    print((args.out / "results.md").read_text(), flush=True)
    timing = latency_ratio(student, student_cn, args.data, args.repeats)
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
              if line.startswith("model name")] if cpuinfo.is_file() else []
    timing["cpu"] = models[0] if models else platform.processor() or platform.machine()
    timing["cpu_threads"] = os.cpu_count()
    timing["jax_devices"] = len(jax.devices())
    print(write_summary(args.out, summary(results, timing)), flush=True)


if __name__ == "__main__":
    main()
