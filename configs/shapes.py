"""The embedded benchmark: the shapes dataset (32x32 images as 8x8x8 latents of the shipped learned autoencoder,
MiniLM caption embeddings), a small SANA teacher trained by this project, and its distillation into a one-step
student.

    sprintjax prepare-data --shapes --vae builtin-ae --text-encoder minilm --max-length 16 --out runs/shapes_ae_data
    sprintjax train-teacher --config configs/shapes.py:teacher --workdir runs/shapes_ae_teacher
    sprintjax train --config configs/shapes.py --workdir runs/demo/train      (what `make demo` runs)
Variants: (default) distillation, `teacher` (flow-matching pretraining with the dense time embedding and
QK-norm of the paper's §3.2), `scm` / `ladd` (Table 3 ablations at the same budget), `controlnet` (a
ControlNet on the shipped teacher, trained by flow matching on Canny edge maps, paper §3.4):

    sprintjax prepare-data --shapes --vae builtin-ae --text-encoder minilm --max-length 16 --control canny \
        --out runs/shapes_control_data
    sprintjax train-teacher --config configs/shapes.py:controlnet --workdir runs/shapes_controlnet
`controlnet_distill` (teacher + the shipped ControlNet teacher distilled into a student + ControlNet by
sCM + LADD, controls on both sides; what benchmarks/controlnet.py trains and measures), and `recover` (a pruned
student, `sprintjax compress`, distilled from the uncompressed one; benchmarks/compress.py's rungs):

    sprintjax compress runs/demo/student runs/small --data runs/shapes_ae_data --num-layers 3 --ffn-channels 120
    sprintjax train --config configs/shapes.py:recover --workdir runs/small_recover \
        --config.train.student_checkpoint=runs/small"""

from pathlib import Path

import sprintjax
from sprintjax.configlib import run_config
from sprintjax.model_config import ModelConfig

TEACHER = ModelConfig(  # 0.74M parameters: a flow-matching step at batch 64 took ~0.8 s on 2 CPU cores, scanned
    in_channels=8, out_channels=8, num_attention_heads=3, attention_head_dim=32, num_layers=4,
    num_cross_attention_heads=3, cross_attention_head_dim=32, cross_attention_dim=96, caption_channels=384,
    sample_size=8, qk_norm="rms_norm_across_heads",
    # unrolled blocks: XLA:CPU runs a scan's model calls one after another and stacks every layer's residuals
    # (generator step 1.48 s scanned, 1.00 s scanned with remat dots, 0.82 s unrolled; BENCHMARKS.md §2)
    scan_layers=False,
)
DATA = dict(dir="runs/shapes_ae_data", caption_len=16, global_batch=64)
CONTROL_DATA = dict(DATA, dir="runs/shapes_control_data")  # the same scenes, with Canny control latents
# The shipped teacher (a diffusers folder): see sprintjax/assets/README.md for the command and seed.
TEACHER_WEIGHTS = str(Path(sprintjax.__file__).parent / "assets" / "shapes_teacher")
# Its ControlNet (a diffusers SanaControlNetModel folder), trained by the `controlnet` variant: assets/README.md.
CONTROLNET_WEIGHTS = str(Path(sprintjax.__file__).parent / "assets" / "shapes_controlnet")


def get_config(arg=None):
    if arg == "teacher":  # resumable (a checkpoint every 500)
        return run_config(TEACHER, data=DATA,
                          train=dict(stage="teacher", num_steps=7000, lr=1e-3, warmup_steps=500, ema_decay=0.999,
                                     log_every=100, ckpt_every=500, keep=2, sample_every=2500, num_samples=16))
    if arg == "controlnet":  # 2 of the teacher's 4 blocks copied (diffusers' default: 7 of 28), resumable
        return run_config(TEACHER, data=CONTROL_DATA, control=dict(num_layers=2),
                          train=dict(stage="controlnet", teacher_checkpoint=TEACHER_WEIGHTS, num_steps=4000, lr=5e-4,
                                     warmup_steps=200, ema_decay=0.999, log_every=100, ckpt_every=250, keep=2,
                                     sample_every=1000, num_samples=16))
    c = run_config(
        TEACHER, data=DATA,
        # lr_d 1e-3 (10x lr_g): with the student frozen, fresh heads reach a real/fake separation of 0.95 pooled
        # std in 150 D steps at 1e-3 but 0.27 at 1e-4 (benchmarks/d_probe.py); in the demo on the first teacher it
        # lowered the student's FD at 1/2/4 steps from 1249/832/733 to 1028/566/376 (README, Results).
        distill=dict(lr_g=1e-4, lr_d=1e-3, warmup_steps_g=50, tangent_warmup_steps=200, disc_layers=(1, 3)),
        # 240 iterations (120 generator + 120 discriminator steps) at batch 64: 1.4-1.7 iterations/s on 2 CPU
        # cores, i.e. 2.5 minutes of the demo's 4 (README, Results).
        train=dict(num_steps=240, teacher_checkpoint=TEACHER_WEIGHTS, log_every=20, ckpt_every=80, keep=2,
                   sample_every=80, num_samples=16),
    )
    if arg == "controlnet_distill":
        c.data.dir = CONTROL_DATA["dir"]
        c.control.num_layers, c.control.teacher_checkpoint = 2, CONTROLNET_WEIGHTS
        # at lr_g 1e-4 the controlled student collapsed to noise between iterations 80 and 240 (generator gradient
        # norm spikes of 650, 1-step FD 1000); at 3e-5 it distils (BENCHMARKS.md §7)
        c.distill.lr_g = 3e-5
        c.train.num_steps = 960  # at 240 iterations the 1-step FD ratio was 1.71, at 960 1.07 (BENCHMARKS.md §7)
    elif arg == "recover":  # the demo's student (make demo) is the uncompressed one
        c = run_config(TEACHER.replace(guidance_embeds=True), data=DATA, distill=dict(c.distill),
                       train=dict(stage="recover", teacher_checkpoint="runs/demo/student", num_steps=600, lr=5e-4,
                                  warmup_steps=50, log_every=50, ckpt_every=200, keep=2, sample_every=200,
                                  num_samples=16))
    elif arg == "scm":
        c.distill.use_ladd = False
    elif arg == "ladd":
        c.distill.use_scm = False
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of shapes.py (teacher, controlnet, controlnet_distill, recover, "
                         "scm, ladd)")
    return c
