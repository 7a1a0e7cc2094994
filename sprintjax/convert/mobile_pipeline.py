"""`sprintjax export-mobile SRC OUT --text-encoder T --vae V`: the whole text-to-image pipeline for a phone.

One ExecuTorch program (XNNPACK) per (step count, weight format), with three methods an app calls in turn:

  encode_text  input_ids, attention_mask [B, T] int64 -> caption [B, L, D], caption_mask [B, L] float32
  generate     noise [K, B, C, H, W], caption, caption_mask -> latents [B, C, H, W] (x0 / sigma_d: the
               few-step sampler of sprintjax.convert.mobile, unchanged)
  decode       latents -> image [B, H', W', 3] float32 in [0, 1] (times 255 and rounded: the PNG's bytes)

plus the tokenizer files (`tokenizer/`, `tokenizer.json` in the Hugging Face format that ExecuTorch's C++
tokenizers read) and the same three graphs as ONNX models. The text encoder is the transformers encoder the
training records were made with, with SANA's prompt handling (sprintjax.data.prepare.TextEncoder: the optional
instruction, padding to T = instruction + L tokens, the first token and the last L-1 kept); the decoder is the
shapes miniature's autoencoder (`builtin-ae`, ported below from its Flax definition) or a diffusers
AutoencoderDC folder (the DC-AE). Each method is checked in its runtime against its source (sprintjax's sampler
and decoder, the transformers encoder, diffusers' AutoencoderDC), and the three chained from token ids to image
against sprintjax's own pipeline (transformers encoder -> JAX sampler -> JAX decoder).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sprintjax.checks import finite_output
from sprintjax.convert import mobile
from sprintjax.errors import SprintjaxError
from sprintjax.fileio import atomic_dir

METHODS = ("encode_text", "generate", "decode")
PROMPTS = ("a red circle to the left of a blue square", "a green triangle")  # example inputs, cycled to the batch
FINITE_IN = "The example inputs (tokenized prompts, seeded noise) are finite: the weights produce it."


def text_module(encoder):
    """encode_text as a module: the encoder's hidden states at SANA's kept token positions (prepare.TextEncoder)."""
    import torch
    from torch import nn

    total, length = encoder.total, encoder.max_length

    class EncodeText(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = encoder.model

        def forward(self, input_ids, attention_mask):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask)[0].float()
            cut = total - length + 1  # the first token and the last L-1 (facts §3)
            keep = lambda x: torch.cat([x[:, :1], x[:, cut:]], dim=1)  # noqa: E731
            return keep(hidden), keep(attention_mask).float()

    return EncodeText().eval()


def decoder(vae: str):
    """(decode module, latent channels, pixel factor, reference decode) for `builtin-ae` or an AutoencoderDC
    folder. The module takes the generator's latents (the VAE's scale) and returns images in [0, 1], NHWC; the
    reference is sprintjax's JAX decoder (builtin-ae) or diffusers' eager module (DC-AE)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    if vae == "builtin-ae":
        from sprintjax.bench import autoencoder

        params = autoencoder.load()
        kernels = [params["decoder"][f"Conv_{i}"] for i in range(5)]
        scale = float(np.asarray(params["scaling_factor"]).reshape(()))

        class Decode(nn.Module):  # sprintjax.bench.autoencoder.Decoder, NCHW
            def __init__(self):
                super().__init__()
                self.convs = nn.ModuleList()
                for p in kernels:  # Flax [kh, kw, in, out] -> torch [out, in, kh, kw]; SAME padding
                    k = np.asarray(p["kernel"])
                    conv = nn.Conv2d(k.shape[2], k.shape[3], k.shape[:2], padding=k.shape[0] // 2)
                    conv.weight.data = torch.from_numpy(np.ascontiguousarray(k.transpose(3, 2, 0, 1)))
                    conv.bias.data = torch.from_numpy(np.asarray(p["bias"]).copy())
                    self.convs.append(conv)

            def forward(self, latents):
                c = self.convs
                x = F.silu(c[1](F.silu(c[0](latents / scale))))
                x = F.silu(c[3](_depth_to_space(c[2](x))))
                x = _depth_to_space(c[4](x)).permute(0, 2, 3, 1)
                return ((x + 1.0) / 2.0).clamp(0.0, 1.0)

        return Decode().eval(), autoencoder.LATENT_CHANNELS, 4, lambda z: autoencoder.decode_unit(params, z)

    from diffusers import AutoencoderDC

    if not Path(vae).is_dir():
        raise SprintjaxError(f"--vae {vae}: neither builtin-ae nor a diffusers AutoencoderDC folder")
    model = AutoencoderDC.from_pretrained(vae, local_files_only=True, use_safetensors=True).eval()

    class DecodeDC(nn.Module):
        def __init__(self):
            super().__init__()
            self.vae, self.scale = model, float(model.config.scaling_factor)

        def forward(self, latents):
            x = self.vae.decode(latents / self.scale, return_dict=False)[0]
            return ((x.permute(0, 2, 3, 1) + 1.0) / 2.0).clamp(0.0, 1.0)

    module = DecodeDC().eval()

    def reference(z):
        with torch.no_grad():
            return module(torch.from_numpy(np.asarray(z, np.float32))).numpy()

    factor = 2 ** (len(model.config.decoder_block_out_channels) - 1)
    return module, int(model.config.latent_channels), factor, reference


def _depth_to_space(x):
    """NCHW in and out, with sprintjax.bench.autoencoder's NHWC channel order: [B, 4C, H, W] -> [B, C, 2H, 2W]."""
    b, c, h, w = x.shape
    x = x.permute(0, 2, 3, 1).reshape(b, h, w, 2, 2, c // 4).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, 2 * h, 2 * w, c // 4).permute(0, 3, 1, 2)


def export_pipeline(params, cfg, out: str | Path, text_encoder: str, vae: str, steps=(1,), batch: int = 1,
                    caption_len: int = 300, instruction: str = "", guidance: float = 4.5, weights=mobile.WEIGHTS,
                    formats=mobile.FORMATS, prompts=PROMPTS, verify: bool = True, force: bool = False,
                    max_bytes: int | None = None, log=print) -> dict:
    """Writes one pipeline program per (steps, weights) into `out` (atomically), with `tokenizer/`, the ONNX
    models and export.json (inputs, outputs, per-method and end-to-end errors, latencies). Returns the report."""
    from transformers import AutoTokenizer

    from sprintjax.data.prepare import TextEncoder, resolve_text_encoder

    if not prompts:
        raise SprintjaxError("give at least one example prompt")
    bad = [w for w in weights if w not in mobile.WEIGHTS] + [f for f in formats if f not in mobile.FORMATS]
    if bad or any(k < 1 for k in steps):
        raise SprintjaxError(f"unknown weights/format/steps {bad or list(steps)}: weights are {mobile.WEIGHTS}, "
                             f"formats {mobile.FORMATS}, steps >= 1")
    encoder = TextEncoder(resolve_text_encoder(text_encoder), caption_len, instruction)
    decode, channels, factor, decode_ref = decoder(vae)
    width = encoder.model.config.hidden_size
    if width != cfg.caption_channels or channels != cfg.in_channels:
        raise SprintjaxError(f"the text encoder gives {width}-wide embeddings and the VAE {channels}-channel latents; "
                             f"the model wants caption_channels {cfg.caption_channels} and in_channels "
                             f"{cfg.in_channels}: give the encoder and VAE its training records were made with")
    size = cfg.sample_size
    prompts = (list(prompts) * batch)[:batch]
    texts = [instruction + p for p in prompts]  # what prepare.TextEncoder tokenizes
    report = {"batch": batch, "latent": [cfg.in_channels, size, size], "image": [size * factor, size * factor, 3],
              "caption": [caption_len, width], "tokens": encoder.total, "instruction": instruction,
              "guidance": guidance if cfg.guidance_embeds else None, "prompts": texts, "methods": {
                  "encode_text": "input_ids, attention_mask [B, T] int64 -> caption [B, L, D], caption_mask [B, L]",
                  "generate": "noise [K, B, C, H, W], caption, caption_mask -> latents [B, C, H, W]",
                  "decode": "latents [B, C, H, W] -> image [B, H, W, 3] in [0, 1]"}, "programs": {}}
    with atomic_dir(out, force=force) as tmp:
        encoder.tokenizer.save_pretrained(tmp / "tokenizer")
        shipped = AutoTokenizer.from_pretrained(tmp / "tokenizer", local_files_only=True)
        tok = shipped(texts, padding="max_length", max_length=encoder.total, truncation=True, return_tensors="np")
        ids, mask = tok["input_ids"].astype(np.int64), tok["attention_mask"].astype(np.int64)
        source_ids = encoder.tokenizer(texts, padding="max_length", max_length=encoder.total, truncation=True,
                                       return_tensors="np")["input_ids"]
        if not np.array_equal(ids, source_ids):
            raise SprintjaxError("the saved tokenizer files do not tokenize like the source tokenizer")
        for k in steps:
            noise = np.random.default_rng(0).standard_normal((k, batch, channels, size, size)).astype(np.float32)
            ref = _reference(params, cfg, encoder, prompts, noise, k, guidance, decode_ref) if verify else None
            for w in weights:
                report["programs"].update(_export_program(
                    params, cfg, tmp, k, w, formats, guidance, encoder, decode, (ids, mask), noise, ref, max_bytes,
                    log))
        (tmp / "export.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _reference(params, cfg, encoder, prompts, noise, steps, guidance, decode_ref) -> dict:
    """sprintjax's pipeline: the transformers encoder, the JAX few-step sampler, the JAX (or diffusers) decoder."""
    from sprintjax import trigflow
    from sprintjax.model import SanaTransformer
    from sprintjax.sampling import sample_latents

    caption, cmask = encoder(prompts)
    cmask = cmask.astype(np.float32)
    latents = np.asarray(sample_latents(SanaTransformer(cfg.replace(dtype="float32")), params, caption, cmask, noise,
                                        trigflow.schedule(steps), guidance if cfg.guidance_embeds else None))
    finite_output(latents, f"sprintjax's {steps}-step sampler on the example prompts", FINITE_IN)
    return {"caption": caption, "caption_mask": cmask, "latents": latents, "image": np.asarray(decode_ref(latents))}


def _export_program(params, cfg, folder: Path, steps, weights, formats, guidance, encoder, decode, tokens, noise,
                    ref, max_bytes, log) -> dict:
    """The three methods exported once, lowered into one .pte and three .onnx files, each checked."""
    import copy

    import torch

    WeightOnly, _ = mobile.torch_modules()
    modules = {"encode_text": text_module(encoder),
               "generate": mobile.torch_generator(params, cfg, steps, guidance, weights),
               "decode": decode}
    if weights != "float32":  # the sources stay float32 for the next weight format
        for name in ("encode_text", "decode"):
            modules[name] = copy.deepcopy(modules[name])
            mobile.replace_layers(modules[name], lambda layer: WeightOnly(layer, weights))
    stem = f"sana_sprint_pipeline_{steps}step_{weights}"
    mobile.check_size(mobile.state_bytes(*modules.values()), max_bytes, f"the {stem} program")
    with torch.no_grad():
        caption, cmask = modules["encode_text"](*map(torch.from_numpy, tokens))
        latents = modules["generate"](torch.from_numpy(noise), caption, cmask)
        image = modules["decode"](latents)
    finite_output(image.numpy(), f"the {steps}-step pipeline with {weights} weights (PyTorch)", FINITE_IN)
    args = {"encode_text": tuple(map(torch.from_numpy, tokens)),
            "generate": (torch.from_numpy(noise), caption, cmask), "decode": (latents,)}
    log(f"torch.export: the {steps}-step pipeline's three methods, {weights} weights ...")
    with torch.no_grad():
        programs = {m: torch.export.export(modules[m], args[m]) for m in METHODS}
    files = {}
    if "pte" in formats:
        from executorch.exir import to_edge_transform_and_lower

        log(f"  lowering to {stem}.pte ...")
        et = to_edge_transform_and_lower(programs, partitioner=[mobile.xnnpack_partitioner()]).to_executorch()
        (folder / f"{stem}.pte").write_bytes(et.buffer)
        files[f"{stem}.pte"] = {m: (lambda m=m: mobile.pte_runner(folder / f"{stem}.pte", m, first=False))
                                for m in METHODS}
    if "onnx" in formats:
        names = {"encode_text": (("input_ids", "attention_mask"), ("caption", "caption_mask")),
                 "generate": (("noise", "caption", "caption_mask"), ("latents",)),
                 "decode": (("latents",), ("image",))}
        for m in METHODS:
            log(f"  lowering to {stem}_{m}.onnx ...")
            mobile.write_onnx(programs[m], args[m], folder / f"{stem}_{m}.onnx", *names[m])
        files[f"{stem}.onnx"] = {m: (lambda m=m: mobile.onnx_runner(folder / f"{stem}_{m}.onnx", first=False))
                                 for m in METHODS}
    out = {}
    for name, runners in files.items():
        parts = [f"{stem}_{m}.onnx" for m in METHODS] if name.endswith(".onnx") else [name]
        nbytes = sum(mobile.file_bytes(folder, p) for p in parts)
        mobile.check_size(nbytes, max_bytes, name if len(parts) == 1 else f"{stem}'s ONNX models", written=True)
        entry = {"files": parts, "steps": steps, "weights": weights, "bytes": nbytes}
        if ref is not None:
            eager = {"caption": caption.numpy(), "latents": latents.numpy(), "image": image.numpy()}
            entry.update(_verify({m: make() for m, make in runners.items()}, tokens, noise, ref, eager, name))
        out[name] = entry
    return out


def _verify(run: dict, tokens, noise, ref: dict, eager: dict, name: str) -> dict:
    """Each method on the reference's own inputs, then the chain token ids -> image, against sprintjax; the
    chain's outputs also against the eager PyTorch modules the program was exported from."""
    caption, cmask = run["encode_text"](list(tokens))
    latents = run["generate"]([noise, ref["caption"], ref["caption_mask"]])[0]
    image = run["decode"]([ref["latents"]])[0]
    chain_latents = run["generate"]([noise, caption, cmask])[0]
    chain = run["decode"]([chain_latents])[0]
    finite_output(chain, f"{name}'s methods chained from token ids", FINITE_IN)
    return {"rel_err": {"encode_text": mobile.rel_err(caption, ref["caption"]),
                        "caption_mask_equal": bool(np.array_equal(cmask, ref["caption_mask"])),
                        "generate": mobile.rel_err(latents, ref["latents"]),
                        "decode": mobile.rel_err(image, ref["image"]),
                        "end_to_end": mobile.rel_err(chain, ref["image"])},
            "rel_err_vs_torch": {"encode_text": mobile.rel_err(caption, eager["caption"]),
                                 "generate": mobile.rel_err(chain_latents, eager["latents"]),
                                 "end_to_end": mobile.rel_err(chain, eager["image"])},
            "latency_s": {"encode_text": mobile.timed(run["encode_text"], list(tokens)),
                          "generate": mobile.timed(run["generate"], [noise, caption, cmask]),
                          "decode": mobile.timed(run["decode"], [latents])}}


def format_report(report: dict) -> str:
    lines = ["| program | size | rel. error vs sprintjax: text / generate / decode / end to end | latency (s): "
             "text / generate / decode |", "|---|---|---|---|"]
    for name, e in report["programs"].items():
        err, lat = e.get("rel_err"), e.get("latency_s")
        errs = "-" if err is None else " / ".join(f"{err[m]:.1e}" for m in (*METHODS, "end_to_end"))
        lats = "-" if lat is None else " / ".join(f"{lat[m]:.4f}" for m in METHODS)
        lines.append(f"| {name} | {e['bytes'] / 2**20:.2f} MiB | {errs} | {lats} |")
    return "\n".join(lines)
