"""Text-encoder distillation (issue 22; NanoFLUX's third compression step): a smaller caption encoder for the
phone, trained to stand in for the large one in front of a trained Sprint student.

The small encoder is the large one's own transformers architecture with fewer layers (`layers`), so that
`prepare-data --text-encoder` and `export-mobile --text-encoder` read its folder like the original; it starts
from the large encoder's embeddings and its layers at evenly spaced depths (DistilBERT's initialisation), and
is trained on captions to give
  (1) the large encoder's caption embeddings at SANA's kept token positions (prepare.TextEncoder): relative MSE
      over the real (unpadded) tokens, and
  (2) the same early visual features of the denoiser: relative MSE of the outputs of the student generator's
      first `feature_blocks` blocks (diffusers' SanaTransformer2DModel converted from its params, frozen) when
      it reads the small encoder's embeddings instead of the large one's, weighted by `feature_weight`.
NanoFLUX names the aim of (2) but gives neither losses, weights nor inputs; our choice: the denoiser's input
is its first step's, pure noise x_t = sigma_d * z at t = pi/2 (a 1-step phone app runs nothing else; Eq. 4 at
t = pi/2 reads only the noise), with the guidance the student was distilled with.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from sprintjax.errors import SprintjaxError
from sprintjax.fileio import atomic_dir


def small_encoder(teacher, layers: int):
    """A copy of the transformers encoder `teacher` keeping `layers` of its layers (evenly spaced, first and
    last included), embeddings and everything else as they are."""
    import copy

    from torch import nn

    stack = _layer_list(teacher)
    n = len(stack)
    if not 1 <= layers < n:
        raise SprintjaxError(f"--layers must be in 1..{n - 1} (the text encoder has {n} layers), got {layers}")
    keep = sorted({round(i * (n - 1) / max(layers - 1, 1)) for i in range(layers)}) if layers > 1 else [n - 1]
    student = copy.deepcopy(teacher)
    parent = _layer_parent(student)
    parent.layer = nn.ModuleList([parent.layer[i] for i in keep])
    student.config.num_hidden_layers = layers
    return student, keep


def _layer_parent(model):
    encoder = getattr(model, "encoder", None)
    if encoder is None or not hasattr(encoder, "layer"):
        raise SprintjaxError(f"{type(model).__name__} is not a BERT-style encoder (model.encoder.layer); "
                             "text-encoder distillation supports those")
    return encoder


def _layer_list(model):
    return _layer_parent(model).layer


def _embed(model, tok, total: int, length: int):
    """Hidden states at SANA's kept positions (the first token and the last L-1 of T) and their mask."""
    hidden = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])[0].float()
    keep = [0, *range(total - length + 1, total)]
    return hidden[:, keep], tok["attention_mask"][:, keep].float()


def block_features(transformer, blocks: int):
    """A function (x, caption, mask, t_fm, guidance) -> [outputs of the first `blocks` transformer blocks]."""
    import torch

    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o[0] if isinstance(o, tuple) else o))
             for b in transformer.transformer_blocks[:blocks]]

    def run(x, caption, mask, t_fm, guidance):
        seen.clear()
        b = x.shape[0]
        transformer(x, encoder_hidden_states=caption, encoder_attention_mask=mask, timestep=torch.full((b,), t_fm),
                    guidance=None if guidance is None else torch.full((b,), guidance), return_dict=False)
        return list(seen)

    run.hooks = hooks
    return run


def distill_text_encoder(params, cfg, text_encoder: str, captions: list[str], out: str | Path, layers: int = 2,
                         caption_len: int = 300, instruction: str = "", steps: int = 500, batch: int = 64,
                         lr: float = 1e-4, feature_weight: float = 1.0, feature_blocks: int = 2,
                         guidance: float = 4.5, seed: int = 0, force: bool = False, log=print) -> dict:
    """Trains the small encoder; writes it with the tokenizer as a transformers folder (atomically). Returns
    the first and last losses and the parameter counts."""
    import torch

    from sprintjax.convert.mobile import torch_generator
    from sprintjax.data.prepare import TextEncoder, resolve_text_encoder

    if not captions:
        raise SprintjaxError("no captions to distil on")
    if not 1 <= feature_blocks <= cfg.num_layers and feature_weight:
        raise SprintjaxError(f"--feature-blocks must be in 1..{cfg.num_layers}, got {feature_blocks}")
    big = TextEncoder(resolve_text_encoder(text_encoder), caption_len, instruction)
    if big.model.config.hidden_size != cfg.caption_channels:
        raise SprintjaxError(f"the text encoder gives {big.model.config.hidden_size}-wide embeddings; the student "
                             f"generator wants {cfg.caption_channels}: give the encoder its records were made with")
    torch.manual_seed(seed)
    small, kept = small_encoder(big.model, layers)
    small.eval()  # no dropout: the targets are deterministic
    transformer = torch_generator(params, cfg, 1).transformer
    for p in transformer.parameters():
        p.requires_grad_(False)
    features = block_features(transformer, feature_blocks)
    g = guidance * cfg.guidance_embeds_scale if cfg.guidance_embeds else None
    opt = torch.optim.AdamW(small.parameters(), lr=lr, weight_decay=0.0)
    rng, start, texts = np.random.default_rng(seed), time.time(), [instruction + c for c in captions]
    size = cfg.sample_size
    for i in range(steps):
        idx = rng.choice(len(texts), size=min(batch, len(texts)), replace=False)
        tok = big.tokenizer([texts[j] for j in idx], padding="max_length", max_length=big.total, truncation=True,
                            return_tensors="pt")
        with torch.no_grad():
            want, mask = _embed(big.model, tok, big.total, big.max_length)
        got, _ = _embed(small, tok, big.total, big.max_length)
        w = mask[..., None]
        loss_embed = ((got - want) ** 2 * w).sum() / ((want**2) * w).sum()  # (1): relative, real tokens only
        loss = loss_embed
        loss_feat = torch.zeros(())
        if feature_weight:  # (2): the denoiser's first step, x_t = sigma_d * z at t = pi/2 (t_fm = 1, Eq. 6-7)
            z = torch.from_numpy(rng.standard_normal((len(idx), cfg.in_channels, size, size)).astype(np.float32))
            x_fm = z  # Eq. 6-7 at t = pi/2: t_fm = 1, x_fm = x_t / sigma_d * sqrt(t_fm^2 + (1 - t_fm)^2) = z
            with torch.no_grad():
                ref = features(x_fm, want, mask, 1.0, g)
            new = features(x_fm, got, mask, 1.0, g)
            loss_feat = sum(((a - b) ** 2).mean() / (b**2).mean() for a, b in zip(new, ref, strict=True)) / len(ref)
            loss = loss + feature_weight * loss_feat
        if i == 0:
            first = (loss_embed.item(), loss_feat.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (i + 1) % 50 == 0 or i + 1 == steps:
            log(f"text distillation {i + 1}/{steps}: embeddings {loss_embed.item():.4f}, "
                f"features {loss_feat.item():.4f} ({time.time() - start:.0f} s)")
    for h in features.hooks:
        h.remove()
    with atomic_dir(out, force=force) as tmp:
        small.save_pretrained(tmp)
        big.tokenizer.save_pretrained(tmp)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"layers_kept": kept, "params": count(small), "teacher_params": count(big.model),
            "loss_embeddings": loss_embed.item(), "loss_features": loss_feat.item(),
            "first_loss_embeddings": first[0], "first_loss_features": first[1]}
