"""The compression ladder of the Sprint student on the shapes miniature (issue 22; not in CI).

    python benchmarks/compress.py          # recovery only; resumable: finished rungs and runs are reused
    python benchmarks/compress.py --ladd-steps 240 --out runs/bench/compress_ladd   # + sCM + LADD per rung

1. The uncompressed student: the demo's distillation (configs/shapes.py, 240 iterations, seed 0) -> --out/student.
2. Each rung is cut from the previous rung's final weights (`sprintjax compress`: sensitivities on 64 held-out
   validation records at the 1/2/4-step times; its plan kept relative to the uncompressed student), recovered by
   distillation from the uncompressed student (configs/shapes.py:recover, --recover-steps iterations), and with
   --ladd-steps > 0 then trained by sCM + LADD from the teacher (the demo's config with
   train.student_checkpoint; measured worse at every rung, BENCHMARKS.md §8, so off by default).
   The token rungs (TOKEN_RUNGS) insert a token sampler (`compress --token-sampler`, sprintjax.tokens) into the
   student or a pruned rung and are recovered the same way; `--rungs pruning` or `--rungs tokens` runs one kind.
3. Per rung: parameters; the whole 1-step pipeline (MiniLM, the generator, the shapes autoencoder) exported as
   one ExecuTorch program (XNNPACK, float32; `export-mobile --text-encoder --vae`) and its file size; FD and
   compositional score at 1 step (--num validation prompts, the shared noise) after recovery and after
   sCM + LADD; the latency of each method, batch 1, 2 threads, median of --repeats rounds run interleaved
   across all rungs and methods in this process, after everything else (--out/ladder.md, ladder.json).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = Path(__file__).resolve().parents[1]
RUNGS = (  # name, blocks, cross-attention heads, Mix-FFN channels (the student: 4, 3, 240), each cut from the last
    ("ffn_half", 4, 3, 120),
    ("3_blocks", 3, 2, 120),
    ("2_blocks", 2, 2, 96),
    ("2_blocks_1_head", 2, 1, 48),
)
TOKEN_RUNGS = (  # name, the rung it is cut from, DOWN:UP: a token sampler with blocks DOWN..UP-1 on the half grid
    ("tokens_1_3", "student", "1:3"),
    ("tokens_0_3", "student", "0:3"),
    ("3_blocks_tokens_0_2", "3_blocks", "0:2"),
)


def config(variant: str, overrides):
    from sprintjax.configlib import load_config, parse_overrides

    return parse_overrides(load_config(str(REPO / "configs" / "shapes.py") + (f":{variant}" if variant else "")),
                           overrides)


def export(workdir: Path, part: str, dst: Path, plan_file: Path | None = None) -> Path:
    """A finished run's weights as a params checkpoint (with the rung's plan beside them)."""
    from sprintjax.checkpoints import trained_params
    from sprintjax.convert import save_params

    if not (dst / "model_config.json").is_file():
        params, cfg, _ = trained_params(workdir, part)
        extra = {"prune_plan.json": plan_file.read_text()} if plan_file else None
        save_params(dst, params, cfg.replace(dtype="float32", remat="none"), force=True, extra=extra)
    return dst


def student(args) -> Path:
    from sprintjax.bench.demo import ensure_dataset
    from sprintjax.train import train

    ensure_dataset(args.data)
    work = args.out / "student_train"
    train(config("", [f"--config.data.dir={args.data}"]), work)
    return export(work, "student", args.out / "student")


def rung(args, source: Path, previous: Path, name: str, cut: list[str]) -> dict:
    """Cut (`sprintjax compress` with the `cut` options), recover, sCM + LADD; returns the rung's checkpoints."""
    from sprintjax.cli import main as cli
    from sprintjax.train import train

    folder = args.out / name
    pruned = folder / "pruned"
    if not (pruned / "model_config.json").is_file():
        code = cli(["compress", str(previous), str(pruned), "--data", str(args.data), "--held-out", "64", *cut,
                    "--force"])
        if code:
            raise SystemExit(f"compress failed for rung {name}")
    plan = pruned / "prune_plan.json"
    print(f"[{name}] recovery: {args.recover_steps} iterations", flush=True)
    train(config("recover", [f"--config.data.dir={args.data}", f"--config.train.teacher_checkpoint={source}",
                             f"--config.train.student_checkpoint={pruned}",
                             f"--config.train.num_steps={args.recover_steps}"]), folder / "recover_train")
    recovered = export(folder / "recover_train", "params", folder / "recovered", plan)
    out = {"pruned": pruned, "recovered": recovered, "final": recovered}
    if args.ladd_steps:
        print(f"[{name}] sCM + LADD: {args.ladd_steps} iterations", flush=True)
        train(config("", [f"--config.data.dir={args.data}", f"--config.train.student_checkpoint={recovered}",
                          f"--config.train.num_steps={args.ladd_steps}"]), folder / "ladd_train")
        out["final"] = export(folder / "ladd_train", "student", folder / "student", plan)
    return out


def quality(args, path: Path, name: str) -> dict:
    from sprintjax.bench import evaluate

    out = args.out / "eval" / name
    if not (out / "results.json").is_file():
        evaluate.run_benchmark(args.data, out, {"student": str(path)}, {"student": [1]}, args.num, args.seed)
    return json.loads((out / "results.json").read_text())["student_1"]


def exported(args, path: Path, name: str) -> Path:
    """The rung's whole 1-step float32 pipeline (MiniLM, the generator, the shapes autoencoder) as one ExecuTorch
    program (each method checked in its runtime against sprintjax)."""
    from sprintjax.convert import load_model
    from sprintjax.convert.mobile_pipeline import export_pipeline

    out = args.out / "pipeline" / name
    if not (out / "export.json").is_file():
        params, cfg = load_model(path)
        export_pipeline(params, cfg, out, "minilm", "builtin-ae", steps=(1,), caption_len=16, weights=("float32",),
                        formats=("pte",), force=True, log=lambda m: None)
    return out / "sana_sprint_pipeline_1step_float32.pte"


def latencies(programs: dict[str, Path], repeats: int, threads: int) -> dict[str, dict[str, float]]:
    """Median seconds of each program's three methods, batch 1, rounds interleaved across programs and methods."""
    import numpy as np
    import torch
    from executorch.extension.pybindings.portable_lib import _threadpool_get_thread_count, _unsafe_reset_threadpool
    from executorch.runtime import Runtime
    from transformers import AutoTokenizer

    from sprintjax.convert.mobile_pipeline import METHODS

    _unsafe_reset_threadpool(threads)
    assert _threadpool_get_thread_count() == threads
    runs = {}
    for name, pte in programs.items():
        report = json.loads((pte.parent / "export.json").read_text())
        tok = AutoTokenizer.from_pretrained(pte.parent / "tokenizer", local_files_only=True)(
            report["prompts"][:1], padding="max_length", max_length=report["tokens"], return_tensors="pt")
        program = Runtime.get().load_program(str(pte))
        method = {m: program.load_method(m) for m in METHODS}
        c, h, w = report["latent"]
        noise = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 1, c, h, w)).astype(np.float32))
        caption = method["encode_text"].execute([tok["input_ids"], tok["attention_mask"]])
        latents = method["generate"].execute([noise, *caption])
        inputs = {"encode_text": [tok["input_ids"], tok["attention_mask"]], "generate": [noise, *caption],
                  "decode": list(latents)}
        for m in METHODS:
            runs[(name, m)] = (lambda m=m, method=method, inputs=inputs: method[m].execute(inputs[m]))
            runs[(name, m)]()  # warm up
    times = {k: [] for k in runs}
    for _ in range(repeats):
        for key, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - t0)
    out = {name: {} for name in programs}
    for (name, m), v in times.items():
        out[name][m] = float(np.median(v))
    return out


def main(argv=None) -> None:
    from sprintjax.convert import load_model
    from sprintjax.model import count_params

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=REPO / "runs" / "shapes_ae_data")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "compress")
    p.add_argument("--recover-steps", type=int, default=600)
    p.add_argument("--ladd-steps", type=int, default=0, help="sCM + LADD iterations after recovery (0: none)")
    p.add_argument("--num", type=int, default=500, help="validation prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=50, help="latency rounds")
    p.add_argument("--threads", type=int, default=2, help="ExecuTorch threads")
    p.add_argument("--rungs", default="pruning,tokens", help="which ladders: pruning (RUNGS), tokens (TOKEN_RUNGS)")
    args = p.parse_args(argv)

    source = student(args)
    rows = [{"rung": "student", "final": source, "recovered": None}]
    previous = source
    for name, blocks, heads, channels in RUNGS if "pruning" in args.rungs.split(",") else ():
        cut = ["--num-layers", str(blocks), "--cross-heads", str(heads), "--ffn-channels", str(channels)]
        r = rung(args, source, previous, name, cut)
        rows.append({"rung": name, **r})
        previous = r["final"]
    for name, base, spec in TOKEN_RUNGS if "tokens" in args.rungs.split(",") else ():
        cut_from = next((r["final"] for r in rows if r["rung"] == base), None)
        if cut_from is not None:
            rows.append({"rung": name, **rung(args, source, cut_from, name, ["--token-sampler", spec])})
    for row in rows:
        params, cfg = load_model(row["final"])
        half = f" + blocks {cfg.token_down}..{cfg.token_up - 1} on 1/4 tokens" if cfg.token_sampler else ""
        row.update(params=count_params(params), blocks=f"{cfg.num_layers}{half}", heads=cfg.num_cross_attention_heads,
                   channels=cfg.mlp_hidden, quality=quality(args, row["final"], row["rung"]),
                   pte=exported(args, row["final"], row["rung"]))
        if row["recovered"] is not None and row["recovered"] != row["final"]:
            row["quality_recovered"] = quality(args, row["recovered"], row["rung"] + "_recovered")
        row["bytes"] = row["pte"].stat().st_size
    print("timing every method (nothing else should run now) ...", flush=True)
    lat = latencies({r["rung"]: r["pte"] for r in rows}, args.repeats, args.threads)
    write(args, rows, lat)


def write(args, rows: list, lat: dict) -> None:
    import platform

    base = rows[0]
    lines = ["| rung | blocks / cross heads / FFN ch. | parameters | pipeline .pte | generator latency (ms) | "
             "text / decode (ms) | FD | compositional | FD after recovery only |",
             "|---|---|---|---|---|---|---|---|---|"]
    table = []
    for r in rows:
        q, rec = r["quality"], r.get("quality_recovered")
        entry = {"rung": r["rung"], "blocks": r["blocks"], "cross_heads": r["heads"], "ffn_channels": r["channels"],
                 "params": r["params"], "params_ratio": r["params"] / base["params"], "pte_bytes": r["bytes"],
                 "latency_s": lat[r["rung"]]["generate"], "methods_latency_s": lat[r["rung"]],
                 "latency_ratio": lat[r["rung"]]["generate"] / lat[base["rung"]]["generate"], "fd": q["fd"],
                 "compositional": q["compositional"], "fd_recovered_only": rec["fd"] if rec else None,
                 "compositional_recovered_only": rec["compositional"] if rec else None}
        table.append(entry)
        lines.append(f"| {r['rung']} | {r['blocks']} / {r['heads']} / {r['channels']} | {r['params']:,} "
                     f"({entry['params_ratio']:.2f}x) | {r['bytes'] / 2**20:.2f} MiB | {1e3 * entry['latency_s']:.3f} "
                     f"({entry['latency_ratio']:.2f}x) | {1e3 * lat[r['rung']]['encode_text']:.3f} / "
                     f"{1e3 * lat[r['rung']]['decode']:.3f} | {q['fd']:.2f} | {q['compositional']:.3f} | "
                     f"{'-' if not rec else format(rec['fd'], '.2f')} |")
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").is_file() else ""
    meta = {"cpu": cpu, "cpu_count": os.cpu_count(), "executorch_threads": args.threads, "repeats": args.repeats,
            "recover_steps": args.recover_steps, "ladd_steps": args.ladd_steps, "num": args.num}
    text = "\n".join(lines) + "\n\n" + ", ".join(f"{k}: {v}" for k, v in meta.items()) + "\n"
    (args.out / "ladder.md").write_text(text)
    (args.out / "ladder.json").write_text(json.dumps({"rungs": table, **meta}, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
