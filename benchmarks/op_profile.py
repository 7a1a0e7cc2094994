"""Where the generator step's time goes on XLA:CPU, per model call and op kind, from a `jax.profiler` trace of
the compiled program (not in CI).

    python benchmarks/op_profile.py [--hidden 256 --layers 6 --batch 8 --caption-len 32 --caption-channels 64]
                                    [--scan] [--remat none|dots|full] [--top 25]
    python benchmarks/op_profile.py --ffn   # the Mix-FFN's depthwise conv, three formulations
    python benchmarks/op_profile.py --gemm  # the step's matmul shapes, XLA:CPU against PyTorch

The step mode compiles `Distiller.generator_step`, runs it, then traces two more runs and joins every traced op
(XLA:CPU names each thunk after its HLO instruction) with the instruction's `op_name` metadata in the compiled
HLO, so each op lands under its model call (`teacher_cfg`, `student_scm`, ..., forward or backward) and layer
(`ff/conv_depth`, `attn1`, ...). It prints the wall time, the busy time summed over threads and their ratio
(how many cores were busy on average), the model calls in the order they ran (a scanned model call is one
`while` op: XLA:CPU runs them one after another), and the costliest (call, op) pairs.

The `--ffn` mode times a Mix-FFN (1x1 conv, SiLU, depthwise 3x3, GLU, 1x1 conv) alone with three depthwise
formulations: nine shifted products, sprintjax's row sums (`layers.DepthwiseConv3x3`) and XLA's grouped
convolution; forward, gradient, and the fused sCM pattern (a JVP whose primal output carries the gradient).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from step_cost import benchmark_batch, model_args, model_config  # noqa: E402  (the same benchmark model; run from benchmarks/)


def median_ms(fn, *args, repeats: int = 20) -> float:
    from sprintjax.bench.evaluate import median_seconds

    return median_seconds(fn, *args, repeats=repeats) * 1e3


def traced_ops(run, n: int) -> list[dict]:
    """Complete ('X') events of `n` calls of `run`, from a perfetto trace."""
    import jax

    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        for _ in range(n):
            run()
        jax.profiler.stop_trace()
        (path,) = glob.glob(f"{d}/**/perfetto_trace.json.gz", recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    return [e for e in events if e.get("ph") == "X"]


CALLS = ("teacher_cfg", "student_scm", "student_ladd", "teacher_features", "heads")  # distill.py's named scopes


def model_call(op_name: str) -> tuple[str, str]:
    """('student_scm bwd', 'ff/conv_depth') from an HLO op_name; ops outside the model calls (the draws, the
    optimiser) are 'other'."""
    call = next((c for c in CALLS if c in op_name), "other")
    layer = [p for p in op_name.split("/")
             if p and not re.match(r"^(jit|jvp|transpose|while|body|closed_call|checkpoint)\b", p)]
    where = "/".join(layer[-3:-1]) if len(layer) > 1 else "/".join(layer)
    return f"{call} {'bwd' if 'transpose(' in op_name else 'fwd'}", where


def profile_step(args) -> None:
    import jax

    from sprintjax.distill import Distiller
    from sprintjax.distill_config import DistillConfig
    from sprintjax.model import SanaTransformer

    cfg = model_config(args)
    cfg = cfg.replace(remat=args.remat or cfg.remat)
    d = Distiller(cfg, DistillConfig(optimizer="adamw", disc_layers=(args.layers // 4, args.layers // 2)))
    batch, null = benchmark_batch(args)
    state = d.init(SanaTransformer(cfg).init(jax.random.key(0)), null, jax.random.key(1))
    key = jax.random.key(2)
    step = jax.jit(d.generator_step).lower(state, batch, key).compile()
    meta = {m[1]: m[2] for m in re.finditer(r"^\s*%(\S+) = .*?op_name=\"([^\"]*)\"", step.as_text(), re.M)}
    wall = median_ms(step, state, batch, key, repeats=args.repeats)
    runs = 2
    events = traced_ops(lambda: jax.block_until_ready(step(state, batch, key)), runs)
    ops = [e for e in events if e["name"] in meta]
    busy = sum(e["dur"] for e in ops) / 1e3 / runs
    print(f"\nmodel: hidden {args.hidden}, {args.layers} layers ({'scanned' if args.scan else 'unrolled'}, remat "
          f"{cfg.remat}), "
          f"{args.latent}x{args.latent} latent, batch {args.batch}, caption {args.caption_len}x"
          f"{args.caption_channels}; {os.cpu_count()} cores")
    print(f"generator step: {wall:.0f} ms wall (median of {args.repeats}); ops busy {busy:.0f} ms summed over "
          f"threads: {busy / wall:.2f} cores busy on average\n")
    first = min(e["ts"] for e in ops)
    loops = sorted((e for e in ops if e["name"].startswith("while") and e["ts"] - first < wall * 1e3
                    and not model_call(meta[e["name"]])[0].startswith("other")), key=lambda e: e["ts"])
    if loops:
        print("scanned model calls, in the order they started (ms from the step's first op):")
        for e in loops:
            print(f"  {(e['ts'] - first) / 1e3:8.0f}  {model_call(meta[e['name']])[0]}")
        print()
    by_call, by_pair = collections.Counter(), collections.Counter()
    for e in ops:
        call, where = model_call(meta[e["name"]])
        kind = re.sub(r"\.\d+$", "", e["name"])
        by_call[call] += e["dur"] / 1e3 / runs
        by_pair[(call, where, kind)] += e["dur"] / 1e3 / runs
    print("| model call | busy ms | share |\n|---|---|---|")
    for call, ms in by_call.most_common():
        print(f"| {call} | {ms:.0f} | {ms / busy:.0%} |")
    print("\n| model call | layer | op kind | busy ms |\n|---|---|---|---|")
    for (call, where, kind), ms in by_pair.most_common(args.top):
        print(f"| {call} | {where} | {kind} | {ms:.1f} |")


def profile_ffn(args) -> None:
    import jax
    import jax.numpy as jnp

    from sprintjax.layers import DepthwiseConv3x3

    b, hw, d, hidden = args.batch, args.latent, args.hidden, int(2.5 * args.hidden)
    c = 2 * hidden
    key = iter(jax.random.split(jax.random.key(0), 8))
    params = {"w1": jax.random.normal(next(key), (d, c)) * d**-0.5, "b1": jax.random.normal(next(key), (c,)) * 0.1,
              "kernel": jax.random.normal(next(key), (3, 3, 1, c)) * 0.3,
              "w2": jax.random.normal(next(key), (hidden, d)) * hidden**-0.5}
    x, dx = (jax.random.normal(next(key), (b, hw * hw, d)) for _ in range(2))

    def nine_shifted(h, k):
        p = jnp.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
        return sum(p[:, i:i + hw, j:j + hw, :] * k[i, j, 0] for i in range(3) for j in range(3))

    def grouped(h, k):
        return jax.lax.conv_general_dilated(h, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            feature_group_count=c)

    def row_sums(h, k):
        return DepthwiseConv3x3(jnp.float32).apply({"params": {"kernel": k, "bias": jnp.zeros((c,))}}, h)

    def ffn(conv):
        def f(p, x):
            h = jax.nn.silu(x.reshape(-1, d) @ p["w1"] + p["b1"]).reshape(b, hw, hw, c)
            value, gate = jnp.split(conv(h, p["kernel"]).reshape(b, hw * hw, c), 2, axis=-1)
            return ((value * jax.nn.silu(gate)).reshape(-1, hidden) @ p["w2"]).reshape(b, hw * hw, d)
        return f

    print(f"\nMix-FFN: hidden {d} -> {c} -> {hidden} -> {d}, {hw}x{hw} tokens, batch {b}; {os.cpu_count()} cores; "
          f"median of {args.repeats} runs\n")
    print("| depthwise 3x3 as | forward (ms) | gradient (ms) | fused sCM: JVP + gradient (ms) |\n|---|---|---|---|")
    for name, conv in (("nine shifted products", nine_shifted), ("row sums (sprintjax)", row_sums),
                       ("grouped convolution", grouped)):
        f = ffn(conv)
        grad = jax.jit(jax.grad(lambda p, x, f=f: jnp.sum(jnp.sin(f(p, x)))))

        def fused(p, x, dx, f=f):
            def loss(p):
                out, tangent = jax.jvp(lambda xx: f(p, xx), (x,), (dx,))
                return jnp.sum(jnp.sin(out)) + jnp.sum(jax.lax.stop_gradient(tangent))
            return jax.grad(loss)(p)

        n = args.repeats
        times = [median_ms(jax.jit(f), params, x, repeats=n), median_ms(grad, params, x, repeats=n),
                 median_ms(jax.jit(fused), params, x, dx, repeats=n)]
        print(f"| {name} | " + " | ".join(f"{t:.1f}" for t in times) + " |")


def profile_gemm(args) -> None:
    """The step's float32 matmul shapes through XLA:CPU (`jnp.dot`) and PyTorch (`torch.mm`), same threads."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    torch.set_num_threads(os.cpu_count())
    tokens, d, c = args.batch * args.latent**2, args.hidden, 5 * args.hidden  # Mix-FFN: D -> 2 x 2.5 D
    print(f"\nfloat32 matmuls of the step (tokens {tokens}, hidden {d}); {os.cpu_count()} cores, torch with "
          f"{torch.get_num_threads()} threads; median of {args.repeats} runs\n")
    print("| m x k x n | where | XLA:CPU GFLOP/s | PyTorch GFLOP/s | XLA time / PyTorch time |\n|---|---|---|---|---|")
    dot = jax.jit(jnp.dot)
    for (m, k, n), where in (((tokens, d, d), "q/k/v/out projections"), ((tokens, d, c), "Mix-FFN in"),
                             ((tokens, c // 2, d), "Mix-FFN out"), ((d, tokens, c), "Mix-FFN in, weight gradient"),
                             ((tokens, c, d), "Mix-FFN in, input gradient")):
        a, b = (np.random.default_rng(0).standard_normal(s).astype(np.float32) for s in ((m, k), (k, n)))
        ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
        t_xla = median_ms(dot, ja, jb, repeats=args.repeats)
        t_torch = median_ms(torch.mm, ta, tb, repeats=args.repeats)
        gflop = 2 * m * k * n / 1e6  # per ms
        print(f"| {m} x {k} x {n} | {where} | {gflop / t_xla:.0f} | {gflop / t_torch:.0f} | {t_xla / t_torch:.2f} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model_args(p)
    p.set_defaults(hidden=256, layers=6, batch=8, caption_len=32, caption_channels=64, repeats=5)
    p.add_argument("--scan", action="store_true", help="scan over the blocks (the training default)")
    p.add_argument("--remat", choices=("none", "dots", "full"),
                   help="the blocks' remat policy (default: dots when scanned, as the pod recipes; none unrolled)")
    p.add_argument("--top", type=int, default=25, help="rows of the (call, layer, op kind) table")
    p.add_argument("--ffn", action="store_true", help="time the Mix-FFN's depthwise formulations instead")
    p.add_argument("--gemm", action="store_true", help="time the step's matmul shapes in XLA:CPU and PyTorch instead")
    args = p.parse_args(argv)
    if args.ffn or args.gemm:
        args.repeats = max(args.repeats, 20)
        (profile_ffn if args.ffn else profile_gemm)(args)
    else:
        profile_step(args)


if __name__ == "__main__":
    main()
