"""`sprintjax export-mobile`: the few-step generator as one PyTorch graph (latents in, latents out), exported
with `torch.export` and lowered to an ExecuTorch program (XNNPACK) and to ONNX, each checked against sprintjax.

The graph is diffusers' `SanaTransformer2DModel` (our weights through the conversion table) inside the
TrigFlow sampling loop of facts §8, unrolled for a fixed step count: Prop. 3.1 around the flow model, Eq. 4's
denoiser, re-noising with the given fresh noise. Shapes are static (batch, latent size, caption length), as
mobile runtimes want them. Weight options: float32; float16 weights; int8 weight-only (symmetric, per output
channel). The compressed variants store the small weights in the graph and dequantise them to float32 inside
it (`WeightOnly*` below), so every runtime runs them with its float32 kernels: the file shrinks by 2x / 4x,
the arithmetic does not change.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from sprintjax.checks import finite_output
from sprintjax.errors import SprintjaxError
from sprintjax.fileio import atomic_dir

WEIGHTS = ("float32", "float16", "int8")
FORMATS = ("pte", "onnx")
FINITE_IN = "The example inputs (seeded noise, caption embeddings) are finite: the weights produce it."


def torch_modules():
    """The torch classes, built on first use so `import sprintjax` stays free of torch."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class WeightOnly(nn.Module):
        """A Linear or Conv2d whose weight is stored as float16, or as int8 with a float32 scale per output
        channel (w = q * scale, q = round(w / scale), scale = max|w| / 127), dequantised at run time."""

        def __init__(self, layer, mode: str):
            super().__init__()
            w = layer.weight.detach().float()
            if mode == "int8":
                scale = w.abs().amax(dim=tuple(range(1, w.ndim)), keepdim=True).clamp(min=1e-12) / 127.0
                self.register_buffer("q", torch.round(w / scale).to(torch.int8))
                self.register_buffer("scale", scale)
            else:
                self.register_buffer("q", w.to(torch.float16))
                self.scale = None
            self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float())
            self.conv = None if isinstance(layer, nn.Linear) else dict(
                stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)

        def forward(self, x):
            w = self.q.float() if self.scale is None else self.q.float() * self.scale
            return F.linear(x, w, self.bias) if self.conv is None else F.conv2d(x, w, self.bias, **self.conv)

    class Generator(nn.Module):
        """noise [K, B, C, H, W], caption [B, L, D], caption_mask [B, L] (, control [B, C, H, W] with a
        ControlNet) -> latents x0 / sigma_d [B, C, H, W].

        SanaSprintPipeline's denoising loop at the given TrigFlow times (also `torch_ref.diffusers_sample`); a
        ControlNet's `controlnet_block_samples` drive the transformer at every step."""

        def __init__(self, transformer, times, guidance: float | None, sigma_d: float = 0.5, controlnet=None,
                     conditioning_scale: float = 1.0):
            super().__init__()
            self.transformer, self.times, self.sigma_d = transformer, [float(t) for t in times], sigma_d
            self.guidance, self.controlnet, self.conditioning_scale = guidance, controlnet, conditioning_scale

        def forward(self, noise, caption, caption_mask, control=None):
            b, sd = caption.shape[0], self.sigma_d
            g = None if self.guidance is None else torch.full((b,), self.guidance, dtype=torch.float32)
            x = noise[0] * sd
            for k in range(len(self.times) - 1):
                s, t = self.times[k], self.times[k + 1]
                tf = math.sin(s) / (math.sin(s) + math.cos(s))  # Eq. 6
                scale = math.sqrt(tf**2 + (1 - tf) ** 2)
                x_fm = x / sd * scale  # Eq. 7
                samples = None
                if self.controlnet is not None:  # only a Sprint student's ControlNet class takes guidance
                    extra = {} if g is None else {"guidance": g}
                    samples = self.controlnet(x_fm, caption, torch.full((b,), tf), control, self.conditioning_scale,
                                              caption_mask, return_dict=False, **extra)[0]
                v = self.transformer(x_fm, encoder_hidden_states=caption, encoder_attention_mask=caption_mask,
                                     timestep=torch.full((b,), tf), guidance=g, controlnet_block_samples=samples,
                                     return_dict=False)[0]
                F_out = ((1 - 2 * tf) * x_fm + (1 - 2 * tf + 2 * tf**2) * v) / scale  # Eq. 8
                x0 = math.cos(s) * x - math.sin(s) * sd * F_out  # Eq. 4
                x = math.cos(t) * x0 + math.sin(t) * sd * noise[k + 1] if k + 2 < len(self.times) else x0
            return x / sd

    return WeightOnly, Generator


def torch_controlnet(params, cfg):
    """The eager PyTorch ControlNet for sprintjax ControlNet params: diffusers' SanaControlNetModel, or
    sprintjax's SanaSprintControlNetModel when the config needs a guidance embedder or QK-norm."""
    import torch

    from sprintjax.controlnet import SanaControlNet
    from sprintjax.convert.table import CONTROLNET_TABLE, params_to_state_dict

    cfg = cfg.replace(dtype="float32", remat="none")
    config = cfg.to_diffusers(controlnet=True)
    if config["_class_name"] == "SanaControlNetModel":
        from diffusers import SanaControlNetModel as model_cls
    else:
        from sprintjax.convert.torch_controlnet import SanaSprintControlNetModel as model_cls
    state = params_to_state_dict(params, cfg, SanaControlNet(cfg).param_shapes(), CONTROLNET_TABLE)
    model = model_cls(**{k: v for k, v in config.items() if not k.startswith("_")})
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
    return model.eval()


def torch_generator(params, cfg, steps: int, guidance: float = 4.5, weights: str = "float32", controlnet=None):
    """The eager PyTorch generator module for sprintjax params (and a ControlNet's (params, config): the
    module then takes the control latents as a fourth input)."""
    import torch
    from diffusers import SanaTransformer2DModel

    from sprintjax import tokens, trigflow
    from sprintjax.convert.table import params_to_state_dict
    from sprintjax.model import SanaTransformer

    if weights not in WEIGHTS:
        raise SprintjaxError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    cfg = cfg.replace(dtype="float32", remat="none")
    base = cfg.replace(token_down=0, token_up=0)  # a token-sampled model: diffusers' model + the samplers
    state = params_to_state_dict({k: v for k, v in params.items() if k not in tokens.KEYS}, base,
                                 SanaTransformer(base).param_shapes())
    model = SanaTransformer2DModel(**{k: v for k, v in base.to_diffusers().items() if not k.startswith("_")})
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
    model.eval()
    if cfg.token_sampler:
        from sprintjax.convert.torch_tokens import token_sampled

        if controlnet is not None:
            raise SprintjaxError("a token-sampled transformer takes no ControlNet")
        model = token_sampled(model, params, cfg)
    cn = None if controlnet is None else torch_controlnet(*controlnet)
    WeightOnly, Generator = torch_modules()
    if weights != "float32":
        for m in (model, cn):
            if m is not None:
                replace_layers(m, lambda layer: WeightOnly(layer, weights))
    g = guidance * cfg.guidance_embeds_scale if cfg.guidance_embeds else None
    return Generator(model, np.asarray(trigflow.schedule(steps)), g, controlnet=cn).eval()


def replace_layers(module, make) -> None:
    from torch import nn

    for name, child in module.named_children():
        if isinstance(child, nn.Linear | nn.Conv2d):
            setattr(module, name, make(child))
        else:
            replace_layers(child, make)


def example_inputs(cfg, steps: int, batch: int, height: int, width: int, caption_len: int, seed: int = 0,
                   control: bool = False):
    """Fixed random inputs (numpy float32): noise, caption embeddings, mask with a padded second caption (and
    control latents)."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((steps, batch, cfg.in_channels, height, width)).astype(np.float32)
    caption = rng.standard_normal((batch, caption_len, cfg.caption_channels)).astype(np.float32)
    mask = np.ones((batch, caption_len), np.float32)
    mask[1:, caption_len // 2:] = 0
    if control:
        return noise, caption, mask, rng.standard_normal((batch, cfg.in_channels, height, width)).astype(np.float32)
    return noise, caption, mask


def rel_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - b)) / max(np.max(np.abs(b)), 1e-12))


def write_onnx(program, args, path: Path, names=("noise", "caption", "caption_mask", "control"),
               outputs=("latents",)) -> None:
    """ONNX through the dynamo exporter, without its graph optimiser (which turned the masked cross-attention
    into NaNs with onnxscript 0.7.2) and without the per-node source metadata (most of a small file)."""
    import onnx
    import torch

    onnx_program = torch.onnx.export(program, args, dynamo=True, optimize=False, input_names=list(names[:len(args)]),
                                     output_names=list(outputs))
    model = onnx_program.model_proto
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    onnx.save_model(model, str(path), save_as_external_data=model.ByteSize() > 2**31 - 2**26,
                    location=path.name + ".data")


def xnnpack_partitioner():
    """XNNPACK's partitioner, leaving GELU nodes with approximate="tanh" to the portable kernels: executorch 1.4.0
    lowers every GELU to XNNPACK's exact (erf) GELU, dropping the flag (its GeluVisitor), and SANA's caption
    projection and time embedding use the tanh form. Measured on the demo student's 1-step generator: 6.9e-5
    relative error against sprintjax with them lowered, 9.7e-7 without; exact GELUs (MiniLM's) stay in XNNPACK."""
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.config.generic_node_configs import GeluConfig
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    class ExactGelu(GeluConfig):
        def check_constraints(self, node, ep) -> bool:
            return node.kwargs.get("approximate", "none") == "none" and super().check_constraints(node, ep)

    return XnnpackPartitioner(configs=[ExactGelu if c is GeluConfig else c for c in ALL_PARTITIONER_CONFIGS])


def pte_runner(path: Path, method: str = "forward", first: bool = True):
    """inputs -> output (first) or outputs through the ExecuTorch runtime's Python bindings (loaded once)."""
    import torch
    from executorch.runtime import Runtime

    loaded = Runtime.get().load_program(str(path)).load_method(method)

    def run(inputs):
        outs = [o.numpy() for o in loaded.execute([torch.from_numpy(np.array(a)) for a in inputs])]
        return outs[0] if first else outs
    return run


def onnx_runner(path: Path, first: bool = True):
    """inputs -> output (first) or outputs through onnxruntime on the CPU (session created once)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: not the optimiser's notes on nodes it cannot fold
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]

    def run(inputs):
        outs = sess.run(None, dict(zip(names, inputs, strict=True)))
        return outs[0] if first else outs
    return run


def state_bytes(*modules) -> int:
    """Bytes of the weights the modules' program stores: parameters and buffers, each tensor counted once at
    its stored width (int8 / float16 for the compressed variants)."""
    seen = {}
    for m in modules:
        for t in (*m.parameters(), *m.buffers()):
            seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def check_size(nbytes: int, max_bytes: int | None, what: str, written: bool = False) -> None:
    """Refuses an artifact over the user's size limit: before lowering (from its weights) and after writing."""
    if max_bytes is None or nbytes <= max_bytes:
        return
    how = "is" if written else "would hold"
    raise SprintjaxError(f"{what} {how} {nbytes / 2**20:.2f} MiB{'' if written else ' of weights'}, over the limit "
                         f"--max-bytes {max_bytes} ({max_bytes / 2**20:.2f} MiB); nothing was written: choose "
                         "--weights int8 or float16, or a smaller model (sprintjax compress)")


def timed(fn, inputs, repeats: int = 3) -> float:
    fn(inputs)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(inputs)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def export_mobile(params, cfg, out: str | Path, steps=(1,), batch: int = 1, height: int | None = None,
                  width: int | None = None, caption_len: int = 300, guidance: float = 4.5,
                  weights=WEIGHTS, formats=FORMATS, verify: bool = True, force: bool = False, log=print,
                  controlnet=None, max_bytes: int | None = None) -> dict:
    """Exports every (steps, weights, format) artifact into `out` (atomically) and, with verify, runs each in
    its runtime on fixed inputs against sprintjax's own sampler. Returns (and writes as export.json) the figures.
    controlnet: a ControlNet's (params, config): the controlled generator, control latents a fourth input.
    max_bytes: a size limit for every file; an artifact over it is an error and nothing is written."""
    from sprintjax import trigflow
    from sprintjax.model import SanaTransformer
    from sprintjax.sampling import sample_latents

    height, width = height or cfg.sample_size, width or cfg.sample_size
    if height % cfg.patch_size or width % cfg.patch_size:
        raise SprintjaxError(f"latent size {height}x{width} must be divisible by patch_size {cfg.patch_size}")
    bad = [w for w in weights if w not in WEIGHTS] + [f for f in formats if f not in FORMATS]
    bad += [k for k in steps if k < 1]
    if bad:
        raise SprintjaxError(f"unknown weights/format/steps {bad}: weights are {WEIGHTS}, formats {FORMATS}")
    report = {"batch": batch, "latent": [cfg.in_channels, height, width],
              "caption": [caption_len, cfg.caption_channels], "guidance": guidance if cfg.guidance_embeds else None,
              "inputs": ["noise [K, B, C, H, W]", "caption [B, L, D]", "caption_mask [B, L]",
                         *(["control [B, C, H, W] (control latents, the VAE's scale)"] if controlnet else [])],
              "output": "latents x0 / sigma_d [B, C, H, W] (divide by the VAE's scaling factor to decode)",
              "artifacts": {}}
    with atomic_dir(out, force=force) as tmp:
        for k in steps:
            inputs = example_inputs(cfg, k, batch, height, width, caption_len, control=controlnet is not None)
            cn = {}
            if controlnet is not None:
                from sprintjax.controlnet import SanaControlNet

                cn = dict(controlnet=SanaControlNet(controlnet[1].replace(dtype="float32", remat="none")),
                          control_params=controlnet[0], control=inputs[3])
            reference = np.asarray(sample_latents(
                SanaTransformer(cfg.replace(dtype="float32")), params, inputs[1], inputs[2], inputs[0],
                trigflow.schedule(k), guidance if cfg.guidance_embeds else None, **cn)) if verify else None
            if reference is not None:
                finite_output(reference, f"sprintjax's {k}-step sampler on the export's example inputs", FINITE_IN)
            for w in weights:
                report["artifacts"].update(_export_one(params, cfg, tmp, k, w, formats, guidance, inputs, reference,
                                                       log, controlnet, max_bytes))
        (tmp / "export.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _export_one(params, cfg, folder: Path, steps: int, weights: str, formats, guidance, inputs, reference, log,
                controlnet=None, max_bytes=None):
    """One generator (step count, weight format) exported once, lowered to each format, checked."""
    import torch

    module = torch_generator(params, cfg, steps, guidance, weights, controlnet)
    what = f"the {steps}-step generator with {weights} weights"
    check_size(state_bytes(module), max_bytes, what)
    args = tuple(torch.from_numpy(a) for a in inputs)
    with torch.no_grad():
        eager = module(*args).numpy()
        finite_output(eager, f"the {steps}-step generator with {weights} weights (PyTorch)", FINITE_IN)
        log(f"torch.export: {steps}-step generator, {weights} weights ...")
        program = torch.export.export(module, args)
    out = {}
    for fmt in formats:
        name = f"sana_sprint{'_control' if controlnet else ''}_{steps}step_{weights}.{fmt}"
        log(f"  lowering to {name} ...")
        if fmt == "pte":
            from executorch.exir import to_edge_transform_and_lower

            et = to_edge_transform_and_lower(program, partitioner=[xnnpack_partitioner()]).to_executorch()
            (folder / name).write_bytes(et.buffer)
        else:
            write_onnx(program, args, folder / name)
        check_size(file_bytes(folder, name), max_bytes, name, written=True)
        entry = {"file": name, "steps": steps, "weights": weights, "bytes": file_bytes(folder, name)}
        if reference is not None:
            run = (pte_runner if fmt == "pte" else onnx_runner)(folder / name)
            got = run(inputs)
            finite_output(got, f"{name} run in its runtime", FINITE_IN)
            entry.update(rel_err_vs_sprintjax=rel_err(got, reference), rel_err_vs_eager_torch=rel_err(got, eager),
                         latency_s=timed(run, inputs))
        out[name] = entry
    return out


def file_bytes(folder: Path, name: str) -> int:
    """A model file's size, with ONNX's external weights file when it has one."""
    return sum(p.stat().st_size for p in (folder / name, folder / (name + ".data")) if p.is_file())


def format_report(report: dict) -> str:
    arts = report["artifacts"]
    base = {(e["steps"], Path(n).suffix): e["bytes"] for n, e in arts.items() if e["weights"] == "float32"}
    lines = ["| artifact | size | vs float32 | rel. error vs sprintjax | latency (s) |", "|---|---|---|---|---|"]
    for name, e in arts.items():
        ratio = e["bytes"] / base.get((e["steps"], Path(name).suffix), float("nan"))
        err = f"{e['rel_err_vs_sprintjax']:.2e}" if "rel_err_vs_sprintjax" in e else "-"
        lat = f"{e['latency_s']:.4f}" if "latency_s" in e else "-"
        lines.append(f"| {name} | {e['bytes'] / 2**20:.2f} MiB | {ratio:.2f}x | {err} | {lat} |")
    return "\n".join(lines)
