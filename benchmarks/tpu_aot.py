"""TPU training programs compiled ahead of time on this machine (libtpu's AOT path; no TPU needed; not in CI).

    python benchmarks/tpu_aot.py [--out runs/bench/tpu_aot] [--only 600m-v5p-64,...] [--recount]

Runs `sprintjax compile` for the official 1024px recipes (32x32 latents, 300 caption tokens, global batch 512) of
the 0.6B and 1.6B presets on v5p and v6e topologies of 32 and 64 chips, and for before/after variants (remat
`full` instead of `dots`, a replicated teacher, the two-pass sCM form, HSDP, ZeRO-3 blocks with `dots`, a
ControlNet on teacher and student). Each run
is a subprocess that writes its JSON report and the compiled HLO texts (NAME/STEP.hlo.txt; resumable: finished
runs are kept); the script then prints one markdown table of per-device memory, model FLOPs, the whole step's
HBM bytes and roofline time (loop trip counts applied), the MFU bound and collective bytes against the FSDP
minimum. `--recount` reads the collectives and the whole-step figures again from the kept HLO texts (after a
change to how `sprintjax.hlo` counts them) without compiling anything.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from sprintjax.aot import CHIPS, whole_step
from sprintjax.fileio import atomic_write_bytes
from sprintjax.hlo import by_kind, by_scope, collectives, wire_bytes

CONFIGS = {"600m": "configs/sana_sprint_600m_1024.py", "1600m": "configs/sana_sprint_1600m_1024.py"}
TOPOLOGIES = {("v5p", 32): "v5p:4x4x2", ("v5p", 64): "v5p:4x4x4", ("v6e", 32): "v6e:4x8", ("v6e", 64): "v6e:8x8"}
MATRIX = [(m, chip, n, {}) for m, chip, n in (("600m", "v5p", 32), ("1600m", "v5p", 32), ("600m", "v6e", 32),
                                              ("1600m", "v6e", 32), ("600m", "v5p", 64), ("1600m", "v5p", 64),
                                              ("600m", "v6e", 64), ("1600m", "v6e", 64))]
REPLICATED_TEACHER = '((".*", "replicate"),)'
VARIANTS = [  # before/after figures of the remat policy, the mesh, ZeRO-3, where the teacher lives, the sCM form
    ("600m", "v6e", 32, {"model.remat": "full"}),
    ("1600m", "v6e", 32, {"model.remat": "full"}),
    ("600m", "v5p", 32, {"sharding.teacher_rules": REPLICATED_TEACHER}),
    ("600m", "v5p", 32, {"distill.scm_form": "two_pass"}),
    *[(m, chip, 64, {"mesh.data": 2, "model.zero3_blocks": "off"}) for m in ("600m", "1600m")
      for chip in ("v5p", "v6e")],  # HSDP 2 x 32 by the partitioner
    *[(m, chip, 64, {"mesh.data": 2, "model.remat": "full"}) for m in ("600m", "1600m")
      for chip in ("v5p", "v6e")],  # HSDP + ZeRO-3 blocks
    ("600m", "v5p", 32, {"model.zero3_blocks": "off"}),  # the partitioner's FSDP (the 32-chip default until stop 31)
    *[("600m", chip, 64, {"distill.jvp_dtype": "bfloat16"}) for chip in ("v5p", "v6e")],  # the bf16 sCM path
    ("600m", "v5p", 64, {"mesh.data": 1}),  # FSDP over all 64 (the default before the mesh picked itself)
    # ControlNet Sprint: a 7-block ControlNet (diffusers' default) on teacher and student (docs/controlnet.md)
    *[("600m", chip, 64, {"control.num_layers": 7}) for chip in ("v5p", "v6e")],
    ("600m", "v6e", 64, {"control.num_layers": 7, "model.remat": "full"}),  # does v6e fit it with full remat?
]
SHORT = {REPLICATED_TEACHER: "replicated"}  # run names for override values that are not plain words


def run_name(model, chip, n, overrides) -> str:
    return "-".join([model, chip, str(n), *(f"{k.split('.')[-1]}={SHORT.get(v, v)}" for k, v in overrides.items())])


def run_one(path: Path, model, chip, n, overrides) -> dict | None:
    if not path.exists():
        sprintjax = str(Path(sys.executable).parent / "sprintjax")
        cmd = [sprintjax, "compile", "--config", CONFIGS[model], "--topology", TOPOLOGIES[chip, n], "--json",
               str(path), "--hlo", str(path.with_suffix("")), *(f"--config.{k}={v}" for k, v in overrides.items())]
        print("$", " ".join(cmd[1:]), flush=True)
        done = subprocess.run(cmd, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True)
        print(done.stdout.split("figures per device\n", 1)[-1], flush=True)
        if not path.exists():  # a failure other than "does not fit" (that one is reported in the JSON)
            print(done.stderr[-2000:], flush=True)
            return None
    return json.loads(path.read_text())


def recount(path: Path, report: dict) -> dict:
    """The report with its collective and whole-step figures read again from the run's HLO texts (rewritten in
    place)."""
    for step, r in report.items():
        hlo = path.with_suffix("") / f"{step}.hlo.txt"
        if "collective_bytes" in r and hlo.exists():
            text = hlo.read_text()
            found = collectives(text)
            r["collective_bytes"], r["collective_bytes_by_scope"] = by_kind(found), by_scope(found)
            r.update(whole_step(text, path.stem.split("-")[1], r["model_flops"]))
    atomic_write_bytes(path, json.dumps(report, indent=2).encode())
    return report


def table(rows) -> str:
    gib = 1 << 30
    out = ["| run | step | arguments GiB | temporaries GiB | peak GiB / HBM | model TFLOP | HBM GiB accessed | "
           "roofline ms | MFU bound | collectives GiB | FSDP min GiB | ratio |", "|" + "---|" * 12]
    for name, report in rows:
        for step, r in report.items():
            if "does_not_fit" in r:
                out.append(f"| {name} | {step} | does not fit: {r['does_not_fit']} |" + " |" * 10)
                continue
            moved, least = wire_bytes(r["collective_bytes"]), wire_bytes(r["fsdp_minimum_bytes"])
            accessed = f"{r['hlo_bytes'] / gib:.1f}" if "hlo_bytes" in r else "n/a"  # runs before the HLO reading
            bound = (f"{r['roofline_seconds'] * 1e3:.0f} | {r['mfu_bound']:.2f}" if "roofline_seconds" in r
                     else "n/a | n/a")
            hbm = CHIPS[name.split("-")[1]][1] / gib
            out.append(f"| {name} | {step} | {r['argument_bytes'] / gib:.2f} | {r['temp_bytes'] / gib:.2f} | "
                       f"{r['peak_bytes_estimate'] / gib:.1f} / {hbm:.0f} | {r['model_flops'] / 1e12:.1f} | "
                       f"{accessed} | {bound} | {moved / gib:.2f} | {least / gib:.2f} | {moved / least:.2f} |")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/bench/tpu_aot")
    p.add_argument("--only", default="", help="comma-separated run names (default: all)")
    p.add_argument("--recount", action="store_true", help="recount collectives from the kept HLO, compile nothing")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = set(filter(None, args.only.split(",")))
    rows = []
    for model, chip, n, overrides in MATRIX + VARIANTS:
        name = run_name(model, chip, n, overrides)
        if wanted and name not in wanted:
            continue
        path = out / f"{name}.json"
        if args.recount:
            report = recount(path, json.loads(path.read_text())) if path.exists() else None
        else:
            report = run_one(path, model, chip, n, overrides)
        if report:
            rows.append((name, report))
    print(table(rows))
    (out / "table.md").write_text(table(rows) + "\n")


if __name__ == "__main__":
    main()
