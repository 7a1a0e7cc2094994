"""PyTorch serving side of a Sprint student's ControlNet: diffusers' SanaControlNetModel plus the two options
a Sprint student's copy carries and diffusers' class lacks (a guidance embedder, QK-norm in its blocks).

diffusers' SanaControlNetModel always builds a plain AdaLayerNormSingle and blocks without QK-norm; a
ControlNet copied from a Sprint student (sprintjax.controlnet) has both, as the official code's deep copy of
the base blocks and shared timestep embedding do. `SanaSprintControlNetModel` is that class: same key layout,
same outputs (`controlnet_block_samples`), a `guidance` argument; with neither option it is diffusers' class.
`sprintjax export-diffusers` names it in config.json only when the options are on. Imports torch and diffusers,
so `import sprintjax` stays free of them: import this module only where PyTorch runs.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.controlnets.controlnet_sana import SanaControlNetModel, SanaControlNetOutput
from diffusers.models.transformers.sana_transformer import (
    SanaCombinedTimestepGuidanceEmbeddings,
    SanaTransformerBlock,
)


class SanaSprintControlNetModel(SanaControlNetModel):
    """diffusers' SanaControlNetModel with the Sprint student's guidance embedder and QK-norm options."""

    @register_to_config
    def __init__(self, in_channels: int = 32, out_channels: int | None = 32, num_attention_heads: int = 70,
                 attention_head_dim: int = 32, num_layers: int = 7, num_cross_attention_heads: int | None = 20,
                 cross_attention_head_dim: int | None = 112, cross_attention_dim: int | None = 2240,
                 caption_channels: int = 2304, mlp_ratio: float = 2.5, dropout: float = 0.0,
                 attention_bias: bool = False, sample_size: int = 32, patch_size: int = 1,
                 norm_elementwise_affine: bool = False, norm_eps: float = 1e-6,
                 interpolation_scale: int | None = None, guidance_embeds: bool = False,
                 guidance_embeds_scale: float = 0.1, qk_norm: str | None = None, timestep_scale: float = 1.0):
        super().__init__(in_channels, out_channels, num_attention_heads, attention_head_dim, num_layers,
                         num_cross_attention_heads, cross_attention_head_dim, cross_attention_dim, caption_channels,
                         mlp_ratio, dropout, attention_bias, sample_size, patch_size, norm_elementwise_affine,
                         norm_eps, interpolation_scale)
        inner_dim = num_attention_heads * attention_head_dim
        if guidance_embeds:  # as SanaTransformer2DModel builds it
            self.time_embed = SanaCombinedTimestepGuidanceEmbeddings(inner_dim)
        if qk_norm is not None:
            self.transformer_blocks = torch.nn.ModuleList([
                SanaTransformerBlock(inner_dim, num_attention_heads, attention_head_dim, dropout=dropout,
                                     num_cross_attention_heads=num_cross_attention_heads,
                                     cross_attention_head_dim=cross_attention_head_dim,
                                     cross_attention_dim=cross_attention_dim, attention_bias=attention_bias,
                                     norm_elementwise_affine=norm_elementwise_affine, norm_eps=norm_eps,
                                     mlp_ratio=mlp_ratio, qk_norm=qk_norm)
                for _ in range(num_layers)])

    def forward(self, hidden_states, encoder_hidden_states, timestep, controlnet_cond, conditioning_scale=1.0,
                encoder_attention_mask=None, guidance=None, return_dict=True):
        """SanaControlNetModel.forward, the timestep embedded with `guidance` as SanaTransformer2DModel does."""
        if encoder_attention_mask is not None and encoder_attention_mask.ndim == 2:
            encoder_attention_mask = ((1 - encoder_attention_mask.to(hidden_states.dtype)) * -10000.0).unsqueeze(1)
        batch, _, height, width = hidden_states.shape
        hh, ww = height // self.config.patch_size, width // self.config.patch_size
        h = self.patch_embed(hidden_states)
        h = h + self.input_block(self.patch_embed(controlnet_cond.to(h.dtype)))
        if guidance is not None:
            temb, _ = self.time_embed(timestep, guidance=guidance, hidden_dtype=h.dtype)
        else:
            temb, _ = self.time_embed(timestep, batch_size=batch, hidden_dtype=h.dtype)
        y = self.caption_norm(self.caption_projection(encoder_hidden_states).view(batch, -1, h.shape[-1]))
        samples = []
        for block, zero_linear in zip(self.transformer_blocks, self.controlnet_blocks, strict=True):
            h = block(h, None, y, encoder_attention_mask, temb, hh, ww)
            samples.append(zero_linear(h) * conditioning_scale)
        return SanaControlNetOutput(controlnet_block_samples=samples) if return_dict else (samples,)
