"""The `sprintjax` command line: one subcommand per job (the jobs live in `commands.py`); user errors print one
message, not a traceback."""

from __future__ import annotations

import argparse
import os
import sys

from sprintjax import commands
from sprintjax.bench.demo import DATA_DIR as DEMO_DATA_DIR
from sprintjax.errors import SprintjaxError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sprintjax", description="SANA-Sprint one-step distillation in JAX.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("import-diffusers", help="diffusers transformer folder -> Orbax params checkpoint")
    s.add_argument("src", help="folder with config.json and diffusion_pytorch_model*.safetensors")
    s.add_argument("dst", help="output checkpoint folder (params/ + model_config.json)")
    s.add_argument("--force", action="store_true", help="overwrite an existing DST")
    s.set_defaults(fn=commands.cmd_import_diffusers)

    s = sub.add_parser("export-diffusers", help="training checkpoint or params checkpoint -> diffusers "
                                                 "SanaSprintPipeline folder")
    s.add_argument("src", help="training workdir, sprintjax params checkpoint, or diffusers folder")
    s.add_argument("dst", help="output folder")
    s.add_argument("--step", type=int, help="checkpoint step of a training workdir (default: the latest)")
    s.add_argument("--part", default="auto", choices=["auto", "student", "ema", "teacher"],
                   help="auto: the EMA if the run kept one, else the trained model; teacher: a distillation "
                        "run's frozen teacher")
    s.add_argument("--vae", help="local AutoencoderDC folder to copy in")
    s.add_argument("--text-encoder", help="local Gemma-2 folder to copy in (its tokenizer too, if saved with it)")
    s.add_argument("--tokenizer", help="local tokenizer folder (default: the text encoder's)")
    s.add_argument("--guidance", type=float, default=4.5, help="guidance scale recorded in the model card")
    s.add_argument("--transformer-only", action="store_true", help="write a bare transformer folder instead")
    s.add_argument("--force", action="store_true", help="overwrite an existing DST")
    s.set_defaults(fn=commands.cmd_export_diffusers)

    s = sub.add_parser("export-mobile", help="few-step generator -> ExecuTorch .pte (XNNPACK) and ONNX, "
                                              "checked against sprintjax in each runtime")
    s.add_argument("src", help="training workdir, sprintjax params checkpoint, or diffusers folder")
    s.add_argument("out", help="output folder")
    s.add_argument("--step", type=int, help="checkpoint step of a training workdir (default: the latest)")
    s.add_argument("--part", default="auto", choices=["auto", "student", "ema", "teacher"])
    s.add_argument("--steps", default="1", help="comma-separated sampling step counts (one graph each)")
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--height", type=int, help="latent height (default: the model's sample_size)")
    s.add_argument("--width", type=int, help="latent width (default: the model's sample_size)")
    s.add_argument("--caption-len", type=int, default=300, help="caption tokens (SANA: 300)")
    s.add_argument("--guidance", type=float, default=4.5, help="guidance scale baked into the graph")
    s.add_argument("--weights", default="float32,float16,int8", help="comma-separated: float32, float16, int8")
    s.add_argument("--formats", default="pte,onnx", help="comma-separated: pte, onnx")
    s.add_argument("--no-verify", action="store_true", help="skip running each artifact against sprintjax")
    s.add_argument("--control", action="store_true", help="the controlled generator of a ControlNet-distilled run "
                   "(control latents as a fourth input)")
    s.add_argument("--text-encoder", help="with --vae: the whole pipeline as one program (methods encode_text, "
                   "generate, decode) + tokenizer files; the records' text encoder folder, or minilm")
    s.add_argument("--vae", help="with --text-encoder: builtin-ae or a diffusers AutoencoderDC folder")
    s.add_argument("--instruction-file", help="with --text-encoder: the records' instruction text (prepare-data)")
    s.add_argument("--prompt", action="append", help="example prompt(s) the pipeline is checked on (repeatable)")
    s.add_argument("--max-bytes", type=int, help="size limit of every written file: larger is an error, "
                   "nothing is written")
    s.add_argument("--force", action="store_true", help="overwrite an existing OUT")
    s.set_defaults(fn=commands.cmd_export_mobile)

    s = sub.add_parser("compress", help="structured pruning of a student: blocks, cross-attention heads and "
                                         "Mix-FFN channels by measured sensitivity -> a smaller params checkpoint")
    s.add_argument("src", help="training workdir, sprintjax params checkpoint, or diffusers folder")
    s.add_argument("out", help="output params checkpoint with prune_plan.json (relative to the uncompressed model "
                   "when SRC was pruned before) and sensitivities.json")
    s.add_argument("--step", type=int, help="checkpoint step of a training workdir (default: the latest)")
    s.add_argument("--part", default="auto", choices=["auto", "student", "ema", "teacher"])
    s.add_argument("--data", help="prepared records; the first --held-out validation records measure sensitivity")
    s.add_argument("--held-out", type=int, default=64, help="held-out records (each at the 1/2/4-step times)")
    s.add_argument("--num-layers", type=int, help="blocks to keep (default: all)")
    s.add_argument("--cross-heads", type=int, help="cross-attention heads to keep in each block (default: all)")
    s.add_argument("--ffn-channels", type=int, help="Mix-FFN channels to keep in each block (default: all)")
    s.add_argument("--channel-group", type=int, default=1, help="FFN channels ablated together when measuring")
    s.add_argument("--guidance", type=float, default=4.5, help="embedded guidance scale while measuring")
    s.add_argument("--plan", help="apply this prune_plan.json instead of measuring")
    s.add_argument("--token-sampler", metavar="DOWN:UP", help="insert a token down-sampler before block DOWN and an "
                   "up-sampler before block UP (0-based, of the pruned model): those blocks run on a quarter of the "
                   "tokens; the result exports to mobile formats only")
    s.add_argument("--force", action="store_true", help="overwrite an existing OUT")
    s.set_defaults(fn=commands.cmd_compress)

    s = sub.add_parser("distill-text", help="a smaller text encoder for a trained student: fewer layers, trained on "
                                             "captions to match the large encoder and the student's early features")
    s.add_argument("src", help="the student: training workdir, params checkpoint or diffusers folder")
    s.add_argument("out", help="output folder: a transformers model + tokenizer (prepare-data and export-mobile "
                   "read it with --text-encoder)")
    s.add_argument("--step", type=int, help="checkpoint step of a training workdir (default: the latest)")
    s.add_argument("--part", default="auto", choices=["auto", "student", "ema", "teacher"])
    s.add_argument("--text-encoder", required=True, help="the large encoder the records were made with, or minilm")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--captions", help="text file of training captions, one per line")
    src.add_argument("--shapes", type=int, help="the shapes benchmark's first N training captions")
    s.add_argument("--layers", type=int, default=2, help="layers kept (evenly spaced, first and last included)")
    s.add_argument("--caption-len", type=int, default=300, help="caption tokens kept (the records' --max-length)")
    s.add_argument("--instruction-file", help="the records' instruction text (prepare-data)")
    s.add_argument("--steps", type=int, default=500)
    s.add_argument("--batch", type=int, default=64)
    s.add_argument("--lr", type=float, default=1e-4)
    s.add_argument("--feature-weight", type=float, default=1.0, help="weight of the denoiser-feature term (0: off)")
    s.add_argument("--feature-blocks", type=int, default=2, help="the student's first blocks whose outputs are matched")
    s.add_argument("--guidance", type=float, default=4.5, help="the student's guidance while reading features")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--force", action="store_true", help="overwrite an existing OUT")
    s.set_defaults(fn=commands.cmd_distill_text)

    s = sub.add_parser("sample", help="few-step TrigFlow sampling of a checkpoint; writes latents as .npy")
    s.add_argument("ckpt", help="the model (student or teacher): training run, sprintjax params checkpoint, or "
                   "diffusers folder")
    s.add_argument("--step", type=int, help="checkpoint step of a training run (default: the latest)")
    s.add_argument("--part", default="auto", choices=["auto", "student", "ema", "teacher"],
                   help="of a training run: auto (the EMA if the run kept one, else the trained model), student, "
                        "ema, or teacher (a distillation run's frozen teacher)")
    s.add_argument("--caption-embeds", required=True, help=".npy [B, L, caption_channels]")
    s.add_argument("--caption-mask", help=".npy [B, L] of 1 (token) / 0 (padding); default all ones")
    s.add_argument("--guidance", type=float, help="embedded guidance scale (students; default 4.5)")
    s.add_argument("--steps", type=int, default=1, help="number of steps (1, 2, 4, ... any N >= 1)")
    s.add_argument("--t-mid", type=float, default=1.3, help="intermediate time of the 2-step schedule")
    s.add_argument("--noise", help=".npy [K, B, C, H, W] standard normal, one tensor per step run (instead of "
                   "--seed; image-to-image runs fewer steps than --steps at low --strength)")
    s.add_argument("--seed", type=int, help="seed of the noise (default 0)")
    s.add_argument("--height", type=int, help="latent height without --noise (default: config sample_size)")
    s.add_argument("--width", type=int, help="latent width without --noise (default: config sample_size)")
    s.add_argument("--init-latents", help="image-to-image: .npy [B, C, H, W] latents in the VAE's scale "
                   "(SanaSprintImg2ImgPipeline semantics)")
    s.add_argument("--strength", type=float, help="image-to-image noise strength in [0, 1] (default 0.6)")
    s.add_argument("--controlnet", help="a ControlNet: sprintjax ControlNet checkpoint or diffusers folder")
    s.add_argument("--control", help="the ControlNet's control latents, .npy [B, C, H, W] in the VAE's scale")
    s.add_argument("--conditioning-scale", type=float, default=1.0, help="ControlNet residual scale")
    s.add_argument("--out", required=True, help="output .npy, latents [B, C, H, W] in the VAE's scale")
    s.set_defaults(fn=commands.cmd_sample)

    s = sub.add_parser("info", help="print a preset's or checkpoint's config and parameter count")
    s.add_argument("what", help="a preset name (e.g. sana_sprint_600m), a config file.py:arg, or a model (training "
                   "run, params checkpoint, or diffusers folder)")
    s.set_defaults(fn=commands.cmd_info)

    def training_parser(name, help, config_help, fn):
        s = sub.add_parser(name, help=help, epilog="Override any config field with --config.section.key=value.")
        s.add_argument("--config", required=True, help=config_help)
        s.add_argument("--workdir", required=True, help="checkpoints, logs, metrics.jsonl, samples")
        s.add_argument("--coordinator", help="host:port of process 0 (multi-process runs started by a launcher)")
        s.add_argument("--num-processes", type=int, default=1)
        s.add_argument("--process-id", type=int, default=0)
        s.add_argument("--distributed", action="store_true", help="jax.distributed.initialize(), auto-detected")
        s.set_defaults(fn=fn, takes_overrides=True)
        return s

    training_parser("train", "distil (or adapt a teacher) from a config; rerun to resume",
                    "config file and variant, e.g. configs/tiny.py:fsdp", commands.cmd_train)
    s = training_parser("train-teacher", "flow-matching teacher training, then export its params",
                        "a teacher-stage config, e.g. configs/shapes.py:teacher", commands.cmd_train_teacher)
    s.add_argument("--export", help="params checkpoint to write (default WORKDIR/teacher; + _diffusers folder)")

    s = sub.add_parser("prepare-data", help="image/caption pairs -> ArrayRecord training records (resumable)")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of images, each with a same-named .txt caption")
    src.add_argument("--captions-jsonl", help='JSONL of {"image": path relative to the file, "caption": text}')
    src.add_argument("--shapes", action="store_true", help="the embedded shapes dataset (train + validation)")
    s.add_argument("--num", type=int, default=10000, help="with --shapes: training scenes")
    s.add_argument("--num-validation", type=int, default=1000, help="with --shapes: validation scenes")
    s.add_argument("--vae", required=True,
                   help="local diffusers AutoencoderDC folder, or builtin-s2d / builtin-ae (shapes)")
    s.add_argument("--text-encoder", required=True, help="local transformers model + tokenizer folder, or minilm")
    s.add_argument("--out", required=True, help="output data folder (TFDS/ArrayRecord)")
    s.add_argument("--resolution", type=int, default=1024)
    s.add_argument("--max-length", type=int, default=300, help="caption tokens kept (SANA: 300)")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--instruction-file", help="text prepended to every caption (SANA's complex human instruction)")
    s.add_argument("--split", default="train", help="split name of --images / --captions-jsonl pairs")
    s.add_argument("--control", help="ControlNet data: `canny` (edge maps of the images) or a folder of control "
                   "images named like the images (HED, depth); stored as latents of the same VAE")
    s.set_defaults(fn=commands.cmd_prepare_data)

    s = sub.add_parser("eval", help="benchmark a teacher and/or student on the shapes validation prompts")
    s.add_argument("--data", required=True, help="prepared shapes records (train + validation)")
    s.add_argument("--teacher", help="the teacher: training run, params checkpoint, or diffusers folder")
    s.add_argument("--teacher-steps", default="20,1", help="comma-separated Euler step counts (CFG 4.5)")
    s.add_argument("--teacher-trigflow-steps", default="",
                   help="comma-separated Euler step counts on the teacher's TrigFlow PF-ODE (Prop. 3.1; Table 1)")
    s.add_argument("--student", help="the student: training run (its EMA if kept), params checkpoint, or diffusers "
                   "folder")
    s.add_argument("--student-steps", default="1,2,4", help="comma-separated few-step sampler step counts")
    s.add_argument("--teacher-controlnet", help="the teacher's ControlNet (records with control latents): adds "
                   "the edge-agreement score")
    s.add_argument("--student-controlnet", help="the student's ControlNet")
    s.add_argument("--num", type=int, default=500, help="validation prompts")
    s.add_argument("--seed", type=int, default=0, help="seed of the shared noise")
    s.add_argument("--out", required=True, help="folder for results.json, results.md, grid.png")
    s.set_defaults(fn=commands.cmd_eval)

    s = sub.add_parser("compile", help="AOT-compile the training steps for a TPU topology or cpu:N; print memory",
                       epilog="Override any config field with --config.section.key=value.")
    s.add_argument("--config", required=True, help="config file and variant")
    s.add_argument("--topology", required=True, help="e.g. v5p:4x4x4, v6e:8x8, or cpu:8")
    s.add_argument("--json", help="also write the figures as JSON here")
    s.add_argument("--hlo", help="also write each step's compiled HLO text into this folder (STEP.hlo.txt)")
    s.set_defaults(fn=commands.cmd_compile, takes_overrides=True)

    s = sub.add_parser("demo", help="the main job: distil the shipped shapes teacher, benchmark it (make demo)",
                       epilog="Override any field of configs/shapes.py with --config.section.key=value.")
    s.add_argument("--workdir", default="runs/demo")
    s.add_argument("--data", default=str(DEMO_DATA_DIR), help="shapes records (built here if missing)")
    s.add_argument("--num-eval", type=int, default=500, help="validation prompts to benchmark")
    s.set_defaults(fn=commands.cmd_demo, takes_overrides=True)

    s = sub.add_parser("check-parity", help="a random diffusers model imported, sampled in both frameworks, "
                                             "round-tripped: this installation against diffusers")
    s.add_argument("--workdir", default="runs/parity")
    s.set_defaults(fn=commands.cmd_check_parity)
    return p


def main(argv=None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # clu's TensorBoard writer imports TensorFlow
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # TensorFlow only writes summaries here
    args, extra = build_parser().parse_known_args(argv)
    try:
        if getattr(args, "takes_overrides", False):
            args.fn(args, extra)
        elif extra:
            build_parser().error(f"unrecognized arguments: {' '.join(extra)}")
        else:
            args.fn(args)
    except SprintjaxError as e:
        print(f"sprintjax {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
