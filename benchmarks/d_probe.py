"""Can the LADD discriminator learn at all? Fresh heads trained against a *frozen* student (not run in CI).

In a distillation run D chases a moving student, so an idle D can be the game's fault or D's own. This probe
removes the game: the student of a finished run (`make demo`'s by default) and the teacher stay fixed, and only
`Distiller.discriminator_step` runs, exactly as in training, for --steps steps from fresh heads. Every
--eval-every steps it scores fixed held-out validation batches (their own noise and re-noising times) with the
heads as the generator step uses them, and prints per-sample accuracy on real and fake (the mean of a sample's
per-token logits has the right sign) and the separation (mean_real - mean_fake) / pooled std of those per-sample
logits. A D that can tell the student from data climbs in both; one that only moves a shared offset does not.

    python benchmarks/d_probe.py                                     # the demo's distillation config
    python benchmarks/d_probe.py --set lr_d=1e-3 --set d_p_mean=-1.5  # a DistillConfig override per --set
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = Path(__file__).resolve().parents[1]


def _override(text: str):
    key, _, value = text.partition("=")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "shapes.py"))
    ap.add_argument("--student", default="runs/demo/train", help="a distillation run's workdir")
    ap.add_argument("--data", default=None, help="records (default: the config's data.dir)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], help="DistillConfig override key=value")
    ap.add_argument("--out", type=Path, default=None, help="write the curve as JSON here")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from sprintjax import ladd, scm
    from sprintjax.checkpoints import trained_params
    from sprintjax.configlib import load_config, resolve
    from sprintjax.convert import diffusers_to_params
    from sprintjax.data import pipeline
    from sprintjax.distill import Distiller

    rc = resolve(load_config(args.config))
    dcfg = rc.distill.replace(**dict(_override(s) for s in args.set))
    data = args.data or rc.data.dir
    teacher, _ = diffusers_to_params(rc.train.teacher_checkpoint)
    net, _, step = trained_params(args.student, "student")
    null_caption, _ = pipeline.load_null_caption(data)
    runner = Distiller(rc.model, dcfg)
    state = runner.init(teacher, null_caption, jax.random.key(args.seed))
    state = state.replace(student=dict(state.student, net=jax.tree.map(jnp.asarray, net)))
    d_step = jax.jit(runner.discriminator_step, donate_argnums=0)

    gb = rc.data.global_batch
    held = pipeline.train_iterator(data, "validation", gb, args.seed + 1)
    held = [next(held) for _ in range(args.eval_batches)]

    @jax.jit
    def score(state, batch, rng):
        """Per-sample mean logits (real, fake) on one held-out batch, heads as in the generator step."""
        sd = dcfg.sigma_d
        x0 = batch["latents"] * sd
        y, mask = batch["caption"], batch["caption_mask"]
        k_w, k_t, k_z, k_tf, k_zf, k_tr, k_zr = jax.random.split(rng, 7)
        w = runner._guidance(k_w, gb)
        t_g = runner._student_time(k_t, gb)
        fake = scm.denoise(runner.student, state.student, runner._noise(k_z, x0, t_g), t_g, y, mask, w, sd)
        out = []
        for x, kt, kz in ((x0, k_tr, k_zr), (fake, k_tf, k_zf)):
            t_d = runner._d_time(kt, gb)
            f = ladd.teacher_features(runner.teacher, state.teacher, runner._noise(kz, x, t_d) / sd, t_d, y, mask,
                                      runner.blocks)
            logits, _ = ladd.heads_logits(state.heads, state.heads_state, f, runner.blocks,
                                          virtual_batch=dcfg.disc_virtual_batch)
            out.append(jnp.mean(logits, axis=1))
        return out

    def evaluate(state) -> dict:
        real, fake = [], []
        for i, b in enumerate(held):
            r, f = score(state, b, jax.random.key(10_000 + i))
            real.append(np.asarray(r))
            fake.append(np.asarray(f))
        real, fake = np.concatenate(real), np.concatenate(fake)
        pooled = np.sqrt(0.5 * (real.var() + fake.var())) + 1e-12
        return {"acc_real": float((real > 0).mean()), "acc_fake": float((fake < 0).mean()),
                "sep": float((real.mean() - fake.mean()) / pooled), "mean_real": float(real.mean()),
                "mean_fake": float(fake.mean())}

    print(f"student {args.student} (step {step}); overrides {dict(_override(s) for s in args.set)}")
    train_it = pipeline.train_iterator(data, rc.data.split, gb, args.seed)
    curve, t0 = [], time.time()
    for i in range(args.steps + 1):
        if i % args.eval_every == 0:
            row = {"step": i, **evaluate(state)}
            curve.append(row)
            print(f"step {i:4d}  acc_real {row['acc_real']:.3f}  acc_fake {row['acc_fake']:.3f}  "
                  f"sep {row['sep']:+.3f}  mean_real {row['mean_real']:+.3f}  mean_fake {row['mean_fake']:+.3f}"
                  f"  [{time.time() - t0:.0f} s]", flush=True)
        if i < args.steps:
            state, _ = d_step(state, next(train_it), jax.random.fold_in(jax.random.key(args.seed), i))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"overrides": args.set, "student": args.student, "curve": curve}, indent=1))


if __name__ == "__main__":
    main()
