"""sprintjax: SANA-Sprint (one-step text-to-image by sCM + LADD distillation) in JAX/Flax.

`import sprintjax` never imports torch: the PyTorch side (parity, export) lives behind explicit imports.
"""

from sprintjax.model import SanaTransformer, count_params
from sprintjax.model_config import PRESETS, ModelConfig, preset

__all__ = ["PRESETS", "ModelConfig", "SanaTransformer", "count_params", "preset"]
__version__ = "0.1.0"
