"""One distillation iteration as one program that picks G or D on device (`lax.cond` of both) against one
program per phase (what the trainer runs: `Distiller.phase_step`), on this machine's CPU (not in CI).

    python benchmarks/phase_cost.py [--config configs/shapes.py] [--scan] [--iterations 12]

Until stop 29 the trainer compiled a single step whose `lax.cond` on `state.phase` chose the generator or the
discriminator step (so the host never synced to decide); inside that conditional XLA:CPU ran the
discriminator step about 9x slower than alone. This script builds the config's state with a random teacher on
a random batch and times both designs per phase through `train.compiled_step` (same shardings, same
donation), interleaved, medians.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from sprintjax import train
    from sprintjax.configlib import load_config, resolve
    from sprintjax.model import SanaTransformer
    from sprintjax.sharding import batch_sharding, make_mesh, tree_shardings

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "shapes.py"))
    p.add_argument("--scan", action="store_true", help="scan over the blocks (default: unrolled)")
    p.add_argument("--iterations", type=int, default=12, help="timed iterations per candidate (even)")
    args = p.parse_args(argv)
    rc = resolve(load_config(args.config))
    rc = dataclasses.replace(rc, model=rc.model.replace(scan_layers=args.scan))
    m, b, L = rc.model, rc.data.global_batch, rc.data.caption_len
    mesh = make_mesh(rc.mesh, fsdp_group=rc.sharding.fsdp_group)
    rng = np.random.default_rng(0)
    mask = np.ones((b, L), np.float32)
    mask[:, L - L // 4:] = 0
    batch = jax.device_put({
        "latents": jnp.asarray(rng.standard_normal((b, m.in_channels, m.sample_size, m.sample_size)), jnp.float32),
        "caption": jnp.asarray(rng.standard_normal((b, L, m.caption_channels)), jnp.float32),
        "caption_mask": jnp.asarray(mask)}, batch_sharding(mesh))
    null = jnp.asarray(rng.standard_normal((L, m.caption_channels)) * 0.1, jnp.float32)
    model = SanaTransformer(m)
    t_sh = tree_shardings(model.param_shapes(), mesh, rc.sharding.teacher_rules, rc.sharding.min_fsdp_size)
    teacher = jax.jit(model.init, out_shardings=t_sh)(jax.random.key(0))
    plan = train.plan(rc, mesh, teacher, null, t_sh)
    rep = NamedSharding(mesh, PartitionSpec())
    init = jax.jit(plan.init, out_shardings=plan.state_sh)
    runner = plan.runner
    g_fn, d_fn = runner.phase_step(0), runner.phase_step(1)
    keys = sorted(set(jax.eval_shape(g_fn, plan.abstract, batch, jax.random.key(0))[1])
                  | set(jax.eval_shape(d_fn, plan.abstract, batch, jax.random.key(0))[1]))

    def cond_step(state, batch, rng):  # the previous design: both phases in one program
        def branch(fn):
            def run(s):
                s, metrics = fn(s, batch, rng)
                return s, {k: jnp.asarray(metrics.get(k, 0), jnp.float32) for k in keys}
            return run
        return jax.lax.cond(state.phase == 0, branch(g_fn), branch(d_fn), state)

    fns = {"train": cond_step, "generator": g_fn, "discriminator": d_fn}
    programs = {name: train.compiled_step(fn, 0, plan.state_sh, batch_sharding(mesh), rep) for name, fn in fns.items()}
    times = {"train: generator": [], "train: discriminator": [], "generator alone": [], "discriminator alone": []}

    def call(name, it):
        key = "train" if name == "train" else "phases"
        t0 = time.perf_counter()
        states[key], metrics = programs[name](states[key], batch, np.int32(it))
        jax.block_until_ready(metrics)
        return time.perf_counter() - t0

    states = {"train": init(teacher, null, jax.random.key(2)), "phases": init(teacher, null, jax.random.key(2))}
    call("generator", 0)  # the two phase programs share one state, as in the trainer
    call("discriminator", 1)
    call("train", 0)
    call("train", 1)  # compiled; the phase is back to G
    for it in range(args.iterations):
        phase = int(states["train"].phase)
        times["train: " + ("generator" if phase == 0 else "discriminator")].append(call("train", it))
        own = "generator" if it % 2 == 0 else "discriminator"
        times[f"{own} alone"].append(call(own, it))
    med = {k: float(np.median(v)) for k, v in times.items()}
    print(f"\n{args.config}: hidden {m.hidden_size}, {m.num_layers} layers ({'scanned' if args.scan else 'unrolled'}), "
          f"batch {b}; CPU x {os.cpu_count()} cores, JAX {jax.__version__}, medians of {args.iterations // 2} "
          "interleaved runs per phase\n")
    print("| phase | one program, lax.cond of both (s) | one program per phase (s) | ratio |")
    print("|---|---|---|---|")
    for phase in ("generator", "discriminator"):
        a, s = med[f"train: {phase}"], med[f"{phase} alone"]
        print(f"| {phase} | {a:.3f} | {s:.3f} | {a / s:.2f}x |")
    per_iter = (med["train: generator"] + med["train: discriminator"]) / 2
    alone = (med["generator alone"] + med["discriminator alone"]) / 2
    print(f"\nper iteration: {per_iter:.3f} s with lax.cond, {alone:.3f} s with one program per phase")


if __name__ == "__main__":
    main()
