"""SANA-Sprint 1.6B at 1024px: the official recipe (facts §6), as the 0.6B config with the 1.6B trunk."""

import math

from sprintjax.configlib import run_config
from sprintjax.model_config import preset

GLOBAL_BATCH = 512


def get_config(arg=None):
    lr = 2e-6 * math.sqrt(GLOBAL_BATCH / 256)
    return run_config(
        preset("sana_1600m_teacher", dtype="bfloat16", remat="dots"),
        distill=dict(lr_g=lr, lr_d=lr),
        data=dict(global_batch=GLOBAL_BATCH, worker_count=8, prefetch=4),
        train=dict(num_steps=40_000, log_every=50, ckpt_every=1000, keep=3, keep_every=5000, sample_every=1000),
        mesh={"data": 1, "fsdp": -1},
    )
