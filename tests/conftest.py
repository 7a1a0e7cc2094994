"""Shared fixtures: tiny configs covering every model option, and random-weight diffusers models saved once."""

import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests check what programs compute, not how fast they run: with XLA:CPU's backend optimisations and its
# fusion emitters off, compiling (most of this suite's time) takes about a third as long (the tiny distillation
# run's generator step: 15.3 -> 4.6 s; the whole run 42 -> 22 s), and results differ only by rounding.
USER_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
TEST_XLA_FLAGS = f"{USER_XLA_FLAGS} {FAST_COMPILE}".strip()
os.environ["XLA_FLAGS"] = TEST_XLA_FLAGS
# Items that mostly run rather than compile keep the optimisations (trigflow_transform samples 100 prompts x 20
# steps twice: 43 s optimised, 81 s unoptimised, 39 s with the fusion emitters off alone).
RUN_HEAVY = {"notebooks/trigflow_transform.ipynb": "--xla_cpu_use_fusion_emitters=false"}
# Two xdist workers share two cores: one OpenMP thread each, so that torch's threads beside another test do not
# oversubscribe them (test_text_distill, torch-heavy: 51 s in one run of the suite, 147 s in the next).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from sprintjax.model_config import ModelConfig  # noqa: E402

# pytest-xdist hands tests to its two workers in collection order, one or two at a time (pyproject: -n 2
# --maxschedchunk 1): the longest go first so that no long test starts last and runs alone, and the first two
# differ in whether they need the shared reference run (else one worker waits while the other trains it).
LONGEST_FIRST = ("tests/test_control_training.py::test_controlnet_stage_then_controlled_distillation_then_eval",
                 "tests/test_export.py", "notebooks/jvp_stability.ipynb", "tests/test_train.py",
                 "tests/test_mobile_pipeline.py", "tests/test_demo.py", "notebooks/trigflow_transform.ipynb",
                 "tests/test_aot.py", "tests/test_text_distill.py", "notebooks/distill_step_walkthrough.ipynb",
                 "tests/test_recover.py")


def named(item, prefix: str) -> bool:
    """Whether `prefix` (a file or a test's node id) names the item."""
    return item.nodeid == prefix or item.nodeid.startswith(prefix + "::")


def pytest_collection_modifyitems(items):
    def rank(item):
        return next((i for i, prefix in enumerate(LONGEST_FIRST) if named(item, prefix)), len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: file order within each file


class RunHeavyFlags:
    """A RUN_HEAVY notebook's kernel starts with its own XLA flags (a kernel reads them when it starts).
    A plugin, not a hook of this file: this conftest's own run-time hooks see only the items under tests/."""

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item):
        flags = next((f for prefix, f in RUN_HEAVY.items() if named(item, prefix)), None)
        if flags is None:
            return (yield)
        os.environ["XLA_FLAGS"] = f"{USER_XLA_FLAGS} {flags}".strip()
        try:
            return (yield)
        finally:
            os.environ["XLA_FLAGS"] = TEST_XLA_FLAGS


def pytest_configure(config):
    config.pluginmanager.register(RunHeavyFlags(), "sprintjax-run-heavy-flags")


def tiny(**kw) -> ModelConfig:
    base = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
                caption_channels=12, sample_size=8)
    base.update(kw)
    return ModelConfig(**base)


# Every option of facts §7 appears in at least one config; latents of several aspect ratios.
PARITY_CONFIGS = {
    "plain_p1": (tiny(), (8, 8)),
    "sprint_p2": (tiny(patch_size=2, guidance_embeds=True, qk_norm="rms_norm_across_heads", attention_bias=True,
                       norm_elementwise_affine=True), (8, 12)),
    "cross_shape_p2": (tiny(patch_size=2, qk_norm="rms_norm_across_heads", num_cross_attention_heads=4,
                            cross_attention_head_dim=4, out_channels=6, num_layers=3, mlp_ratio=2.0), (6, 10)),
    "guidance_p1": (tiny(guidance_embeds=True, caption_channels=20, norm_eps=1e-5), (4, 16)),
}


@pytest.fixture(scope="session")
def diffusers_models(tmp_path_factory):
    """name -> (config, (H, W), torch model, saved folder); built once per test session."""
    from sprintjax.convert import torch_ref

    root = tmp_path_factory.mktemp("diffusers")
    out = {}
    for i, (name, (cfg, hw)) in enumerate(PARITY_CONFIGS.items()):
        model = torch_ref.random_diffusers_model(cfg, seed=i)
        model.save_pretrained(root / name)
        out[name] = (cfg, hw, model, root / name)
    return out


def inputs(cfg, hw, batch=2, length=5, seed=0, guidance=None):
    """Model inputs with a padded caption in the second sample."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, cfg.in_channels, *hw)).astype(np.float32)
    y = rng.standard_normal((batch, length, cfg.caption_channels)).astype(np.float32)
    mask = np.ones((batch, length), np.float32)
    mask[1:, 3:] = 0
    t = rng.uniform(0.05, 0.95, batch).astype(np.float32)
    g = rng.uniform(0.3, 0.5, batch).astype(np.float32) if cfg.guidance_embeds else None
    return x, t, y, mask, g


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


# ---------------------------------------------------------------- real `sprintjax train` runs (tiny config)
ROOT = Path(__file__).resolve().parents[1]
SPRINTJAX = str(Path(sys.executable).parent / "sprintjax")
STEPS = 16
# A low learning rate keeps the GAN dynamics from amplifying float32 rounding between device layouts.
COMMON = [f"--config.train.num_steps={STEPS}", "--config.train.ckpt_every=4", "--config.train.log_every=4",
          "--config.distill.lr_g=1e-5", "--config.distill.lr_d=1e-5"]


def xla_env(devices=1):
    """The environment of a subprocess with `devices` fake CPU devices (and this suite's compile flags)."""
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}")


def run(workdir, *extra, config="configs/tiny.py", devices=1, check=True, timeout=600):
    env = xla_env(devices)
    cmd = [SPRINTJAX, "train", "--config", config, "--workdir", str(workdir), *COMMON, *extra]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode:
        raise AssertionError(f"exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return out


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """Every `sprintjax train` (and notebook) subprocess of a session shares a persistent JAX compilation
    cache, as a pod job's restarts would: a run whose programs an earlier run compiled starts in about half the
    time, and loads the very same executables (the bitwise resume checks compare runs that share them)."""
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_compilation_cache"))


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """An uninterrupted run on one device: the baseline every other run is compared with. Made once per
    session: the first xdist worker to need it trains it, the other waits for it (a file lock in their shared
    temporary root) instead of training the same run beside it. Tests only read it (or copy it)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's root, shared by its workers (never by another session)
    wd, log = root / "reference" / "run", root / "reference" / "output.json"
    with FileLock(str(root / "reference.lock")):
        if not log.is_file():
            out = run(wd, "--config.train.diag_every=8", "--config.train.diag_bins=4")  # diagnostics change no state
            log.write_text(json.dumps({"stdout": out.stdout, "stderr": out.stderr}))
    out = json.loads(log.read_text())
    return wd, subprocess.CompletedProcess([], 0, out["stdout"], out["stderr"])
