"""`make demo` on a tiny budget: dataset, distillation, export, benchmark, and the files a user is told about.
(A random-weight teacher of the benchmark's architecture stands in for the shipped one, to keep it short.)"""

import json

import jax

from sprintjax.bench import demo
from sprintjax.configlib import load_config
from sprintjax.convert import params_to_diffusers
from sprintjax.model import SanaTransformer


def test_demo_pipeline_smoke(tmp_path, capsys):
    data = demo.ensure_dataset(tmp_path / "data", num=64, num_validation=16)
    teacher_cfg = load_config(str(demo.REPO / "configs" / "shapes.py"))
    from sprintjax.configlib import resolve

    cfg = resolve(teacher_cfg).model
    params_to_diffusers(tmp_path / "teacher", SanaTransformer(cfg).init(jax.random.key(0)), cfg)
    results = demo.run_demo(tmp_path / "demo", data, [
        "--config.train.num_steps=4", "--config.train.ckpt_every=4", "--config.train.sample_every=0",
        "--config.train.log_every=2", "--config.data.global_batch=8", "--config.distill.disc_virtual_batch=4",
        f"--config.train.teacher_checkpoint={tmp_path / 'teacher'}"], num_eval=16)
    assert list(results) == ["teacher_20", "teacher_1", "student_1", "student_2", "student_4"]
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    for name, r in saved.items():
        assert {"fd", "compositional", "latency_s", "nfe"} <= r.keys(), name
    assert saved["teacher_20"]["nfe"] == 40 and saved["student_1"]["nfe"] == 1
    for f in ("results.md", "grid.png", "student/model_config.json", "student_diffusers/config.json"):
        assert (tmp_path / "demo" / f).exists(), f
    assert list((tmp_path / "demo" / "train" / "tensorboard").glob("events.*"))
    out = capsys.readouterr().out
    assert "[5/5]" in out and "grid.png" in out
    # Steps 1 and 3 are generator steps, 2 and 4 discriminator steps: each half of the run has one of each.
    health = json.loads((tmp_path / "demo" / "training.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "demo" / "train" / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in rows}
    for key, step in (("d_acc_real", 4), ("adv_loss", 3), ("scm_loss", 3), ("tangent_warmup", 3)):
        assert health[key]["second_half"] == by_step[step][key], key
    assert 0.0 <= health["d_acc_fake"]["first_half"] <= 1.0
    assert "| d_acc_real |" in out
