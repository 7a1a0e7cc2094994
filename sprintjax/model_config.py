"""The SANA Linear DiT configuration: diffusers' `SanaTransformer2DModel` fields plus how we compute.

The diffusers fields keep diffusers' names and defaults so that a `config.json` converts both ways without a
dictionary of renames. The sprintjax fields (`dtype`, `remat`, `zero3_blocks`, `scan_layers`) say how the same
function is computed; they never change what it computes in float32 and are not written to a diffusers config.
The one architecture extension, the token sampler (`token_down`, `token_up`: `sprintjax.tokens`), is not a
diffusers architecture: a config that uses it has no diffusers form and is exported to mobile formats only.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from sprintjax.errors import ConfigError

# Keys diffusers writes into config.json that carry no model semantics.
_DIFFUSERS_META = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}
QK_NORMS = (None, "rms_norm_across_heads")
DTYPES = ("float32", "bfloat16", "float64")
REMAT_POLICIES = ("none", "full", "dots")
ZERO3_BLOCKS = ("auto", "on", "off")
COMPUTE_FIELDS = ("dtype", "remat", "zero3_blocks", "scan_layers")  # sprintjax-only fields: how, not what, is computed
TOKEN_FIELDS = ("token_down", "token_up")  # sprintjax-only architecture: the token sampler (sprintjax.tokens)
TRANSFORMER_CLASS = "SanaTransformer2DModel"
CONTROLNET_CLASS = "SanaControlNetModel"  # diffusers' ControlNet: no guidance embedder, QK-norm or timestep scale
SPRINT_CONTROLNET_CLASS = "SanaSprintControlNetModel"  # one that has them (sprintjax.convert.torch_controlnet)
_NOT_IN_CONTROLNET = {"guidance_embeds": False, "guidance_embeds_scale": 0.1, "qk_norm": None, "timestep_scale": 1.0}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Every field of diffusers' SanaTransformer2DModel config (facts §7), plus compute settings."""

    in_channels: int = 32
    out_channels: int | None = 32
    num_attention_heads: int = 70
    attention_head_dim: int = 32
    num_layers: int = 20
    num_cross_attention_heads: int | None = 20
    cross_attention_head_dim: int | None = 112
    cross_attention_dim: int | None = 2240
    caption_channels: int = 2304
    mlp_ratio: float = 2.5
    dropout: float = 0.0
    attention_bias: bool = False
    sample_size: int = 32
    patch_size: int = 1
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-6
    interpolation_scale: int | None = None
    guidance_embeds: bool = False
    guidance_embeds_scale: float = 0.1
    qk_norm: str | None = None
    timestep_scale: float = 1.0
    # --- sprintjax compute settings (not part of the diffusers config) ---
    dtype: str = "float32"  # compute dtype of matmuls/convs; attention, norms and softmax stay >= float32
    remat: str = "none"  # rematerialisation of each transformer block: none | full | dots
    # rematerialised blocks under an FSDP mesh run as ZeRO-3 (sharding.fsdp_block): auto (the measured best:
    # today always), on (always; without remat never), off (the SPMD partitioner's gathers); BENCHMARKS.md §3
    # items 9 and 13
    zero3_blocks: str = "auto"
    scan_layers: bool = True  # lax.scan over the blocks (compile time flat in depth) or an unrolled loop
    # --- sprintjax architecture extension: blocks token_down..token_up-1 run on a half-size token grid (a token
    # down-sampler before them, an up-sampler after; sprintjax.tokens); token_up = 0: none (diffusers' model) ---
    token_down: int = 0
    token_up: int = 0

    def __post_init__(self):
        problems = []
        if self.hidden_size % max(self.num_attention_heads, 1):
            problems.append("num_attention_heads must divide the hidden size")
        if self.cross_attention_dim != self.hidden_size:
            problems.append(
                f"cross_attention_dim ({self.cross_attention_dim}) must equal num_attention_heads * "
                f"attention_head_dim ({self.hidden_size}): SANA projects captions to the hidden size"
            )
        if not self.num_cross_attention_heads or not self.cross_attention_head_dim:
            problems.append("num_cross_attention_heads and cross_attention_head_dim are required")
        if self.qk_norm not in QK_NORMS:
            problems.append(f"qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")
        if self.interpolation_scale is not None:
            problems.append("interpolation_scale (sin-cos positional embedding) is not supported; SANA uses None")
        if self.patch_size < 1:
            problems.append("patch_size must be >= 1")
        if self.dtype not in DTYPES:
            problems.append(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.remat not in REMAT_POLICIES:
            problems.append(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.zero3_blocks not in ZERO3_BLOCKS:
            problems.append(f"zero3_blocks must be one of {ZERO3_BLOCKS}, got {self.zero3_blocks!r}")
        if self.token_up and not 0 <= self.token_down < self.token_up <= self.num_layers:
            problems.append(f"the token sampler needs 0 <= token_down < token_up <= num_layers ({self.num_layers}), "
                            f"got token_down={self.token_down}, token_up={self.token_up}")
        elif not self.token_up and self.token_down:
            problems.append("token_down without token_up: set token_up (0 disables the token sampler)")
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def cross_inner_dim(self) -> int:
        return self.num_cross_attention_heads * self.cross_attention_head_dim

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_ratio * self.hidden_size)  # GLUMBConv: int(expand_ratio * in_channels)

    @property
    def token_sampler(self) -> bool:
        return self.token_up > 0

    @property
    def out_ch(self) -> int:
        return self.out_channels or self.in_channels

    def compute_settings(self) -> dict[str, Any]:
        """How the function is computed (never what it computes): carried from a run config to a loaded model."""
        return {k: getattr(self, k) for k in COMPUTE_FIELDS}

    def replace(self, **kw) -> ModelConfig:
        unknown = sorted(set(kw) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"unknown model config keys: {unknown}")
        return dataclasses.replace(self, **kw)

    # ---- diffusers config.json <-> ModelConfig ----
    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any], controlnet: bool = False, **compute) -> ModelConfig:
        """Reads a diffusers config dict (a transformer's, or a ControlNet's with `controlnet`); unknown keys
        are an error, not silently dropped."""
        classes = (CONTROLNET_CLASS, SPRINT_CONTROLNET_CLASS) if controlnet else (TRANSFORMER_CLASS,)
        cls_name = cfg.get("_class_name", classes[0])
        if cls_name not in classes:
            raise ConfigError(f"expected a {' or '.join(classes)} config, found _class_name={cls_name!r}")
        known = {f.name for f in dataclasses.fields(cls)} - set(COMPUTE_FIELDS) - set(TOKEN_FIELDS)
        if cls_name == CONTROLNET_CLASS:
            known -= set(_NOT_IN_CONTROLNET)
        fields = {k: v for k, v in cfg.items() if k not in _DIFFUSERS_META}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ConfigError(f"unknown {cls_name} config keys: {unknown}")
        return cls(**fields, **compute)

    def to_diffusers(self, controlnet: bool = False) -> dict[str, Any]:
        """diffusers' config dict; a ControlNet's names diffusers' class unless it needs options that class
        lacks (a guidance embedder, QK-norm: a Sprint student's), then sprintjax's PyTorch subclass. A
        token-sampled model has none (ConfigError)."""
        if self.token_sampler:
            raise ConfigError(f"this model has a token sampler (blocks {self.token_down}..{self.token_up - 1} on a "
                              "half-size token grid), which diffusers' SanaTransformer2DModel does not have: it is "
                              "exported to mobile formats only (export-mobile)")
        d = dataclasses.asdict(self)
        for k in COMPUTE_FIELDS + TOKEN_FIELDS:
            d.pop(k)
        name = TRANSFORMER_CLASS
        if controlnet:
            name = CONTROLNET_CLASS
            if any(d[k] != v for k, v in _NOT_IN_CONTROLNET.items()):
                name = SPRINT_CONTROLNET_CLASS
            else:
                d = {k: v for k, v in d.items() if k not in _NOT_IN_CONTROLNET}
        return {"_class_name": name, "_diffusers_version": "0.42.1", **d}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        d = json.loads(text)
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown model config keys: {unknown}")
        return cls(**d)


def _sprint(d: int, layers: int, cross_heads: int, cross_dim: int, guidance: bool) -> ModelConfig:
    return ModelConfig(
        num_attention_heads=d // 32,
        attention_head_dim=32,
        num_layers=layers,
        num_cross_attention_heads=cross_heads,
        cross_attention_head_dim=cross_dim,
        cross_attention_dim=d,
        caption_channels=2304,
        sample_size=32,
        guidance_embeds=guidance,
        qk_norm="rms_norm_across_heads",
    )


# Sana-Sprint students (facts §7) and their TrigFlow teachers: the same trunk (dense time embedding and
# QK-norm after the paper's §3.2 adaptation) without the guidance embedder.
PRESETS: dict[str, ModelConfig] = {
    "sana_sprint_600m": _sprint(1152, 28, 16, 72, guidance=True),
    "sana_sprint_1600m": _sprint(2240, 20, 20, 112, guidance=True),
    "sana_600m_teacher": _sprint(1152, 28, 16, 72, guidance=False),
    "sana_1600m_teacher": _sprint(2240, 20, 20, 112, guidance=False),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
