"""Any sprintjax checkpoint to a folder diffusers' `SanaSprintPipeline.from_pretrained` loads.

Sources: a training workdir (distillation or teacher stage; the latest sealed step or a chosen one), a bare
params checkpoint, or a diffusers transformer / pipeline folder. The output holds `transformer/`, `scheduler/`
(SCMScheduler: trigflow, sigma_data 0.5, facts §8), `model_index.json`, a model-card `README.md`, and the VAE,
text encoder and tokenizer copied from local folders the user names (none is downloaded). Without them those
components are null in `model_index.json` and `from_pretrained` wants them passed (`vae=...`, or None).
A controlled distillation run also writes its student's ControlNet as `controlnet/` (a SanaControlNetModel
folder, or sprintjax's SanaSprintControlNetModel for a Sprint student's: sprintjax.convert.torch_controlnet),
beside the transformer; diffusers' SanaSprintPipeline ignores it, `sprintjax sample --controlnet` reads it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from sprintjax.convert.source import Source, read_source  # noqa: F401 (read_source: re-exported)
from sprintjax.errors import CheckpointError
from sprintjax.fileio import atomic_dir

SCHEDULER = {"_class_name": "SCMScheduler", "num_train_timesteps": 1000, "prediction_type": "trigflow",
             "sigma_data": 0.5}
COMPONENTS = {  # model_index.json entry of each component the SanaSprintPipeline takes
    "transformer": ["diffusers", "SanaTransformer2DModel"], "scheduler": ["diffusers", "SCMScheduler"],
    "vae": ["diffusers", "AutoencoderDC"], "text_encoder": ["transformers", "Gemma2Model"],
    "tokenizer": ["transformers", "GemmaTokenizerFast"],
}


def check_components(vae=None, text_encoder=None, tokenizer=None) -> dict[str, tuple[Path, list]]:
    """{name: (folder, model_index.json entry)} of the component folders given, each checked (a saved folder
    of that kind, no pickle files) before any weights are read or anything is written. A text encoder folder
    saved with its tokenizer (SANA's Gemma folders) gives the tokenizer too."""
    if text_encoder and tokenizer is None and (Path(text_encoder) / "tokenizer_config.json").is_file():
        tokenizer = text_encoder
    out = {}
    for name, src in (("vae", vae), ("text_encoder", text_encoder), ("tokenizer", tokenizer)):
        if not src:
            continue
        src = Path(src)
        config = src / ("tokenizer_config.json" if name == "tokenizer" else "config.json")
        if not config.is_file():
            raise CheckpointError(f"--{name.replace('_', '-')} {src} is not a saved {name} folder (no {config.name})")
        pickles = sorted(p.name for p in src.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
        if pickles:
            raise CheckpointError(f"{src} holds pickle files {pickles[:3]}: only safetensors folders are copied")
        meta = json.loads(config.read_text())
        cls = meta.get("_class_name") or meta.get("tokenizer_class") or (meta.get("architectures") or [None])[0]
        out[name] = (src, [COMPONENTS[name][0], cls or COMPONENTS[name][1]])
    return out


def model_card(source: Source, components: dict, guidance: float) -> str:
    cfg, run = source.cfg, source.run or {}
    lines = ["# SANA-Sprint transformer exported by sprintjax", "",
             f"Source: {source.description}.", "",
             "| | |", "|---|---|",
             f"| model | {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.in_channels} latent channels, "
             f"patch {cfg.patch_size}, QK-norm {cfg.qk_norm}, guidance embedder {cfg.guidance_embeds} |",
             f"| weights | float32 safetensors (trained with compute dtype {cfg.dtype}) |",
             "| schedule | TrigFlow (SCMScheduler, sigma_data 0.5): max_timesteps 1.5708, intermediate 1.3 for 2 "
             "steps |",
             f"| guidance | scale {guidance} (x guidance_embeds_scale {cfg.guidance_embeds_scale} into the "
             "embedder; no CFG at inference) |" if cfg.guidance_embeds else
             "| guidance | none embedded: a flow-matching teacher, sample it with CFG |"]
    if source.step is not None:
        lines.append(f"| training | stage {run.get('train', {}).get('stage', 'distill')}, step {source.step} of "
                     f"{run.get('train', {}).get('num_steps')}, seed {run.get('train', {}).get('seed')} |")
    d = run.get("distill") or {}
    if d and run.get("train", {}).get("stage", "distill") == "distill":
        lines.append(f"| distillation | sCM {d.get('use_scm')}, LADD {d.get('use_ladd')}, lr G {d.get('lr_g')} / "
                     f"D {d.get('lr_d')}, optimizer {d.get('optimizer')}, JVP in {d.get('jvp_dtype')} |")
    missing = [k for k in ("vae", "text_encoder", "tokenizer") if k not in components]
    lines += ["", "```python", "from diffusers import SanaSprintPipeline",
              "pipe = SanaSprintPipeline.from_pretrained(FOLDER" +
              "".join(f", {k}=YOUR_{k.upper()}" for k in missing) + ")", "```"]
    if missing:
        lines += ["", f"Not included (pass your own): {', '.join(missing)}."]
    if source.controlnet is not None:
        n = source.controlnet[1].num_layers
        lines += ["", f"`controlnet/` holds the student's ControlNet ({n} blocks; control latents: the VAE's latents "
                  "of a Canny edge image, times its scaling factor). SanaSprintPipeline does not take a ControlNet: "
                  "load it with `sprintjax.convert.torch_controlnet.SanaSprintControlNetModel.from_pretrained("
                  "FOLDER + '/controlnet')` and pass its `controlnet_block_samples` to the transformer at every "
                  "step, or run `sprintjax sample FOLDER --controlnet FOLDER/controlnet --control C.npy`."]
    return "\n".join(lines) + "\n"


def write_pipeline(dst: str | Path, source: Source, vae=None, text_encoder=None, tokenizer=None,
                   guidance: float = 4.5, force: bool = False) -> list[str]:
    """Writes the pipeline folder atomically; returns the components it could not include."""
    import diffusers

    from sprintjax.convert.diffusers_io import write_diffusers
    from sprintjax.convert.table import params_to_state_dict
    from sprintjax.model import SanaTransformer

    cfg = source.cfg.replace(dtype="float32", remat="none")
    state = params_to_state_dict(source.params, cfg, SanaTransformer(cfg).param_shapes())  # checked first
    control = None
    if source.controlnet is not None:
        from sprintjax.controlnet import SanaControlNet
        from sprintjax.convert.table import CONTROLNET_TABLE

        cn_params, cn_cfg = source.controlnet
        cn_cfg = cn_cfg.replace(dtype="float32", remat="none")
        control = (cn_cfg, params_to_state_dict(cn_params, cn_cfg, SanaControlNet(cn_cfg).param_shapes(),
                                                 CONTROLNET_TABLE))
    given = check_components(vae, text_encoder, tokenizer)
    with atomic_dir(dst, force=force) as tmp:
        write_diffusers(tmp / "transformer", cfg, state)
        if control is not None:
            write_diffusers(tmp / "controlnet", *control, controlnet=True)
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(
            {**SCHEDULER, "_diffusers_version": diffusers.__version__}, indent=2) + "\n")
        index = {"_class_name": "SanaSprintPipeline", "_diffusers_version": diffusers.__version__}
        components = {"transformer": COMPONENTS["transformer"], "scheduler": COMPONENTS["scheduler"]}
        for name, (folder, entry) in given.items():
            shutil.copytree(folder, tmp / name)
            components[name] = entry
        for name in COMPONENTS:
            index[name] = components.get(name, [None, None])
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(source, components, guidance))
    return [k for k in ("vae", "text_encoder", "tokenizer") if k not in components]
