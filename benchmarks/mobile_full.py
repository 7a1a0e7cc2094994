"""The 0.6B Sprint preset at 512px on the phone-side runtime (issue 22; not in CI; random weights, for speed).

    python benchmarks/mobile_full.py                  # ~30 min on 2 cores; resumable: written programs are reused
    python benchmarks/mobile_full.py --rungs student --repeats 3

Per rung (the compression ladder's cuts at full size: blocks / cross-attention heads / Mix-FFN channels, and
the token sampler: blocks DOWN..UP-1 on the half token grid, random sampler weights), the
1-step generator (noise [1, 1, 32, 16, 16] and Gemma-2 caption embeddings [1, 300, 2304] in, latents out;
sprintjax.convert.mobile's graph around diffusers' SanaTransformer2DModel, float32 weights) is exported to an
ExecuTorch program (XNNPACK); the DC-AE decoder (diffusers AutoencoderDC with SANA's f32c32 config, random
weights; sprintjax.convert.mobile_pipeline's decode method: 16x16x32 latents -> a 512x512 image) is exported
as its own program. Reported: parameters, file size, latency (batch 1, --threads ExecuTorch threads, median of
--repeats rounds run interleaved across all programs in this process, after every export), and the peak
resident memory of a fresh process that loads the program and runs it once (beside the same process without
the program). Written to --out/results.md and results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNGS = {  # name: (blocks, cross-attention heads, Mix-FFN channels[, token sampler DOWN:UP]); preset: 28 / 16 / 2880
    "student": (28, 16, 2880),
    "ffn_half": (28, 16, 1440),
    "3_4_blocks": (21, 16, 1440),
    "half_blocks": (14, 16, 1440),
    "half_blocks_half_heads": (14, 8, 720),
    "tokens_2_26": (28, 16, 2880, "2:26"),  # blocks 2..25 on the 8x8 half grid (sprintjax.tokens)
    "ffn_half_tokens_2_26": (28, 16, 1440, "2:26"),
}
DC_AE = dict(  # SANA's dc-ae-f32c32-sana-1.0 as a diffusers AutoencoderDC (its conversion script's settings)
    in_channels=3, latent_channels=32, attention_head_dim=32,
    encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
    decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
    encoder_layers_per_block=(2, 2, 2, 3, 3, 3), decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
    encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)), decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    downsample_block_type="conv", upsample_block_type="interpolate", decoder_norm_types="rms_norm",
    decoder_act_fns="silu", scaling_factor=0.41407)
LATENT = 16  # 512px / 32


def rung_config(name: str):
    from sprintjax.model_config import preset
    from sprintjax.prune import PrunePlan, pruned_config

    cfg = preset("sana_sprint_600m", sample_size=LATENT, dtype="float32", remat="none")
    blocks, heads, channels, *tokens = RUNGS[name]
    cfg = pruned_config(cfg, PrunePlan(tuple(range(blocks)), ((*range(heads),),) * blocks,
                                       ((*range(channels),),) * blocks))
    down, up = (int(v) for v in tokens[0].split(":")) if tokens else (0, 0)
    return cfg.replace(token_down=down, token_up=up)


def generator_inputs(cfg):
    import numpy as np

    rng = np.random.default_rng(0)
    return [rng.standard_normal((1, 1, cfg.in_channels, LATENT, LATENT)).astype(np.float32),
            rng.standard_normal((1, 300, cfg.caption_channels)).astype(np.float32), np.ones((1, 300), np.float32)]


def export_generator(name: str, path: Path) -> int:
    """The rung's 1-step generator with random weights -> path (.pte, unless there); returns its parameter count."""
    import torch
    from diffusers import SanaTransformer2DModel

    from sprintjax import trigflow
    from sprintjax.convert.mobile import torch_modules

    cfg = rung_config(name)
    torch.manual_seed(0)
    base = cfg.replace(token_down=0, token_up=0)
    model = SanaTransformer2DModel(**{k: v for k, v in base.to_diffusers().items() if not k.startswith("_")}).eval()
    if cfg.token_sampler:  # random sampler weights (the output convs too: zeros would be as fast, but unusual)
        import jax
        import numpy as np

        from sprintjax import tokens
        from sprintjax.convert.torch_tokens import token_sampled

        rng = np.random.default_rng(0)
        params = jax.tree.map(lambda a: 0.02 * rng.standard_normal(a.shape).astype(np.float32),
                              tokens.init(jax.random.key(0), cfg.hidden_size))
        model = token_sampled(model, params, cfg)
    n = sum(p.numel() for p in model.parameters())
    if not path.is_file():
        _, Generator = torch_modules()
        module = Generator(model, list(trigflow.schedule(1)), 4.5 * cfg.guidance_embeds_scale).eval()
        _lower({"forward": module}, {"forward": generator_inputs(cfg)}, path)
    return n


def export_decoder(folder: Path, path: Path) -> int:
    """The DC-AE decoder (random weights, saved as a diffusers folder, read back by the library) -> path."""
    import numpy as np
    import torch
    from diffusers import AutoencoderDC

    from sprintjax.convert.mobile_pipeline import decoder

    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        AutoencoderDC(**DC_AE).save_pretrained(folder)
    module, channels, factor, _ = decoder(str(folder))
    assert channels == 32 and factor == 32
    n = sum(p.numel() for p in module.vae.decoder.parameters())
    if not path.is_file():
        z = np.random.default_rng(0).standard_normal((1, 32, LATENT, LATENT)).astype(np.float32)
        _lower({"decode": module}, {"decode": [z]}, path)
    return n


def _lower(modules: dict, inputs: dict, path: Path) -> None:
    import torch
    from executorch.exir import to_edge_transform_and_lower

    from sprintjax.convert.mobile import xnnpack_partitioner

    t0 = time.time()
    with torch.no_grad():
        programs = {m: torch.export.export(mod, tuple(torch.from_numpy(a) for a in inputs[m]))
                    for m, mod in modules.items()}
    et = to_edge_transform_and_lower(programs, partitioner=[xnnpack_partitioner()]).to_executorch()
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(et.buffer)
    tmp.replace(path)
    print(f"  wrote {path.name} ({path.stat().st_size / 2**30:.2f} GiB) in {time.time() - t0:.0f} s", flush=True)


def peak_rss(pte: Path | None, method: str, shapes: list, threads: int) -> float:
    """MiB: the peak resident memory of a fresh process that loads `pte` and runs `method` once (None: the same
    process without any program)."""
    args = [sys.executable, __file__, "--peak", json.dumps([str(pte) if pte else "", method, shapes, threads])]
    out = subprocess.run(args, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return float(out.stdout.strip().splitlines()[-1])


def _peak_child(spec: str) -> None:
    import numpy as np
    import torch
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
    from executorch.runtime import Runtime

    pte, method, shapes, threads = json.loads(spec)
    _unsafe_reset_threadpool(threads)
    inputs = [torch.from_numpy(np.ones(s, np.float32)) for s in shapes]
    if pte:
        Runtime.get().load_program(pte).load_method(method).execute(inputs)
    status = Path("/proc/self/status").read_text().splitlines()  # VmHWM: this process image's own peak
    hwm = [ln for ln in status if ln.startswith("VmHWM:")]  # (ru_maxrss keeps the parent's across exec)
    print(int(hwm[0].split()[1]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def latencies(programs: dict, repeats: int, threads: int) -> dict:
    """Median seconds per program, rounds interleaved across programs, after one warm-up run each."""
    import numpy as np
    import torch
    from executorch.extension.pybindings.portable_lib import _threadpool_get_thread_count, _unsafe_reset_threadpool
    from executorch.runtime import Runtime

    _unsafe_reset_threadpool(threads)
    assert _threadpool_get_thread_count() == threads
    runs = {}
    for name, (pte, method, inputs) in programs.items():
        loaded = Runtime.get().load_program(str(pte)).load_method(method)
        tensors = [torch.from_numpy(a) for a in inputs]
        runs[name] = (lambda loaded=loaded, tensors=tensors: loaded.execute(tensors))
        runs[name]()
    times = {k: [] for k in runs}
    for r in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
        print(f"  round {r + 1}/{repeats}", flush=True)
    return {k: float(np.median(v)) for k, v in times.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "mobile_full")
    p.add_argument("--rungs", default=",".join(RUNGS), help=f"comma-separated, of {', '.join(RUNGS)}")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--peak", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.peak:
        return _peak_child(args.peak)
    args.out.mkdir(parents=True, exist_ok=True)
    fresh = any(not (args.out / f"generator_{n}.pte").is_file() for n in args.rungs.split(",") if n)
    fresh = fresh or not (args.out / "dc_ae_decoder.pte").is_file()
    rows, programs = [], {}
    for name in [r for r in args.rungs.split(",") if r]:
        print(f"[{name}] {RUNGS[name]} ...", flush=True)
        pte = args.out / f"generator_{name}.pte"
        n = export_generator(name, pte)
        inputs = generator_inputs(rung_config(name))
        rows.append({"program": f"generator {name}", "rung": name, "cut": RUNGS[name], "params": n, "pte": pte,
                     "method": "forward", "shapes": [list(a.shape) for a in inputs]})
        programs[rows[-1]["program"]] = (pte, "forward", inputs)
    print("[DC-AE decoder] ...", flush=True)
    pte = args.out / "dc_ae_decoder.pte"
    n = export_decoder(args.out / "dc_ae", pte)
    import numpy as np

    z = np.random.default_rng(0).standard_normal((1, 32, LATENT, LATENT)).astype(np.float32)
    rows.append({"program": "DC-AE decoder", "rung": None, "cut": None, "params": n, "pte": pte, "method": "decode",
                 "shapes": [list(z.shape)]})
    programs["DC-AE decoder"] = (pte, "decode", [z])
    if fresh:  # the exports' memory stays with this process: time in a fresh one (all six loaded: ~15 GiB)
        print("re-running in a fresh process for the measurements ...", flush=True)
        os.execv(sys.executable, [sys.executable, __file__, *(sys.argv[1:] if argv is None else argv)])
    print("peak memory (fresh processes) ...", flush=True)
    base = peak_rss(None, "", [], args.threads)
    for r in rows:
        r["peak_rss_mib"] = peak_rss(r["pte"], r["method"], r["shapes"], args.threads)
    print("timing (nothing else should run now) ...", flush=True)
    lat = latencies(programs, args.repeats, args.threads)
    write(args, rows, lat, base)


def write(args, rows, lat, base) -> None:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").is_file() else ""
    first = rows[0]
    lines = ["| program | blocks / cross heads / FFN ch. | parameters | .pte | latency (s) | peak RSS (MiB) |",
             "|---|---|---|---|---|---|"]
    table = []
    for r in rows:
        gen = r["rung"] is not None
        ratio = f" ({r['params'] / first['params']:.2f}x)" if gen else ""
        lat_ratio = f" ({lat[r['program']] / lat[first['program']]:.2f}x)" if gen else ""
        cut = " / ".join(map(str, r["cut"])) if gen else "-"
        size = r["pte"].stat().st_size
        lines.append(f"| {r['program']} | {cut} | {r['params'] / 1e6:.1f}M{ratio} | {size / 2**30:.2f} GiB | "
                     f"{lat[r['program']]:.2f}{lat_ratio} | {r['peak_rss_mib']:,.0f} |")
        table.append({k: v for k, v in r.items() if k != "pte"} | {"pte_bytes": size, "latency_s": lat[r["program"]]})
    meta = {"cpu": cpu, "cpu_count": os.cpu_count(), "executorch_threads": args.threads, "repeats": args.repeats,
            "peak_rss_without_program_mib": round(base), "weights": "float32, random"}
    text = "\n".join(lines) + "\n\n" + ", ".join(f"{k}: {v}" for k, v in meta.items()) + "\n"
    (args.out / "results.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps({"rows": table, **meta}, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
