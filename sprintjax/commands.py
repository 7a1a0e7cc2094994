"""The `sprintjax` subcommands, one function each (`cli.py` parses the arguments and calls them); user errors
raise SprintjaxError, which the command line prints as one message."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from sprintjax.errors import SprintjaxError


def _load_npy(path: str, what: str) -> np.ndarray:
    """np.load without pickle (never unpickle): object arrays are refused."""
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise SprintjaxError(f"{what} file not found: {path}") from None
    except ValueError as e:
        raise SprintjaxError(f"{what} file {path} is not a plain numeric .npy: {e}") from None


def _save_npy(path: str, array: np.ndarray) -> None:
    import io

    from sprintjax.fileio import atomic_write_bytes

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def _refuse_existing(path: str, force: bool) -> None:
    """An output that exists is refused before any work (the writers check again, atomically)."""
    if Path(path).exists() and not force:
        raise SprintjaxError(f"{Path(path).absolute()} already exists; pass --force to overwrite it")


def cmd_import_diffusers(a):
    from sprintjax.convert import import_diffusers

    _refuse_existing(a.dst, a.force)
    print(f"reading diffusers weights from {a.src} ...", flush=True)
    cfg = import_diffusers(a.src, a.dst, force=a.force)
    print(f"wrote sprintjax params checkpoint {a.dst} ({cfg.num_layers} layers, hidden {cfg.hidden_size})")


def cmd_export_diffusers(a):
    from sprintjax.convert import params_to_diffusers
    from sprintjax.convert.pipeline import check_components, read_source, write_pipeline

    _refuse_existing(a.dst, a.force)
    check_components(a.vae, a.text_encoder, a.tokenizer)  # before the weights are read
    source = read_source(a.src, a.part, a.step)
    print(f"read {source.description}", flush=True)
    if a.transformer_only:
        params_to_diffusers(a.dst, source.params, source.cfg.replace(dtype="float32", remat="none"), force=a.force)
        print(f"wrote diffusers transformer folder {a.dst} (SanaTransformer2DModel.from_pretrained loads it)")
        return
    missing = write_pipeline(a.dst, source, a.vae, a.text_encoder, a.tokenizer, a.guidance, force=a.force)
    print(f"wrote diffusers pipeline folder {a.dst} (SanaSprintPipeline.from_pretrained loads it)")
    if missing:
        print(f"  without {', '.join(missing)} (none given): pass them to from_pretrained, e.g. "
              f"SanaSprintPipeline.from_pretrained(DST, {missing[0]}=...), or re-export with "
              + " ".join(f"--{m.replace('_', '-')} DIR" for m in missing))


def cmd_export_mobile(a):
    from sprintjax.convert import mobile, mobile_pipeline
    from sprintjax.convert.pipeline import read_source

    _refuse_existing(a.out, a.force)
    whole = a.text_encoder or a.vae
    if whole and not (a.text_encoder and a.vae):
        raise SprintjaxError("the whole pipeline needs both --text-encoder and --vae")
    if whole and a.control:
        raise SprintjaxError("--control exports the controlled generator alone: drop --text-encoder / --vae")
    if not whole and (a.instruction_file or a.prompt):
        raise SprintjaxError("--instruction-file and --prompt apply to the whole pipeline (--text-encoder, --vae)")
    if a.max_bytes is not None and a.max_bytes < 1:
        raise SprintjaxError(f"--max-bytes must be positive, got {a.max_bytes}")
    source = read_source(a.src, a.part, a.step)
    if a.control and source.controlnet is None:
        raise SprintjaxError(f"--control: {a.src} holds no ControlNet (give a run distilled with control.num_layers)")
    print(f"read {source.description}{' and its ControlNet' if a.control else ''}", flush=True)
    csv = lambda text: [x for x in text.split(",") if x]  # noqa: E731
    common = dict(steps=[int(k) for k in csv(a.steps)], batch=a.batch, caption_len=a.caption_len,
                  guidance=a.guidance, weights=csv(a.weights), formats=csv(a.formats), verify=not a.no_verify,
                  force=a.force, max_bytes=a.max_bytes, log=lambda m: print(m, flush=True))
    if whole:
        if a.height or a.width:
            raise SprintjaxError("the whole pipeline generates at the model's sample_size: drop --height / --width")
        instruction = Path(a.instruction_file).read_text() if a.instruction_file else ""
        report = mobile_pipeline.export_pipeline(source.params, source.cfg, a.out, a.text_encoder, a.vae,
                                                 instruction=instruction, prompts=a.prompt or mobile_pipeline.PROMPTS,
                                                 **common)
        print(mobile_pipeline.format_report(report))
    else:
        report = mobile.export_mobile(source.params, source.cfg, a.out, height=a.height, width=a.width,
                                      controlnet=source.controlnet if a.control else None, **common)
        print(mobile.format_report(report))
    print(f"wrote {a.out} (export.json lists the inputs, outputs and figures)")


def cmd_sample(a):
    from sprintjax.checks import finite_input, finite_output
    from sprintjax.controlnet import SanaControlNet, check_pair
    from sprintjax.convert import load_controlnet, load_model, model_config_of
    from sprintjax.model import SanaTransformer
    from sprintjax.sampling import DEFAULT_STRENGTH, check_inputs, check_latents, sample_from_arrays, sampler_times

    if a.noise and a.seed is not None:
        raise SprintjaxError("give either --noise or --seed, not both")
    if a.steps < 1:
        raise SprintjaxError(f"--steps must be >= 1, got {a.steps}")
    if a.strength is not None and not a.init_latents:
        raise SprintjaxError("--strength applies to image-to-image only: give --init-latents")
    if bool(a.control) != bool(a.controlnet):
        raise SprintjaxError("--control and --controlnet go together: the control latents drive the ControlNet")
    if not a.controlnet and (Path(a.ckpt) / "controlnet").is_dir():
        raise SprintjaxError(f"{a.ckpt} was distilled with a ControlNet ({a.ckpt}/controlnet): give --controlnet "
                             f"{Path(a.ckpt) / 'controlnet'} and --control C.npy (its control latents)")
    # every input is checked before the weights load
    caption = finite_input(_load_npy(a.caption_embeds, "caption embeddings"), "caption embeddings")
    mask = finite_input(_load_npy(a.caption_mask, "caption mask"), "caption mask") if a.caption_mask else None
    if mask is not None and not np.isin(mask, (0, 1)).all():
        raise SprintjaxError("caption mask must hold only 0 (padding) and 1 (token)")
    noise = finite_input(_load_npy(a.noise, "noise"), "noise", sample_axis=1) if a.noise else None
    latents = {k: finite_input(_load_npy(f, f"{k} latents"), f"{k} latents") if f else None
               for k, f in (("init", a.init_latents), ("control", a.control))}
    strength = (DEFAULT_STRENGTH if a.strength is None else a.strength) if a.init_latents else None
    try:
        calls = int(sampler_times(a.steps, strength, a.t_mid).shape[0]) - 1
    except ValueError as e:
        raise SprintjaxError(str(e)) from None
    cfg = model_config_of(a.ckpt, "checkpoint", a.part)
    check_inputs(cfg, caption, mask, noise, calls)
    hw = None if noise is None else noise.shape[3:]
    for k, v in latents.items():
        if v is not None:
            check_latents(cfg, f"{k} latents", v, caption.shape[0], hw)
            hw = v.shape[2:]
    controlnet = control_params = None
    if a.controlnet:
        control_params, cn_cfg = load_controlnet(a.controlnet)
        check_pair(cfg, cn_cfg)
        controlnet = SanaControlNet(cn_cfg.replace(**cfg.compute_settings()))
    params, cfg = load_model(a.ckpt, "checkpoint", a.part, a.step)
    what = "image-to-image " if a.init_latents else ""
    print(f"sampling {caption.shape[0]} latents {what}in {calls} step(s){' with a ControlNet' * bool(controlnet)}"
          " ...", flush=True)
    out = sample_from_arrays(SanaTransformer(cfg), params, caption, mask, steps=a.steps, noise=noise,
                             seed=a.seed or 0, height=a.height, width=a.width, guidance_scale=a.guidance,
                             t_mid=a.t_mid, init_latents=latents["init"],
                             strength=DEFAULT_STRENGTH if strength is None else strength, controlnet=controlnet,
                             control_params=control_params, control=latents["control"],
                             conditioning_scale=a.conditioning_scale)
    finite_output(out, f"sampling {a.ckpt}", "The inputs were finite: the checkpoint's weights (or the guidance "
                  "scale) produce it for those captions.")
    _save_npy(a.out, out)
    print(f"wrote {a.out}: latents {out.shape} (x0 / sigma_d, the VAE's scale)")


def cmd_distill_text(a):
    """Text-encoder distillation (sprintjax.text_distill) in front of a trained student."""
    from sprintjax.convert.pipeline import read_source
    from sprintjax.text_distill import distill_text_encoder

    _refuse_existing(a.out, a.force)
    if a.captions:
        try:
            captions = [c.strip() for c in Path(a.captions).read_text().splitlines() if c.strip()]
        except OSError as e:
            raise SprintjaxError(f"cannot read --captions {a.captions}: {e}") from None
    else:
        from sprintjax.bench import shapes

        captions = [sc.caption for sc in shapes.sample_images("train", a.shapes)[1]]
    instruction = Path(a.instruction_file).read_text() if a.instruction_file else ""
    source = read_source(a.src, a.part, a.step)
    print(f"read {source.description}; {len(captions)} captions", flush=True)
    report = distill_text_encoder(source.params, source.cfg.replace(dtype="float32", remat="none"), a.text_encoder,
                                  captions, a.out, a.layers, a.caption_len, instruction, a.steps, a.batch, a.lr,
                                  a.feature_weight, a.feature_blocks, a.guidance, a.seed, a.force,
                                  log=lambda m: print(m, flush=True))
    print(f"wrote {a.out}: {report['params']:,} parameters ({report['params'] / report['teacher_params']:.2f}x the "
          f"large encoder's), layers {report['layers_kept']} kept")


def cmd_compress(a):
    """Structured pruning (sprintjax.prune): sensitivities on held-out records, then the plan, or a given plan."""
    from sprintjax import prune, tokens
    from sprintjax.convert import save_params
    from sprintjax.convert.pipeline import read_source
    from sprintjax.model import SanaTransformer, count_params

    _refuse_existing(a.out, a.force)
    plan, sized = None, a.num_layers or a.cross_heads or a.ffn_channels
    if a.plan:
        try:
            plan = prune.PrunePlan.from_json(Path(a.plan).read_text())
        except OSError as e:
            raise SprintjaxError(f"cannot read --plan {a.plan}: {e}") from None
    elif not a.data and (sized or not a.token_sampler):
        raise SprintjaxError("give --data (prepared records: their validation split is the held-out set) or --plan")
    source = read_source(a.src, a.part, a.step)
    if source.controlnet is not None:
        raise SprintjaxError(f"{a.src} was distilled with a ControlNet, whose blocks copy the student's: pruning "
                             "a controlled student is not supported")
    cfg = source.cfg.replace(dtype="float32", remat="none")
    if cfg.token_sampler:
        raise SprintjaxError(f"{a.src} has a token sampler: it is the ladder's last rung (prune before inserting it)")
    print(f"read {source.description}: {count_params(source.params):,} parameters", flush=True)
    sens = None
    if plan is None and a.token_sampler and not sized:
        plan = prune.PrunePlan.full(cfg)  # only the token sampler: nothing to measure
    if plan is None:
        sizes = (a.num_layers or cfg.num_layers, a.cross_heads or cfg.num_cross_attention_heads,
                 a.ffn_channels or cfg.mlp_hidden)
        prune.select(cfg, None, *sizes)  # the sizes are checked before the sensitivities are measured
        from sprintjax.data.pipeline import first_records

        held = first_records(a.data, "validation", a.held_out, ("latents", "caption", "caption_mask"))
        sens = prune.sensitivities(source.params, cfg, *held.values(), channel_group=a.channel_group,
                                   guidance_scale=a.guidance, log=lambda m: print(m, flush=True))
        plan = prune.select(cfg, sens, *sizes)
    params, small_cfg = prune.prune(source.params, cfg, plan)
    if a.token_sampler:
        params, small_cfg = tokens.insert(params, small_cfg, a.token_sampler)
    earlier = Path(a.src) / "prune_plan.json"  # a pruned source: the plan stays relative to the uncompressed one
    if earlier.is_file():
        plan = prune.compose(prune.PrunePlan.from_json(earlier.read_text()), plan)
    extra = {"prune_plan.json": plan.to_json() + "\n"}
    if sens is not None:
        extra["sensitivities.json"] = json.dumps({k: np.asarray(v).tolist() for k, v in sens.items()}) + "\n"
    save_params(a.out, params, small_cfg, force=a.force, extra=extra)
    before, after = count_params(source.params), count_params(SanaTransformer(small_cfg).param_shapes())
    print(f"blocks {cfg.num_layers} -> {small_cfg.num_layers}, cross-attention heads {cfg.num_cross_attention_heads}"
          f" -> {small_cfg.num_cross_attention_heads}, Mix-FFN channels {cfg.mlp_hidden} -> {small_cfg.mlp_hidden}"
          + (f", blocks {small_cfg.token_down}..{small_cfg.token_up - 1} on the half token grid"
             if small_cfg.token_sampler else ""))
    print(f"wrote {a.out}: {after:,} parameters ({after / before:.2f}x), prune_plan.json"
          f"{', sensitivities.json' if sens is not None else ''}")


def cmd_info(a):
    from sprintjax.model import SanaTransformer, count_params
    from sprintjax.model_config import PRESETS, preset

    if a.what in PRESETS:
        cfg = preset(a.what)
    elif a.what.partition(":")[0].endswith(".py"):
        from sprintjax.configlib import load_config, model_config

        cfg = model_config(load_config(a.what))
    else:
        from sprintjax.convert import model_config_of

        cfg = model_config_of(a.what) if Path(a.what).is_dir() else preset(a.what)
    shapes = SanaTransformer(cfg).param_shapes()
    print(cfg.to_json())
    print(f"parameters: {count_params(shapes):,} ({count_params(shapes) / 1e6:.2f}M)")


def _init_distributed(a):
    """jax.distributed when the launcher says so: explicit flags (local launcher) or auto-detect (TPU pods)."""
    import jax

    if a.coordinator:
        jax.distributed.initialize(coordinator_address=a.coordinator, num_processes=a.num_processes,
                                   process_id=a.process_id)
    elif a.distributed:
        jax.distributed.initialize()


def _run_config(a, overrides):
    from sprintjax.configlib import load_config, parse_overrides, resolve

    cfg = parse_overrides(load_config(a.config), overrides)
    resolve(cfg)  # every unknown key fails here, before anything compiles
    return cfg


def _progress_logging() -> None:
    """Training progress lines (steps/s, ETA, losses) on stderr; libraries stay at their WARNING default."""
    import logging

    import absl.flags

    absl.flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
    ours = logging.getLogger("sprintjax")
    if not ours.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s sprintjax: %(message)s", "%H:%M:%S"))
        ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False


def cmd_train(a, overrides):
    from sprintjax.train import train

    cfg = _run_config(a, overrides)
    _progress_logging()
    _init_distributed(a)
    status = train(cfg, a.workdir)
    print(f"training {status}: {a.workdir}")


def cmd_compile(a, overrides):
    import json

    if a.topology.startswith("cpu:"):  # fake CPU devices must be requested before JAX starts
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={a.topology.split(':')[1]}")
    from sprintjax.aot import compile_steps, format_report

    cfg = _run_config(a, overrides)
    print(f"compiling the training steps of {a.config} for {a.topology} ...", flush=True)
    report = compile_steps(cfg, a.topology, hlo_dir=a.hlo)
    print(format_report(report, a.topology))
    if a.json:
        from sprintjax.fileio import atomic_write_bytes

        atomic_write_bytes(a.json, json.dumps(report, indent=2).encode())
    too_big = [n for n, r in report.items() if "does_not_fit" in r]
    if too_big:
        raise SprintjaxError(f"{', '.join(too_big)} does not fit the device memory of {a.topology} (report above)")


def cmd_prepare_data(a):
    from pathlib import Path

    from sprintjax.data.prepare import find_pairs, prepare

    if a.shapes:
        from sprintjax.bench import shapes

        splits, source = shapes.caption_pairs(a.num, a.num_validation), "shapes"
    else:
        splits, source = {a.split: find_pairs(a.images, a.captions_jsonl)}, a.images or a.captions_jsonl
    instruction = Path(a.instruction_file).read_text() if a.instruction_file else ""
    print(", ".join(f"{k}: {len(v)} pairs" for k, v in splits.items()) + f" -> {a.out}", flush=True)
    folder = prepare(splits, a.out, a.vae, a.text_encoder, a.resolution, a.max_length, a.batch_size, instruction,
                     source=source, control=a.control)
    extra = f", control latents from {a.control}" if a.control else ""
    print(f"wrote training records {folder} (with null_caption.safetensors{extra})")


def cmd_eval(a):
    from pathlib import Path

    from sprintjax.bench import evaluate

    if not (a.teacher or a.student):
        raise SprintjaxError("give --teacher and/or --student (params checkpoints or diffusers folders)")
    ints = lambda text, given: [int(s) for s in text.split(",") if s] if given else []  # noqa: E731
    steps = {"teacher": ints(a.teacher_steps, a.teacher),
             "teacher_trigflow": ints(a.teacher_trigflow_steps, a.teacher),
             "student": ints(a.student_steps, a.student)}
    evaluate.run_benchmark(a.data, Path(a.out), {"teacher": a.teacher, "student": a.student}, steps, a.num, a.seed,
                           {"teacher": a.teacher_controlnet, "student": a.student_controlnet})
    print((Path(a.out) / "results.md").read_text())
    print(f"wrote {a.out}/results.json, results.md, grid.png")


def cmd_train_teacher(a, overrides):
    """Flow-matching teacher training (train.stage = teacher), then the final params exported."""
    from pathlib import Path

    from sprintjax.checkpoints import trained_params
    from sprintjax.convert import controlnet_to_diffusers, params_to_diffusers, save_params

    cmd_train(a, overrides)
    params, cfg, step = trained_params(a.workdir, "params")
    cfg = cfg.replace(dtype="float32", remat="none")
    controlnet = json.loads((Path(a.workdir) / "config.json").read_text())["train"]["stage"] == "controlnet"
    what = "controlnet" if controlnet else "teacher"
    out = Path(a.export or Path(a.workdir) / what)
    save_params(out, params, cfg, force=True, controlnet=controlnet)
    (controlnet_to_diffusers if controlnet else params_to_diffusers)(out.with_name(out.name + "_diffusers"), params,
                                                                     cfg, force=True)
    print(f"exported the {'ControlNet' if controlnet else 'teacher'} at step {step}: {out} (params) and "
          f"{out}_diffusers (diffusers)")


def cmd_demo(a, overrides):
    from sprintjax.bench.demo import run_demo

    _progress_logging()
    run_demo(Path(a.workdir), Path(a.data), overrides, a.num_eval)


def cmd_check_parity(a):
    from sprintjax.convert.parity_demo import run_parity_check

    run_parity_check(Path(a.workdir))
