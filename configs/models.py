"""Model presets as configs: `sprintjax info configs/models.py:sana_sprint_600m`.

arg: a preset name (sana_sprint_600m, sana_sprint_1600m, sana_600m_teacher, sana_1600m_teacher),
optionally followed by `,dtype=bfloat16` / `,remat=dots` style overrides of the compute settings.
"""

import dataclasses

import ml_collections

from sprintjax.model_config import preset


def get_config(arg=None):
    name, *overrides = (arg or "sana_sprint_600m").split(",")
    kw = dict(o.split("=", 1) for o in overrides)
    return ml_collections.ConfigDict(dataclasses.asdict(preset(name, **kw)))
