"""SANA-Sprint 1.6B at 1024px: the official recipe (facts §6) around the 1.6B teacher trunk.
arg: the global batch (default 512). On 32 v6e chips (32 GiB HBM) the generator step needs `remat=full`
(`sprintjax compile` measured 90 GiB of temporaries with `dots`, 22.4 GiB with `full`; BENCHMARKS.md §3):
    sprintjax train --config configs/sana_sprint_1600m_1024.py --config.model.remat=full ...
On 64 chips add `--config.mesh.data=2` (FSDP over 32, 2 replicas) and ZeRO-3 blocks: `remat=full` on v6e:8x8
(generator collectives 1.09x instead of 1.7x the FSDP minimum), `--config.model.zero3_blocks=on` on v5p:4x4x4
(1.10x at 268 instead of 333 TFLOP a chip; BENCHMARKS.md §3 item 9).
"""

from sprintjax.configlib import official_recipe


def get_config(arg=None):
    return official_recipe("sana_1600m_teacher", global_batch=int(arg or 512))
