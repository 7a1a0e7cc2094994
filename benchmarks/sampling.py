"""Sampling speed: the 1-step student against the 20-step CFG teacher at the same config (paper Table 2's
columns), on this machine's CPU, in one run (not in CI).

    python benchmarks/sampling.py [--preset sana_sprint_600m --latent 16 --caption-len 300 --steps 1,2,4]

Both samplers are the ones `sprintjax eval` uses (`evaluate.teacher_sampler`: Flow-Euler with classifier-free
guidance, both branches in one batched call; `evaluate.student_sampler`: the TrigFlow consistency sampler with
the guidance embedding), on random weights of the chosen architecture. Batch 1 gives the latency of one image,
batch 10 the throughput, as medians of interleaved runs. Every figure is also given as a ratio to the teacher
measured in the same run. The paper's headline is transformer latency (no VAE or text encoder); so is this.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(argv=None) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sprintjax.bench import evaluate
    from sprintjax.model import SanaTransformer, count_params
    from sprintjax.model_config import preset

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="sana_sprint_600m", help="a model preset (sprintjax info lists them)")
    p.add_argument("--latent", type=int, default=16, help="latent side (32 = 1024px with the 32x DC-AE)")
    p.add_argument("--caption-len", type=int, default=300)
    p.add_argument("--teacher-steps", type=int, default=20)
    p.add_argument("--steps", default="1,2,4", help="student step counts")
    p.add_argument("--batches", default="1,10")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    student_cfg = preset(args.preset, scan_layers=False).replace(guidance_embeds=True)
    teacher_cfg = student_cfg.replace(guidance_embeds=False)
    student, teacher = SanaTransformer(student_cfg), SanaTransformer(teacher_cfg)
    s_params = student.init(jax.random.key(0))
    t_params = teacher.init(jax.random.key(0))
    c = student_cfg
    rng = np.random.default_rng(0)
    null = jnp.asarray(rng.standard_normal((args.caption_len, c.caption_channels)), jnp.float32)
    samplers = {f"teacher {args.teacher_steps}-step CFG": (*evaluate.teacher_sampler(teacher, t_params, null,
                                                                                       args.teacher_steps), 1)}
    for k in map(int, args.steps.split(",")):
        samplers[f"student {k}-step"] = (*evaluate.student_sampler(student, s_params, k), k)
    batches = [int(b) for b in args.batches.split(",")]
    calls = {}
    for b in batches:
        caption = jnp.asarray(rng.standard_normal((b, args.caption_len, c.caption_channels)), jnp.float32)
        mask = jnp.ones((b, args.caption_len), jnp.float32)
        for name, (run, _, k) in samplers.items():  # noise [k, B, C, H, W]: k = 1 for the teacher's start
            noise = jnp.asarray(rng.standard_normal((k, b, c.in_channels, args.latent, args.latent)), jnp.float32)
            calls[name, b] = (run, (noise, caption, mask))
            print(f"compiling {name} at batch {b} ...", flush=True)
            jax.block_until_ready(run(noise, caption, mask))
    times = {key: [] for key in calls}
    for _ in range(args.repeats):
        for key, (run, inputs) in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(run(*inputs))
            times[key].append(time.perf_counter() - t0)
    med = {key: float(np.median(v)) for key, v in times.items()}
    teacher_name = next(iter(samplers))
    print(f"\n{args.preset} ({count_params(s_params) / 1e6:.0f}M params), {args.latent}x{args.latent} latent, "
          f"caption {args.caption_len} tokens, random weights; CPU x {os.cpu_count()} cores; median of "
          f"{args.repeats} interleaved runs\n")
    head = " | ".join(f"batch {b} latency (s) | x faster" if b == 1 else f"batch {b} images/s | x" for b in batches)
    print(f"| sampler | NFE | {head} |")
    print("|---|---|" + "---|---|" * len(batches))
    for name, (_, nfe, _) in samplers.items():
        cells = []
        for b in batches:
            if b == 1:
                cells.append(f"{med[name, b]:.3f} | {med[teacher_name, b] / med[name, b]:.1f}x")
            else:
                cells.append(f"{b / med[name, b]:.2f} | {med[teacher_name, b] / med[name, b]:.1f}x")
        print(f"| {name} | {nfe} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
