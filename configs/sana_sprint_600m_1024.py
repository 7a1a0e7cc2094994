"""SANA-Sprint 0.6B at 1024px (32x32 latents, 300 caption tokens): the official recipe (facts §6).

arg: the global batch (default 512). CAME, lr 2e-6 x sqrt(global_batch / 256), 5000-step G warmup,
~20k G+D pairs, bf16 compute with float32 master weights (attention, norms, the sCM JVP and loss in float32:
`distill.jvp_dtype`, see configlib.official_recipe), FSDP over up to 32 devices with data-parallel replicas
above (the mesh picks itself from the device count, `sharding.fsdp_group`; an explicit `--config.mesh.data=N`
still wins). On 32 v6e chips (32 GiB HBM) the generator step needs `--config.model.remat=full`
(`sprintjax compile`: 44.5 GiB of temporaries with `dots`; BENCHMARKS.md §3). The blocks run as ZeRO-3
(`model.zero3_blocks=auto`). On 64 chips the mesh is 2 x 32: generator collectives 1.06x the FSDP minimum (2.1x
with FSDP over all 64), MFU bound 0.34 (BENCHMARKS.md §3 items 9-13).
    sprintjax train --config configs/sana_sprint_600m_1024.py --workdir /shared/runs/sprint600 --distributed \\
        --config.train.teacher_checkpoint=/shared/teacher --config.data.dir=/shared/records
"""

from sprintjax.configlib import official_recipe


def get_config(arg=None):
    return official_recipe("sana_600m_teacher", global_batch=int(arg or 512))
