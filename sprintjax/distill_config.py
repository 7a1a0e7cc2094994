"""Distillation hyper-parameters. Every default is the official SANA-Sprint recipe (facts §1-6); every
deviation is a named field, so an ablation is one override (e.g. `use_ladd=False` for sCM only, Table 3).
"""

from __future__ import annotations

import dataclasses

from sprintjax.errors import ConfigError

OPTIMIZERS = ("came", "adamw")
SCM_FORMS = ("fused", "two_pass")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    # TrigFlow (facts §1)
    sigma_d: float = 0.5
    p_mean: float = 0.2  # generator / sCM time proposal
    p_std: float = 1.6
    d_p_mean: float = -0.6  # discriminator re-noising times
    d_p_std: float = 1.0
    # Teacher guidance (facts §3): scale drawn per sample from this list
    cfg_scales: tuple[float, ...] = (4.0, 4.5, 5.0)
    # sCM (facts §4)
    use_scm: bool = True
    scm_form: str = "fused"  # fused: one jax.jvp gives F_theta (with grad) and the tangent; two_pass: reference
    jvp_dtype: str = "float32"  # the JVP (and the loss) run in float32 even when the model computes in bfloat16
    tangent_warmup_steps: int = 4000  # r = min(1, step / warmup); step counts G and D iterations
    tangent_norm: bool = True  # g <- g / (||g|| + c)
    tangent_norm_c: float = 0.1
    time_weighting: bool = True  # w(t) = 1 / (sigma_d tan t)
    adaptive_weighting: bool = True  # learned logvar: (w / e^logvar) (...)^2 + logvar
    # LADD (facts §5)
    use_ladd: bool = True
    scm_weight: float = 1.0
    adv_weight: float = 0.5
    max_time: float = 1.57080  # the student's time is replaced by this with probability max_time_prob
    max_time_prob: float = 0.5
    disc_layers: tuple[int, ...] = (2, 8, 14, 19)  # teacher blocks whose outputs feed the heads (clipped to depth)
    disc_virtual_batch: int = 8  # local batch norm group size
    disc_kernel: int = 9  # the heads' circular residual conv
    misaligned_pairs: bool = True  # rolled real latents with un-rolled captions count as fakes
    independent_d_times: bool = True  # t_fake and t_real drawn independently
    # Optimisation (facts §6)
    optimizer: str = "came"
    lr_g: float = 2e-6
    lr_d: float = 2e-6
    betas: tuple[float, ...] = (0.9, 0.999, 0.9999)  # CAME (beta1, beta2, beta3); AdamW uses the first two
    eps: tuple[float, ...] = (1e-30, 1e-16)
    weight_decay: float = 0.0
    warmup_steps_g: int = 5000  # linear warmup of the generator's lr, then constant
    warmup_steps_d: int = 0
    grad_clip: float = 0.1
    ema_decay: float | None = None  # EMA of the student; off in the official recipe

    def __post_init__(self):
        problems = []
        if not (self.use_scm or self.use_ladd):
            problems.append("at least one of use_scm / use_ladd must be on")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {OPTIMIZERS}")
        if self.scm_form not in SCM_FORMS:
            problems.append(f"scm_form must be one of {SCM_FORMS}")
        if not self.cfg_scales:
            problems.append("cfg_scales must not be empty")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            problems.append("ema_decay must be in (0, 1) or None")
        if problems:
            raise ConfigError("invalid distillation config: " + "; ".join(problems))

    def replace(self, **kw) -> DistillConfig:
        unknown = sorted(set(kw) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"unknown distillation config keys: {unknown}")
        return dataclasses.replace(self, **kw)

    def disc_blocks(self, num_layers: int) -> tuple[int, ...]:
        """The feature blocks, clipped to the teacher's depth (duplicates removed, order kept)."""
        return tuple(dict.fromkeys(min(i, num_layers - 1) for i in self.disc_layers))
