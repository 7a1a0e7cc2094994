"""sprintjax: SANA-Sprint (one-step text-to-image by sCM + LADD distillation) in JAX/Flax.

`import sprintjax` never imports torch: the PyTorch side (parity, export) lives behind explicit imports.
"""

from sprintjax.platform import default_platform

default_platform()  # the CPU where no accelerator is present: no libtpu probe (sprintjax/platform.py)

from sprintjax.model import SanaTransformer, count_params  # noqa: E402
from sprintjax.model_config import PRESETS, ModelConfig, preset  # noqa: E402

__all__ = ["PRESETS", "ModelConfig", "SanaTransformer", "count_params", "preset"]
__version__ = "0.1.0"
