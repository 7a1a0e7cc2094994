"""The generator step against the PyTorch reference over a grid of sizes, in one run (not in CI).

    python benchmarks/vs_pytorch_grid.py [--repeats 3] [--only 96x4x8x64,miniature]

One benchmark size can flatter either side, so this sweeps hidden 96-512, 4-8 layers, batch 4-8 and caption
channels 64-2304 (each value at both ends of the other axes, six cells on 16x16 latents with 32 channels and
32-token captions), plus the miniature's own model and batch (configs/shapes.py: hidden 96, 4 layers, 8x8x8
latents, batch 64, captions 16x384). Per cell it builds `vs_pytorch.py`'s two steps on the same weights and
draws, checks that sprintjax's unrolled and scanned steps (scanned with remat dots, as the pod recipes run)
both match PyTorch's losses and gradient norm, then times the three steps as medians of interleaved runs, each
after a settling run of its own. The table comes out slowest ratio first.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from types import SimpleNamespace

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from vs_pytorch import build, median_interleaved, to_torch  # noqa: E402  (run from benchmarks/)

GRID = {  # name: (hidden, layers, batch, caption channels) on 16x16x32 latents, 32-token captions
    f"{h}x{n}x{b}x{c}": dict(hidden=h, layers=n, batch=b, caption_channels=c)
    for h, n, b, c in ((96, 4, 8, 64), (96, 8, 4, 2304), (256, 4, 4, 2304), (256, 8, 8, 64), (512, 4, 8, 64),
                       (512, 8, 4, 2304))
}
GRID["miniature"] = dict(hidden=96, layers=4, batch=64, caption_channels=384, latent=8, latent_channels=8,
                         caption_len=16)
PARITY_RTOL = 1e-4  # losses and gradient norm, relative (float32 sums in two orders)


def measure(name: str, size: dict, repeats: int) -> dict:
    """Parity, then the medians of the PyTorch, unrolled and scanned generator steps for one cell."""
    import jax

    from sprintjax.distill import Distiller

    args = SimpleNamespace(**{**dict(latent=16, latent_channels=32, caption_len=32), **size}, repeats=repeats,
                           scan=False)
    cfg, d, state, batch, step_t = build(args)
    d_scan = Distiller(cfg.replace(scan_layers=True, remat="dots"), d.cfg)
    rng = jax.random.key(7)
    rv = d.generator_draws(rng, batch["latents"].shape)
    batch_t, rv_t = to_torch(batch), to_torch(rv)
    steps = {"unrolled": jax.jit(d.generator_step), "scanned": jax.jit(d_scan.generator_step)}
    step_no = int(state.step)
    m_t = step_t.step(batch_t, rv_t, step_no)
    worst = 0.0
    for step in steps.values():
        _, m = jax.block_until_ready(step(state, batch, rng))
        for k in ("scm_loss", "adv_loss", "g_loss", "g_grad_norm"):
            a, b = float(m[k]), float(m_t[k])
            worst = max(worst, abs(a - b) / max(abs(a), 1e-12))
    if not worst <= PARITY_RTOL:
        raise SystemExit(f"{name}: sprintjax and PyTorch disagree (rel. diff {worst:.1e} > {PARITY_RTOL}); not timed")
    fns = {"pytorch": lambda: step_t.step(batch_t, rv_t, step_no),
           **{form: (lambda s=step: jax.block_until_ready(s(state, batch, rng))) for form, step in steps.items()}}
    return dict(name=name, parity=worst, **median_interleaved(fns, repeats))


def main(argv=None) -> None:
    import jax
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", help="comma-separated cell names (default: all): " + ", ".join(GRID))
    args = p.parse_args(argv)
    names = args.only.split(",") if args.only else list(GRID)
    unknown = sorted(set(names) - set(GRID))
    if unknown:
        raise SystemExit(f"unknown cells {unknown}; the grid has {list(GRID)}")
    rows = []
    for name in names:
        t0 = time.perf_counter()
        rows.append(measure(name, GRID[name], args.repeats))
        gc.collect()  # the cell's models and compiled programs go before the next cell's
        jax.clear_caches()
        r = rows[-1]
        print(f"{name}: PyTorch {r['pytorch']:.3f} s, unrolled {r['unrolled']:.3f} s, scanned {r['scanned']:.3f} s "
              f"(parity {r['parity']:.1e}; {time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"\nCPU x {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads; median "
          f"of {args.repeats} interleaved runs, each after a settling run; cells named hidden x layers x batch x "
          "caption channels (16x16x32 latents, 32-token captions); scanned = lax.scan with remat dots\n")
    print("| cell | PyTorch (s) | sprintjax scanned (s) | PyTorch / scanned | sprintjax unrolled (s) | "
          "PyTorch / unrolled |\n|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: r["pytorch"] / max(r["scanned"], r["unrolled"])):
        print(f"| {r['name']} | {r['pytorch']:.3f} | {r['scanned']:.3f} | {r['pytorch'] / r['scanned']:.2f}x | "
              f"{r['unrolled']:.3f} | {r['pytorch'] / r['unrolled']:.2f}x |")


if __name__ == "__main__":
    main()
