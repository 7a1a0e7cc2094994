"""Control data, the ControlNet teacher stage, controlled distillation and the edge-agreement score."""

import json

import jax
import numpy as np
import pytest
from conftest import tiny

from sprintjax.data import edges
from sprintjax.errors import ConfigError
from sprintjax.train import train

SHAPES = "configs/shapes.py"


def test_edge_f1_closed_forms():
    ref = np.zeros((1, 16, 16), bool)
    ref[0, 4:12, 4] = ref[0, 4:12, 11] = ref[0, 4, 4:12] = ref[0, 11, 4:12] = True  # a square outline
    assert edges.edge_f1(ref, ref)[0] == 1.0
    shifted = np.roll(ref, 1, axis=2)
    assert edges.edge_f1(shifted, ref, tolerance=1.0)[0] == 1.0
    assert edges.edge_f1(shifted, ref, tolerance=0.0)[0] == 0.5  # 14 of 28 pixels overlap, both ways
    half = ref.copy()
    half[0, :, :8] = False  # the right half of the outline: precision 1, recall = its share of the pixels
    recall = half.sum() / ref.sum()
    assert np.isclose(edges.edge_f1(half, ref, tolerance=0.0)[0], 2 * recall / (1 + recall))
    empty = np.zeros_like(ref)
    assert edges.edge_f1(empty, empty)[0] == 1.0 and edges.edge_f1(empty, ref)[0] == 0.0
    with pytest.raises(ValueError, match="both be"):
        edges.edge_f1(ref, ref[0])


def test_canny_traces_a_rectangle_and_nothing_else():
    img = np.full((1, 32, 32, 3), 128, np.uint8)
    img[0, 8:24, 10:20] = (220, 40, 40)
    e = edges.canny(img)[0]
    yy, xx = np.mgrid[0:32, 0:32]
    # distance of each pixel to the rectangle's border (between pixel rows/columns 7.5 / 23.5, 9.5 / 19.5)
    inside = (yy >= 8) & (yy < 24) & (xx >= 10) & (xx < 20)
    border = inside ^ ((yy >= 9) & (yy < 23) & (xx >= 11) & (xx < 19)) | \
        (~inside & (yy >= 7) & (yy < 25) & (xx >= 9) & (xx < 21))
    assert e.sum() > 30 and not (e & ~border).any()
    imgs = edges.control_images(e[None], edges.SHAPES_COLORS)
    assert imgs.dtype == np.uint8 and (imgs[0][e] == (230, 210, 40)).all() and (imgs[0][~e] == 128).all()


@pytest.fixture(scope="module")
def control_data(tmp_path_factory):
    from sprintjax.bench import shapes
    from sprintjax.data.prepare import prepare

    root = tmp_path_factory.mktemp("control_data")
    prepare(shapes.caption_pairs(16, 4), root / "data", "builtin-ae", "minilm", max_length=16, batch_size=8,
            progress=False, source="shapes", control="canny")
    return root


def test_records_hold_the_canny_control_latents_of_each_image(control_data):
    from sprintjax.bench import shapes
    from sprintjax.data import pipeline

    src = pipeline.open_split(control_data / "data", "validation")
    images, _ = shapes.sample_images("validation", 4)
    encode = shapes.latent_codec("builtin-ae")[0]
    want = encode(edges.control_images(edges.canny(images), edges.SHAPES_COLORS))
    got = np.stack([src[i]["control"] for i in range(4)])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert not np.allclose(got, np.stack([src[i]["latents"] for i in range(4)]))


def test_control_images_from_a_folder_and_their_errors(tmp_path):
    from PIL import Image

    from sprintjax.bench import shapes
    from sprintjax.data import pipeline
    from sprintjax.data.pipeline import DataError
    from sprintjax.data.prepare import find_pairs, prepare

    (tmp_path / "img").mkdir()
    (tmp_path / "ctl").mkdir()
    rng = np.random.default_rng(0)
    controls = rng.integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)).save(tmp_path / "img" / f"{i}.png")
        (tmp_path / "img" / f"{i}.txt").write_text(f"caption {i}")
        if i < 2:
            Image.fromarray(controls[i]).save(tmp_path / "ctl" / f"{i}.png")
    pairs = {"train": find_pairs(str(tmp_path / "img"))}
    with pytest.raises(DataError, match=r"1 control image\(s\) missing"):
        prepare(pairs, tmp_path / "out", "builtin-s2d", "minilm", 32, 16, progress=False, control=str(tmp_path / "ctl"))
    assert not (tmp_path / "out").exists()
    Image.fromarray(controls[2]).save(tmp_path / "ctl" / "2.png")
    prepare(pairs, tmp_path / "out", "builtin-s2d", "minilm", 32, 16, progress=False, control=str(tmp_path / "ctl"))
    src = pipeline.open_split(tmp_path / "out", "train")
    back = shapes.decode(np.stack([src[i]["control"] for i in range(3)]))  # the lossless space: exact pixels
    assert np.array_equal(back, controls)


def _cfg(variant, data, workdir_overrides=()):
    from sprintjax.configlib import load_config, parse_overrides

    cfg = load_config(f"{SHAPES}:{variant}")
    return parse_overrides(cfg, [f"--config.data.dir={data}", "--config.data.global_batch=4",
                                 "--config.train.log_every=1", "--config.train.sample_every=0",
                                 *workdir_overrides])


def test_controlnet_stage_then_controlled_distillation_then_eval(control_data, tmp_path, capsys):
    """The ControlNet trains on the frozen teacher (only its params stored), exports, is distilled with the
    teacher into a student + student ControlNet (both trained, the teacher's ControlNet frozen), and the
    benchmark scores the controlled teacher and student with the edge F1 under a control-map row."""
    from sprintjax.bench import evaluate
    from sprintjax.checkpoints import trained_params
    from sprintjax.cli import main
    from sprintjax.convert import load_controlnet, save_params

    data = control_data / "data"
    stage = tmp_path / "cn"
    train(_cfg("controlnet", data, ["--config.train.num_steps=3", "--config.train.ckpt_every=3"]), stage)
    cn_params, cn_cfg, step = trained_params(stage, "params")
    assert step == 3 and cn_cfg.num_layers == 2
    state = json.loads((stage / "config.json").read_text())
    assert state["train"]["stage"] == "controlnet"
    assert float(np.abs(cn_params["controlnet_blocks"]["kernel"]).max()) > 0  # the zero linears moved
    save_params(tmp_path / "cn_export", cn_params, cn_cfg, controlnet=True)

    distil = tmp_path / "distil"
    train(_cfg("controlnet_distill", data, ["--config.train.num_steps=2", "--config.train.ckpt_every=2",
                                            "--config.distill.warmup_steps_g=0",
                                            f"--config.control.teacher_checkpoint={tmp_path / 'cn_export'}"]),
          distil)
    student_cn, s_cfg, _ = trained_params(distil, "student_control")
    assert s_cfg.guidance_embeds and s_cfg.num_layers == 2
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                         {k: student_cn[k] for k in ("input_block", "controlnet_blocks")},
                         {k: cn_params[k] for k in ("input_block", "controlnet_blocks")})
    assert max(jax.tree.leaves(moved)) > 0  # the student's ControlNet trained
    teacher_cn, _ = load_controlnet(tmp_path / "cn_export")
    assert np.array_equal(teacher_cn["input_block"]["kernel"], cn_params["input_block"]["kernel"])
    s_params, scfg, _ = trained_params(distil, "student")
    save_params(tmp_path / "student", s_params, scfg.replace(remat="none"))
    save_params(tmp_path / "student_cn", student_cn, s_cfg.replace(remat="none"), controlnet=True)

    from PIL import Image

    from sprintjax.configlib import load_config

    out = tmp_path / "eval"
    teacher = load_config(SHAPES).train.teacher_checkpoint
    assert main(["eval", "--data", str(data), "--teacher", teacher, "--teacher-controlnet", str(tmp_path / "cn_export"),
                 "--teacher-steps", "2", "--student", str(tmp_path / "student"), "--student-controlnet",
                 str(tmp_path / "student_cn"), "--student-steps", "1", "--num", "4", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"teacher_2", "student_1"}
    assert all(0.0 <= r["edge_f1"] <= 1.0 for r in results.values())
    assert "edge_f1" in (out / "results.md").read_text()
    assert Image.open(out / "grid.png").size[1] == 3 * 36 * 4  # the control maps, then one row per method
    # a ControlNet given for a model that is not evaluated is refused before anything loads
    with pytest.raises(Exception, match="no model to drive"):
        evaluate.run_benchmark(data, out, {"teacher": teacher}, {"teacher": [1]}, 4,
                               controlnets={"student": str(tmp_path / "student_cn")})
    _check_serving(distil, tmp_path)


def _check_serving(run, tmp_path):
    """export-diffusers writes the student's ControlNet beside its transformer, and SanaSprintPipeline's loop on
    the exported PyTorch transformer + ControlNet samples as sprintjax does at 1, 2 and 4 steps; export-mobile
    --control runs in onnxruntime like sprintjax's sampler (its ExecuTorch lowering, a minute of XNNPACK here,
    is checked on a smaller model: test_controlled_generator_lowers_to_executorch)."""
    from diffusers import SanaTransformer2DModel

    from sprintjax import trigflow
    from sprintjax.cli import main
    from sprintjax.controlnet import SanaControlNet
    from sprintjax.convert import load_controlnet, load_model, torch_ref
    from sprintjax.convert.torch_controlnet import SanaSprintControlNetModel
    from sprintjax.model import SanaTransformer
    from sprintjax.sampling import sample_latents

    assert main(["export-diffusers", str(run), str(tmp_path / "pipe")]) == 0
    transformer = SanaTransformer2DModel.from_pretrained(tmp_path / "pipe" / "transformer")
    controlnet, info = SanaSprintControlNetModel.from_pretrained(tmp_path / "pipe" / "controlnet",
                                                                 output_loading_info=True)
    assert not any(info.values()), info
    params, cfg = load_model(tmp_path / "pipe")
    cn_params, cn_cfg = load_controlnet(tmp_path / "pipe")  # the pipeline folder's controlnet/
    rng = np.random.default_rng(0)
    caption = rng.standard_normal((2, 16, cfg.caption_channels)).astype(np.float32)
    mask = np.ones((2, 16), np.float32)
    mask[1, 9:] = 0
    control = rng.standard_normal((2, cfg.in_channels, 8, 8)).astype(np.float32)
    noise = rng.standard_normal((4, 2, cfg.in_channels, 8, 8)).astype(np.float32)
    for steps in (1, 2, 4):
        ours = np.asarray(sample_latents(SanaTransformer(cfg), params, caption, mask, noise[:steps],
                                         trigflow.schedule(steps), controlnet=SanaControlNet(cn_cfg),
                                         control_params=cn_params, control=control))
        theirs = torch_ref.diffusers_sample(transformer, caption, mask, noise[:steps], steps, controlnet=controlnet,
                                            control=control)
        err = float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))
        assert err < 1e-4, (steps, err)
    np.save(tmp_path / "e.npy", caption)  # a student distilled with a ControlNet is not sampled without it
    assert main(["sample", str(tmp_path / "pipe"), "--caption-embeds", str(tmp_path / "e.npy"), "--out",
                 str(tmp_path / "x.npy")]) == 2
    assert not (tmp_path / "x.npy").exists()
    assert main(["export-mobile", str(run), str(tmp_path / "mobile"), "--control", "--weights", "float32",
                 "--caption-len", "16", "--formats", "onnx"]) == 0
    report = json.loads((tmp_path / "mobile" / "export.json").read_text())
    assert sorted(report["artifacts"]) == ["sana_sprint_control_1step_float32.onnx"]
    assert all(a["rel_err_vs_sprintjax"] < 1e-4 for a in report["artifacts"].values()), report["artifacts"]


def test_control_configs_are_checked_before_the_workdir_exists(control_data, tmp_path):
    from sprintjax.configlib import load_config, parse_overrides, resolve

    with pytest.raises(ConfigError, match="set control.num_layers >= 1"):
        resolve(parse_overrides(load_config(f"{SHAPES}:controlnet"), ["--config.control.num_layers=0"]))
    with pytest.raises(ConfigError, match="needs 1 <= n < the transformer's 4"):
        resolve(parse_overrides(load_config(f"{SHAPES}:controlnet"), ["--config.control.num_layers=4"]))
    with pytest.raises(ConfigError, match="a ControlNet trains in stage 'controlnet'"):
        resolve(parse_overrides(load_config(f"{SHAPES}:teacher"), ["--config.control.num_layers=2"]))
    with pytest.raises(ConfigError, match="set control.teacher_checkpoint"):
        train(_cfg("controlnet_distill", control_data / "data", ["--config.control.teacher_checkpoint="]),
              tmp_path / "a")
    from sprintjax.bench import shapes
    from sprintjax.data.prepare import prepare

    prepare(shapes.caption_pairs(8, 2), tmp_path / "plain", "builtin-ae", "minilm", max_length=16, batch_size=8,
            progress=False, source="shapes")
    with pytest.raises(ConfigError, match="has no control latents"):
        train(_cfg("controlnet", tmp_path / "plain"), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_controlled_generator_lowers_to_executorch(tmp_path):
    """The controlled generator (a fourth input, the ControlNet's block samples added in the graph) lowered by
    XNNPACK runs in ExecuTorch like sprintjax's sampler; random weights of a two-block model with a trained-looking
    (non-zero) ControlNet, so the control input matters."""
    from sprintjax.controlnet import SanaControlNet, controlnet_config
    from sprintjax.convert import mobile
    from sprintjax.model import SanaTransformer

    cfg = tiny(guidance_embeds=True, qk_norm="rms_norm_across_heads")
    params = SanaTransformer(cfg).init(jax.random.key(0))
    cn_cfg = controlnet_config(cfg, 1)
    cn_params = SanaControlNet(cn_cfg).from_transformer(params)
    cn_params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(1), a.shape), cn_params)
    report = mobile.export_mobile(params, cfg, tmp_path / "mobile", weights=["float32"], formats=["pte"],
                                  caption_len=6, controlnet=(cn_params, cn_cfg), log=lambda _: None)
    (name, art), = report["artifacts"].items()
    assert name == "sana_sprint_control_1step_float32.pte" and art["rel_err_vs_sprintjax"] < 1e-5, art
