"""The PyTorch twin of a token-sampled SANA transformer (`sprintjax.tokens`), for the mobile exports only.

diffusers' `SanaTransformer2DModel` holds every weight but the two samplers; `token_sampled` wraps it in a
module whose forward takes the same arguments as diffusers' (so `convert.mobile`'s sampling loop drives either)
and runs its embeddings, blocks and output layer itself, with the samplers between the blocks. The samplers
are written here from the formulas in `sprintjax.tokens`' docstring, independently of the JAX code, so the
parity tests compare two transcriptions.
"""

from __future__ import annotations

import numpy as np


def _classes():
    import torch
    from torch import nn
    from torch.nn import functional as F

    class ResBranch(nn.Module):
        """1x1 D -> D/2, SiLU, 3x3 depthwise, SiLU, 1x1 D/2 -> D on a grid [B, D, H, W]."""

        def __init__(self, d: int):
            super().__init__()
            r = max(d // 2, 1)
            self.conv_in = nn.Conv2d(d, r, 1)
            self.conv_depth = nn.Conv2d(r, r, 3, padding=1, groups=r)
            self.conv_out = nn.Conv2d(r, d, 1)

        def forward(self, grid):
            return self.conv_out(F.silu(self.conv_depth(F.silu(self.conv_in(grid)))))

    def to_grid(tokens, h: int, w: int):  # [B, h*w, D] -> [B, D, h, w]
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)

    def to_tokens(grid):  # [B, D, h, w] -> [B, h*w, D]
        return grid.flatten(2).transpose(1, 2)

    class TokenSampled(nn.Module):
        """diffusers' SanaTransformer2DModel forward with blocks down..up-1 on the half token grid."""

        def __init__(self, transformer, down: int, up: int):
            super().__init__()
            d = transformer.config.num_attention_heads * transformer.config.attention_head_dim
            self.transformer, self.down, self.up = transformer, down, up
            self.token_down, self.token_up = ResBranch(d), ResBranch(d)

        def _down(self, tokens, h, w):
            p = to_grid(tokens, h, w)
            p = F.avg_pool2d(p, 2)
            return to_tokens(p + self.token_down(p))

        def _up(self, low_out, low_in, skip, h, w):
            delta = F.interpolate(to_grid(low_out - low_in, h // 2, w // 2), scale_factor=2, mode="nearest")
            u = to_grid(skip, h, w) + delta
            return to_tokens(u + self.token_up(u))

        def forward(self, hidden_states, encoder_hidden_states, timestep, guidance=None, encoder_attention_mask=None,
                    controlnet_block_samples=None, return_dict=False):
            if controlnet_block_samples is not None:
                raise ValueError("a token-sampled transformer takes no ControlNet")
            m = self.transformer
            b, _, height, width = hidden_states.shape
            p = m.config.patch_size
            h, w = height // p, width // p
            bias = None
            if encoder_attention_mask is not None:
                bias = ((1 - encoder_attention_mask.to(hidden_states.dtype)) * -10000.0).unsqueeze(1)
            x = m.patch_embed(hidden_states)
            if guidance is not None:
                temb, embedded = m.time_embed(timestep, guidance=guidance, hidden_dtype=x.dtype)
            else:
                temb, embedded = m.time_embed(timestep, batch_size=b, hidden_dtype=x.dtype)
            y = m.caption_norm(m.caption_projection(encoder_hidden_states).view(b, -1, x.shape[-1]))
            skip = low_in = None
            for i, block in enumerate(m.transformer_blocks):
                if i == self.down:
                    skip, x = x, self._down(x, h, w)
                    low_in = x
                if i == self.up:
                    x = self._up(x, low_in, skip, h, w)
                half = self.down <= i < self.up
                x = block(x, None, y, bias, temb, h // 2 if half else h, w // 2 if half else w)
            if self.up == len(m.transformer_blocks):
                x = self._up(x, low_in, skip, h, w)
            x = m.proj_out(m.norm_out(x, embedded, m.scale_shift_table))
            x = x.reshape(b, h, w, p, p, -1).permute(0, 5, 1, 3, 2, 4).reshape(b, -1, h * p, w * p)
            return (x,)

    return torch, TokenSampled


def token_sampled(transformer, params, cfg):
    """diffusers' `transformer` (the model's other weights, loaded) wrapped with the sampler params of `params`
    (sprintjax's `token_down` / `token_up` subtrees)."""
    torch, TokenSampled = _classes()
    module = TokenSampled(transformer, cfg.token_down, cfg.token_up)
    for name in ("token_down", "token_up"):
        branch, src = getattr(module, name), params[name]
        pointwise = lambda k: torch.from_numpy(np.array(k).T[:, :, None, None].copy())  # noqa: E731 [in,out] -> OIHW
        state = {"conv_in.weight": pointwise(src["conv_in"]["kernel"]),
                 "conv_in.bias": torch.from_numpy(np.array(src["conv_in"]["bias"])),
                 "conv_depth.weight": torch.from_numpy(  # HWIO (I = 1) -> OIHW
                     np.array(src["conv_depth"]["kernel"]).transpose(3, 2, 0, 1).copy()),
                 "conv_depth.bias": torch.from_numpy(np.array(src["conv_depth"]["bias"])),
                 "conv_out.weight": pointwise(src["conv_out"]["kernel"]),
                 "conv_out.bias": torch.from_numpy(np.array(src["conv_out"]["bias"]))}
        branch.load_state_dict(state, strict=True)
    return module.eval()
