"""Teacher adaptation before distillation (paper §3.2): fine-tune a flow-matching SANA teacher for 5k
iterations at lr 2e-5 with the dense time embedding (c_noise = t: the model sees t_FM in [0, 1]) and QK-norm
added (RMSNorm across heads on q and k of both attentions, initialised to 1).

arg: 600m (default) or 1600m. Point train.teacher_checkpoint at the flow-matching source checkpoint (imported
with `sprintjax import-diffusers`); a source without QK-norm gets norm weights of 1.
"""

from sprintjax.configlib import run_config
from sprintjax.model_config import preset


def get_config(arg=None):
    size = arg or "600m"
    return run_config(
        preset(f"sana_{size}_teacher", dtype="bfloat16", remat="dots"),
        data=dict(global_batch=512, worker_count=8, prefetch=4),
        train=dict(stage="teacher", num_steps=5000, lr=2e-5, warmup_steps=0, log_every=50, ckpt_every=1000,
                   keep=3, sample_every=1000),
        mesh={"data": 1, "fsdp": -1},
    )
