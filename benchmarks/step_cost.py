"""Step cost against the FLOP model, on this machine's CPU, in one run (not in CI).

    python benchmarks/step_cost.py [--hidden 512 --layers 8 --latent 16 --batch 8 --caption-len 64 --repeats 3]

Compiles, on the same model, the plain flow-matching training step (forward + backward: the baseline), the
distillation generator step (teacher CFG, sCM JVP in the fused and the two-pass form, LADD generator loss) and
the discriminator step; reads each compiled program's FLOPs from XLA's `cost_analysis()`; times them as the
median of interleaved runs; prints, per step, the measured time ratio to the flow step next to the FLOP
ratio. A time ratio close to the FLOP ratio means the step wastes nothing beyond its arithmetic. Every figure
is a ratio from one run (or a compiler figure), so a noisy shared machine cannot fake it. The blocks are
unrolled (`scan_layers=False`) because XLA's cost analysis counts a loop body once.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def model_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The benchmark model's flags (shared with vs_pytorch.py)."""
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--latent", type=int, default=16)
    p.add_argument("--latent-channels", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--caption-len", type=int, default=64)
    p.add_argument("--caption-channels", type=int, default=2304)
    p.add_argument("--repeats", type=int, default=3)
    return p


def model_config(args):
    """A SANA block stack with 32-dim heads and QK-norm, as the benchmark sizes it. Scanned blocks (`--scan`) are
    rematerialised with the `dots` policy, as the pod recipes run them: on XLA:CPU a scan without remat spends
    about a third of the generator step writing and reading the per-layer residual stacks
    (benchmarks/op_profile.py --scan; BENCHMARKS.md §2)."""
    from sprintjax.model_config import ModelConfig

    heads, c = args.hidden // 32, args.latent_channels
    return ModelConfig(in_channels=c, out_channels=c, num_attention_heads=heads, attention_head_dim=32,
                       num_layers=args.layers, num_cross_attention_heads=heads, cross_attention_head_dim=32,
                       cross_attention_dim=args.hidden, caption_channels=args.caption_channels,
                       sample_size=args.latent, qk_norm="rms_norm_across_heads", scan_layers=args.scan,
                       remat="dots" if args.scan else "none")


def benchmark_batch(args):
    """(batch, null caption) of the benchmark model: standard-normal latents and captions, unmasked."""
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    b, L = args.batch, args.caption_len
    shape = (b, args.latent_channels, args.latent, args.latent)
    batch = {"latents": jnp.asarray(rng.standard_normal(shape), jnp.float32),
             "caption": jnp.asarray(rng.standard_normal((b, L, args.caption_channels)), jnp.float32),
             "caption_mask": jnp.ones((b, L), jnp.float32)}
    return batch, jnp.zeros((L, args.caption_channels), jnp.float32)


def build(args):
    import jax

    from sprintjax.distill import Distiller
    from sprintjax.distill_config import DistillConfig
    from sprintjax.flow import TeacherTrainer

    cfg = model_config(args)
    batch, null = benchmark_batch(args)
    trainer = TeacherTrainer(cfg, lr=1e-4, warmup=0)
    params = trainer.model.init(jax.random.key(0))
    steps = {"flow (fwd + bwd)": (trainer.step, trainer.init(params, null))}
    for form in ("fused", "two_pass"):
        d = Distiller(cfg, DistillConfig(scm_form=form, disc_layers=(args.layers // 4, args.layers // 2)))
        state = d.init(params, null, jax.random.key(1))
        steps[f"generator ({form})"] = (d.generator_step, state)
        if form == "fused":
            steps["discriminator"] = (d.discriminator_step, state)
    return cfg, batch, steps


def main(argv=None) -> None:
    import jax
    import numpy as np

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model_args(p)
    p.add_argument("--scan", action="store_true",
                   help="scan over the blocks (XLA's cost analysis then counts one block per loop: FLOP ratios "
                        "are wrong; for timing the scanned form only)")
    args = p.parse_args(argv)
    cfg, batch, steps = build(args)
    key = jax.random.key(2)
    compiled, flops = {}, {}
    for name, (fn, state) in steps.items():
        print(f"compiling {name} ...", flush=True)
        compiled[name] = jax.jit(fn).lower(state, batch, key).compile()
        cost = compiled[name].cost_analysis() or {}
        flops[name] = float((cost[0] if isinstance(cost, list) else cost).get("flops", float("nan")))
        jax.block_until_ready(compiled[name](state, batch, key))  # warm up
    times = {name: [] for name in steps}
    for _ in range(args.repeats):  # interleaved, so drifts in machine load hit every step alike
        for name, (_, state) in steps.items():
            t0 = time.perf_counter()
            jax.block_until_ready(compiled[name](state, batch, key))
            times[name].append(time.perf_counter() - t0)
    med = {name: float(np.median(t)) for name, t in times.items()}
    base = "flow (fwd + bwd)"
    print(f"\nmodel: hidden {args.hidden}, {args.layers} layers ({'scanned' if args.scan else 'unrolled'}), "
          f"{args.latent}x{args.latent} latent, batch {args.batch}, caption {args.caption_len}x"
          f"{args.caption_channels}; {jax.devices()[0].device_kind} x {os.cpu_count()} cores, "
          f"median of {args.repeats} interleaved runs\n")
    print("| step | GFLOP | time (s) | GFLOP/s | time ratio | FLOP ratio | time / FLOP ratio |")
    print("|---|---|---|---|---|---|---|")
    for name in steps:
        tr, fr = med[name] / med[base], flops[name] / flops[base]
        print(f"| {name} | {flops[name] / 1e9:.1f} | {med[name]:.3f} | {flops[name] / 1e9 / med[name]:.1f} | "
              f"{tr:.2f} | {fr:.2f} | {tr / fr:.2f} |")


if __name__ == "__main__":
    main()
