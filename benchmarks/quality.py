"""The paper's quality tables at small scale, on the embedded shapes benchmark (not run in CI).

    python benchmarks/quality.py table1            # Flow-Euler vs TrigFlow-Euler of the shipped teacher
    python benchmarks/quality.py table2            # teacher 20/2/1 steps vs the demo's student 1/2/4 steps
    python benchmarks/quality.py table3            # sCM only vs LADD only vs sCM + LADD, same budget
    python benchmarks/quality.py all

Each table is a folder under --out (default runs/bench) with results.json, results.md and grid.png, written by
the same code as `sprintjax eval`; the Markdown table is also printed. Table 2 evaluates the student of
`make demo` (run it first, or point --student elsewhere). Table 3 trains configs/shapes.py's default, `:scm`
and `:ladd` variants into --out/table3/<variant>/train (resumable: rerunning skips finished runs) and evaluates
each student at 1, 2 and 4 steps. Same prompts, noise (--seed) and feature space throughout.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = Path(__file__).resolve().parents[1]


def _teacher(args) -> str:
    from sprintjax.configlib import load_config

    return args.teacher or load_config(str(REPO / "configs" / "shapes.py")).train.teacher_checkpoint


def table1(args) -> dict:
    """Paper Table 1: the teacher sampled by Euler on its flow ODE and on its TrigFlow PF-ODE (Prop. 3.1)."""
    from sprintjax.bench import evaluate

    steps = [int(s) for s in args.steps.split(",")]
    return evaluate.run_benchmark(args.data, args.out / "table1", {"teacher": _teacher(args)},
                                  {"teacher": steps, "teacher_trigflow": steps}, args.num, args.seed)


def table2(args) -> dict:
    """Paper Table 2 analogue: the teacher with few and many steps against the distilled student."""
    from sprintjax.bench import evaluate

    if not Path(args.student).exists():
        raise SystemExit(f"no student at {args.student}: run `make demo` first or pass --student")
    return evaluate.run_benchmark(args.data, args.out / "table2", {"teacher": _teacher(args), "student": args.student},
                                  {"teacher": [20, 2, 1], "student": [1, 2, 4]}, args.num, args.seed)


def table3(args) -> dict:
    """Paper Table 3: the loss ablation, every variant at the default config's budget and seed."""
    from sprintjax.bench import evaluate
    from sprintjax.checkpoints import trained_params
    from sprintjax.configlib import load_config, parse_overrides
    from sprintjax.convert import save_params
    from sprintjax.train import train

    results = {}
    for variant, name in (("scm", "scm_only"), ("ladd", "ladd_only"), (None, "scm_ladd")):
        cfg = load_config(str(REPO / "configs" / ("shapes.py" + (f":{variant}" if variant else ""))))
        cfg = parse_overrides(cfg, [f"--config.data.dir={args.data}", *args.overrides])
        work = args.out / "table3" / name
        print(f"training {name} for {cfg.train.num_steps} iterations -> {work / 'train'}", flush=True)
        train(cfg, work / "train")
        params, scfg, _ = trained_params(work / "train", "student")
        save_params(work / "student", params, scfg.replace(dtype="float32", remat="none"), force=True)
        r = evaluate.run_benchmark(args.data, work, {"student": work / "student"}, {"student": [1, 2, 4]},
                                   args.num, args.seed)
        results.update({f"{name}_{k}": v for k, v in r.items()})
    evaluate.write_results(args.out / "table3", results, {})
    return results


def main(argv=None) -> None:
    from sprintjax.bench.demo import DATA_DIR, ensure_dataset

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("table", choices=["table1", "table2", "table3", "all"])
    p.add_argument("--data", default=str(REPO / DATA_DIR), help="prepared shapes records")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench")
    p.add_argument("--teacher", help="teacher checkpoint (default: the one configs/shapes.py distils)")
    p.add_argument("--student", default=str(REPO / "runs" / "demo" / "student"), help="student for table2")
    p.add_argument("--steps", default="20,8", help="table1's Euler step counts")
    p.add_argument("--num", type=int, default=500, help="validation prompts")
    p.add_argument("--seed", type=int, default=0, help="seed of the shared noise")
    args, args.overrides = p.parse_known_args(argv)

    ensure_dataset(Path(args.data))
    for name in ("table1", "table2", "table3"):
        if args.table in (name, "all"):
            globals()[name](args)
            print(f"{name}:\n" + (args.out / name / "results.md").read_text(), flush=True)


if __name__ == "__main__":
    main()
