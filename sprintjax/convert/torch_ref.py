"""The PyTorch side, for parity checks and the demo: random diffusers models and diffusers' sampling loop.

Imports torch and diffusers lazily (inside functions) so `import sprintjax` stays free of torch.
"""

from __future__ import annotations

import numpy as np

from sprintjax.model_config import ModelConfig


def _randomize(model, seed: int, scale: float):
    """Every tensor drawn afresh (norm weights around 1), so a conversion that drops or swaps one shows."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * scale
            p.copy_(noise + 1.0 if "norm" in name else noise)
    return model


def random_diffusers_model(cfg: ModelConfig, seed: int = 0, scale: float = 0.3):
    """A diffusers SanaTransformer2DModel with non-trivial random values in every tensor.

    diffusers zero-initialises some tensors; here every one is drawn afresh (norm weights around 1), so a
    conversion that drops or swaps any tensor changes the output.
    """
    from diffusers import SanaTransformer2DModel

    fields = {k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}
    model = SanaTransformer2DModel(**fields).eval()
    return _randomize(model, seed, scale)


def random_diffusers_controlnet(cfg: ModelConfig, seed: int = 0, scale: float = 0.3):
    """A random-valued diffusers SanaControlNetModel for a ControlNet config (sprintjax.controlnet), or
    sprintjax's SanaSprintControlNetModel where the config has a guidance embedder or QK-norm."""
    from diffusers import SanaControlNetModel

    config = cfg.to_diffusers(controlnet=True)
    if config["_class_name"] == "SanaControlNetModel":
        model_cls = SanaControlNetModel
    else:
        from sprintjax.convert.torch_controlnet import SanaSprintControlNetModel as model_cls
    model = model_cls(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    return _randomize(model, seed, scale)


def diffusers_velocity(model, x, t, caption, caption_mask=None, guidance=None, controlnet=None, control=None,
                       conditioning_scale=1.0) -> np.ndarray:
    """diffusers' forward on numpy inputs (float32), returning numpy; with a ControlNet and control latents,
    the transformer driven by its controlnet_block_samples as diffusers' SanaControlNetPipeline does."""
    import torch

    tt = lambda a: None if a is None else torch.from_numpy(np.asarray(a, np.float32))  # noqa: E731
    with torch.no_grad():
        samples = None
        if controlnet is not None:
            extra = {} if guidance is None else {"guidance": tt(guidance)}  # only the Sprint class takes it
            samples = controlnet(tt(x), encoder_hidden_states=tt(caption), timestep=tt(t), controlnet_cond=tt(control),
                                 conditioning_scale=conditioning_scale, encoder_attention_mask=tt(caption_mask),
                                 return_dict=False, **extra)[0]
        out = model(tt(x), encoder_hidden_states=tt(caption), timestep=tt(t), guidance=tt(guidance),
                    encoder_attention_mask=tt(caption_mask), controlnet_block_samples=samples, return_dict=False)[0]
    return out.numpy()


def diffusers_sample(model, caption, caption_mask, noise, steps: int, guidance_scale: float = 4.5,
                     sigma_d: float = 0.5, t_mid: float = 1.3, controlnet=None, control=None,
                     conditioning_scale: float = 1.0) -> np.ndarray:
    """SanaSprintPipeline's denoising loop (TrigFlow transform + SCMScheduler times) with given noise.

    noise [K, B, C, H, W] as in `sprintjax sample --noise`. Returns latent output (x0 / sigma_d).
    With a (diffusers or sprintjax PyTorch) ControlNet and control latents, its residuals drive each step.
    diffusers' scheduler rejects an intermediate time unless steps == 2 (facts §8), so it gets None then.
    """
    import torch
    from diffusers import SCMScheduler

    from sprintjax.convert.mobile import torch_modules

    sched = SCMScheduler(sigma_data=sigma_d, prediction_type="trigflow")
    sched.set_timesteps(steps, max_timesteps=1.57080, intermediate_timesteps=t_mid if steps == 2 else None)
    guidance = guidance_scale * model.config.guidance_embeds_scale if model.config.guidance_embeds else None
    loop = torch_modules()[1](model, sched.timesteps.tolist(), guidance, sigma_d, controlnet,
                              conditioning_scale)  # the pipeline's loop, unrolled
    tensor = lambda a: None if a is None else torch.from_numpy(np.asarray(a, np.float32))  # noqa: E731
    with torch.no_grad():
        return loop(tensor(noise), tensor(caption), tensor(caption_mask), tensor(control)).numpy()


def tiny_encoders(folder, latent_channels: int = 4, hidden: int = 16, seed: int = 0):
    """Random-weight stand-ins for SANA's encoders, saved to local folders (for tests and examples):
    a 2-block AutoencoderDC (2x downsampling) and a 1-layer Gemma-2 with a word-level tokenizer."""
    from pathlib import Path

    import torch
    from diffusers import AutoencoderDC
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import Gemma2Config, Gemma2Model, PreTrainedTokenizerFast

    folder = Path(folder)
    torch.manual_seed(seed)
    vae = AutoencoderDC(in_channels=3, latent_channels=latent_channels, attention_head_dim=4,
                        encoder_block_types=("ResBlock", "EfficientViTBlock"),
                        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 16),
                        decoder_block_out_channels=(8, 16), encoder_layers_per_block=(1, 1),
                        decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), (5,)),
                        decoder_qkv_multiscales=((), (5,)), upsample_block_type="interpolate",
                        downsample_block_type="Conv", scaling_factor=0.41407)
    vae.save_pretrained(folder / "vae")
    words = "a an the red green blue circle square triangle left right of to above below one two small big".split()
    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(folder / "text_encoder")
    cfg = Gemma2Config(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2, pad_token_id=0)
    Gemma2Model(cfg).save_pretrained(folder / "text_encoder")
    return folder / "vae", folder / "text_encoder"
