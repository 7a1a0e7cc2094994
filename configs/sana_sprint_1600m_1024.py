"""SANA-Sprint 1.6B at 1024px: the official recipe (facts §6) around the 1.6B teacher trunk.
arg: the global batch (default 512). On 32 v6e chips (32 GiB HBM) the generator step needs `remat=full`
(`sprintjax compile` measured 90 GiB of temporaries with `dots`, 22.4 GiB with `full`; BENCHMARKS.md §3):
    sprintjax train --config configs/sana_sprint_1600m_1024.py --config.model.remat=full ...
The mesh picks itself (`sharding.fsdp_group`): FSDP over up to 32 chips, data-parallel replicas above, and
the blocks run as ZeRO-3 (`model.zero3_blocks=auto`); on v5p:4x4x4 that is the measured best (generator
collectives 1.10x the FSDP minimum at 268 TFLOP a chip; BENCHMARKS.md §3 item 9). On v6e:8x8 also pass
`--config.model.remat=full` (1.09x; `dots` leaves no room in 32 GiB).
"""

from sprintjax.configlib import official_recipe


def get_config(arg=None):
    return official_recipe("sana_1600m_teacher", global_batch=int(arg or 512))
