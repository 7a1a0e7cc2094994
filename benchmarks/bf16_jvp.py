"""How far a bfloat16 sCM JVP is from the float32 one, per TrigFlow time bin, on the miniature (not in CI).

    python benchmarks/bf16_jvp.py [--student runs/demo/student] [--bins 8 --per-bin 8]

The sCM tangent dF = (d/dt F) v_t + (grad_x F) v_x is computed twice on the same validation batch, noise,
guidance scales and teacher tangent (`diagnostics.bin_stats(compare_bf16=True)`): once with the student's
matmuls in float32 and once in bfloat16 (`distill.jvp_dtype`; norms, attention and softmax stay float32). It
prints, per bin of t over (0, pi/2), the relative error ||dF_bf16 - dF_f32|| / ||dF_f32|| beside the raw
tangent norm ||g||, for the shipped teacher as its own student (the start of distillation) and, with
`--student`, for a distilled student (a params checkpoint, e.g. `make demo`'s runs/demo/student).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    import jax
    import numpy as np

    from sprintjax import diagnostics, scm
    from sprintjax.configlib import load_config, resolve
    from sprintjax.convert import load_model
    from sprintjax.data import pipeline
    from sprintjax.model import SanaTransformer

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--student", help="a distilled student's params checkpoint (default: only the teacher)")
    p.add_argument("--data", default="runs/shapes_ae_data")
    p.add_argument("--bins", type=int, default=8)
    p.add_argument("--per-bin", type=int, default=8)
    args = p.parse_args(argv)
    rc = resolve(load_config(str(REPO / "configs" / "shapes.py")))
    teacher_params, tcfg = load_model(rc.train.teacher_checkpoint)
    teacher = SanaTransformer(tcfg)
    scfg, init = scm.init_student(tcfg, teacher_params, jax.random.key(0))
    students = {"teacher as student (start of distillation)": init["net"]}
    if args.student:
        students[f"distilled: {args.student}"] = load_model(args.student)[0]
    n = args.bins * args.per_bin
    batch = pipeline.first_records(args.data, "validation", n, ("latents", "caption", "caption_mask"))
    null = pipeline.load_null_caption(args.data)[0].astype(np.float32)
    edges = np.asarray(diagnostics.bin_edges(args.bins))

    @jax.jit
    def stats(net):
        return diagnostics.bin_stats(SanaTransformer(scfg), {"net": net, "logvar": init["logvar"]}, teacher,
                                     teacher_params, null, batch, jax.random.key(1), rc.distill, args.bins,
                                     compare_bf16=True)

    print(f"\n{n} validation samples, {args.per_bin} per bin; float32 vs bfloat16 matmuls in the student's JVP\n")
    for name, net in students.items():
        out = jax.device_get(stats(net))
        print(f"{name}\n\n| t bin | ||g|| (float32) | bf16 relative error of dF |\n|---|---|---|")
        for i in range(args.bins):
            print(f"| {edges[i]:.2f}-{edges[i + 1]:.2f} | {out['g_norm'][i]:.3g} | {out['bf16_rel_err'][i]:.2e} |")
        print()


if __name__ == "__main__":
    main()
