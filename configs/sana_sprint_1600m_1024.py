"""SANA-Sprint 1.6B at 1024px: the official recipe (facts §6) around the 1.6B teacher trunk.
arg: the global batch (default 512)."""

from sprintjax.configlib import official_recipe


def get_config(arg=None):
    return official_recipe("sana_1600m_teacher", global_batch=int(arg or 512))
