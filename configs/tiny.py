"""CPU smoke run: a random-weight tiny teacher distilled on a synthetic dataset written into the workdir.

    sprintjax train --config configs/tiny.py --workdir runs/tiny
Variants: `tiny.py:teacher` (flow-matching teacher stage on the same data), `tiny.py:fsdp` (FSDP x data mesh).
"""

from sprintjax.configlib import run_config
from sprintjax.model_config import ModelConfig

TINY = ModelConfig(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=3,
                   num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32,
                   caption_channels=16, sample_size=8, qk_norm="rms_norm_across_heads")


def get_config(arg=None):
    c = run_config(
        TINY,
        distill=dict(disc_layers=(0, 2), lr_g=1e-4, lr_d=1e-4, warmup_steps_g=20, tangent_warmup_steps=100,
                     disc_virtual_batch=4),
        data=dict(synthetic=256, caption_len=8, global_batch=8),
        train=dict(num_steps=300, log_every=10, ckpt_every=50, keep=3, sample_every=100, num_samples=4),
        sharding=dict(min_fsdp_size=256),
    )
    if arg == "teacher":
        c.train.stage = "teacher"
        c.train.lr = 1e-3
    elif arg == "fsdp":
        c.mesh = {"data": -1, "fsdp": 2}
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of tiny.py (teacher, fsdp)")
    return c
