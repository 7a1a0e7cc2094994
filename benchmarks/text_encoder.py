"""Text-encoder distillation on the shapes miniature (issue 22; not in CI).

    python benchmarks/text_encoder.py        # ~15 min on 2 cores; resumable: finished steps are reused

The demo's student (--student, from benchmarks/compress.py) keeps its weights; only its caption encoder changes.
MiniLM (6 layers) is distilled into --layers of its layers (`sprintjax distill-text`, --steps iterations on the
first 10,000 training captions) twice: with the denoiser-feature term (weight 1, the student's first 2 blocks)
and without it (embeddings only), NanoFLUX's ablation. Per encoder: parameters, its `encode_text` method in
ExecuTorch (XNNPACK, float32, batch 1, 16 tokens, 2 threads, median of --repeats interleaved rounds), and the
student's FD and compositional score at 1 step on 500 validation prompts encoded by it (validation records
re-made with `prepare-data`'s code and that encoder). Written to --out/results.md and results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"minilm": None, "distilled": 1.0, "distilled_embeddings_only": 0.0}  # name: feature weight


def encoder_folder(args, name: str) -> str:
    from sprintjax.cli import main as cli
    from sprintjax.data.prepare import resolve_text_encoder

    if VARIANTS[name] is None:
        return resolve_text_encoder("minilm")
    out = args.out / name
    if not (out / "config.json").is_file():
        code = cli(["distill-text", str(args.student), str(out), "--text-encoder", "minilm", "--shapes", "10000",
                    "--layers", str(args.layers), "--caption-len", "16", "--steps", str(args.steps),
                    "--feature-weight", str(VARIANTS[name]), "--force"])
        if code:
            raise SystemExit(f"distill-text failed for {name}")
    return str(out)


def quality(args, name: str, folder: str) -> dict:
    from sprintjax.bench import evaluate, shapes
    from sprintjax.data.prepare import prepare

    data = args.out / "data" / name
    if not list(data.glob("*/*/dataset_info.json")):
        pairs = shapes.caption_pairs(16, args.num)  # the same validation scenes as the benchmark's records
        prepare(pairs, data, "builtin-ae", folder, max_length=16, batch_size=256, source="shapes")
    out = args.out / "eval" / name
    if not (out / "results.json").is_file():
        evaluate.run_benchmark(data, out, {"student": str(args.student)}, {"student": [1]}, args.num, 0)
    return json.loads((out / "results.json").read_text())["student_1"]


def latencies(folders: dict, out: Path, repeats: int, threads: int) -> tuple[dict, dict]:
    """(median seconds of encode_text per encoder, parameters per encoder); rounds interleaved."""
    import numpy as np
    import torch
    from executorch.exir import to_edge_transform_and_lower
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
    from executorch.runtime import Runtime

    from sprintjax.convert.mobile import xnnpack_partitioner
    from sprintjax.convert.mobile_pipeline import text_module
    from sprintjax.data.prepare import TextEncoder

    runs, params = {}, {}
    for name, folder in folders.items():
        enc = TextEncoder(folder, 16)
        params[name] = sum(p.numel() for p in enc.model.parameters())
        tok = enc.tokenizer(["a red circle to the left of a blue square"], padding="max_length", max_length=16,
                            return_tensors="pt")
        args = (tok["input_ids"], tok["attention_mask"])
        with torch.no_grad():
            program = torch.export.export(text_module(enc), args)
        et = to_edge_transform_and_lower({"encode_text": program}, partitioner=[xnnpack_partitioner()]).to_executorch()
        path = out / "pte" / f"{name}_encode_text.pte"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(et.buffer)
        method = Runtime.get().load_program(str(path)).load_method("encode_text")
        runs[name] = (lambda method=method, args=args: method.execute(list(args)))
    _unsafe_reset_threadpool(threads)
    for run in runs.values():
        run()
    times = {k: [] for k in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}, params


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--student", type=Path, default=REPO / "runs" / "bench" / "compress" / "student")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "text_encoder")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--num", type=int, default=500, help="validation prompts")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    folders = {name: encoder_folder(args, name) for name in VARIANTS}
    results = {name: quality(args, name, folder) for name, folder in folders.items()}
    print("timing encode_text (nothing else should run now) ...", flush=True)
    lat, params = latencies(folders, args.out, args.repeats, args.threads)
    base = "minilm"
    lines = ["| text encoder | parameters | encode_text latency (ms) | FD | compositional |", "|---|---|---|---|---|"]
    for name, q in results.items():
        fd, comp = q["fd"] / results[base]["fd"], q["compositional"] / results[base]["compositional"]
        lines.append(f"| {name} | {params[name] / 1e6:.2f}M ({params[name] / params[base]:.2f}x) | "
                     f"{1e3 * lat[name]:.2f} ({lat[name] / lat[base]:.2f}x) | {q['fd']:.2f} ({fd:.2f}x) | "
                     f"{q['compositional']:.3f} ({comp:.2f}x) |")
    text = "\n".join(lines) + f"\n\nlayers {args.layers}, steps {args.steps}, threads {args.threads}, " \
                              f"repeats {args.repeats}, cpu_count {os.cpu_count()}\n"
    (args.out / "results.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps({"results": results, "latency_s": lat, "params": params,
                                                       "layers": args.layers, "steps": args.steps}, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
