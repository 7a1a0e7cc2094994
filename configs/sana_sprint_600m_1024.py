"""SANA-Sprint 0.6B at 1024px (32x32 latents, 300 caption tokens): the official recipe (facts §6).

arg: the global batch (default 512). CAME, lr 2e-6 x sqrt(global_batch / 256), 5000-step G warmup,
~20k G+D pairs, bf16 compute with float32 master weights (attention, norms and the sCM loss in float32),
FSDP over all devices. On 32 v6e chips (32 GiB HBM) the generator step needs `--config.model.remat=full`
(`sprintjax compile`: 44.5 GiB of temporaries with `dots`; BENCHMARKS.md §3). On 64 chips add
`--config.mesh.data=2 --config.model.zero3_blocks=on` (FSDP over 32, 2 replicas, ZeRO-3 blocks: generator
collectives 1.07x instead of 2.1x the FSDP minimum, BENCHMARKS.md §3 item 9).
    sprintjax train --config configs/sana_sprint_600m_1024.py --workdir /shared/runs/sprint600 --distributed \\
        --config.train.teacher_checkpoint=/shared/teacher --config.data.dir=/shared/records
"""

from sprintjax.configlib import official_recipe


def get_config(arg=None):
    return official_recipe("sana_600m_teacher", global_batch=int(arg or 512))
