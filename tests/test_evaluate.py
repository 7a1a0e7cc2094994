"""`sprintjax eval` end to end on a small prepared shapes dataset and random-weight models."""

import json

import jax
import pytest

from sprintjax import scm
from sprintjax.cli import main
from sprintjax.convert import save_params
from sprintjax.model import SanaTransformer
from sprintjax.model_config import ModelConfig

TEACHER = ModelConfig(in_channels=48, out_channels=48, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                      num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32,
                      caption_channels=384, sample_size=8, qk_norm="rms_norm_across_heads")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    assert main(["prepare-data", "--shapes", "--num", "4", "--num-validation", "24", "--vae", "builtin-s2d",
                 "--text-encoder", "minilm", "--max-length", "16", "--batch-size", "8", "--out",
                 str(root / "data")]) == 0
    tparams = SanaTransformer(TEACHER).init(jax.random.key(0))
    save_params(root / "teacher", tparams, TEACHER)
    scfg, sparams = scm.init_student(TEACHER, tparams, jax.random.key(1))
    save_params(root / "student", sparams["net"], scfg)
    return root


def test_eval_reports_every_method_with_the_same_prompts(setup, capsys):
    out = setup / "results"
    assert main(["eval", "--data", str(setup / "data"), "--teacher", str(setup / "teacher"), "--teacher-steps",
                 "4,1", "--student", str(setup / "student"), "--student-steps", "1,2", "--num", "24",
                 "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["teacher_4", "teacher_1", "student_1", "student_2"]
    assert [r["nfe"] for r in results.values()] == [8, 2, 1, 2]  # CFG doubles the teacher's evaluations
    for r in results.values():
        assert r["fd"] > 0 and 0 <= r["compositional"] <= 1 and r["latency_s"] > 0 and r["throughput_per_s"] > 0
    assert "| teacher_4 |" in (out / "results.md").read_text()
    assert (out / "grid.png").is_file()
    assert main(["eval", "--data", str(setup / "data"), "--out", str(out)]) == 2


def test_flow_euler_and_trigflow_euler_of_the_teacher_agree_with_many_steps(setup):
    """Table 1's premise: both solvers integrate the same ODE (Prop. 3.1), so they meet as steps grow."""
    import numpy as np

    from sprintjax.bench import evaluate
    from sprintjax.convert import load_model
    from sprintjax.data import pipeline

    params, cfg = load_model(setup / "teacher")
    model = SanaTransformer(cfg)
    caption, mask, _ = evaluate.prompts(setup / "data", 4)
    null = pipeline.load_null_caption(setup / "data")[0]
    noise = evaluate.noise_for(4, 1, cfg.in_channels)
    gap = []
    for n in (4, 32):
        flow = evaluate.teacher_sampler(model, params, null, n)[0](noise, caption, mask)
        trig = evaluate.teacher_sampler(model, params, null, n, solver="trigflow")[0](noise, caption, mask)
        gap.append(float(np.max(np.abs(np.asarray(flow) - np.asarray(trig)))))
    assert gap[1] < gap[0] / 4, gap
