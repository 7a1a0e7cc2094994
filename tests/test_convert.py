"""Conversion is strict, atomic and pickle-free: every bad input is one clear error and nothing is written."""

import json
import shutil

import numpy as np
import pytest
import safetensors.numpy

from sprintjax import convert
from sprintjax.convert.diffusers_io import INDEX, WEIGHTS, read_state_dict
from sprintjax.errors import CheckpointError, SprintjaxError


@pytest.fixture
def folder(diffusers_models, tmp_path):
    """A private copy of a saved diffusers model, safe to damage."""
    dst = tmp_path / "model"
    shutil.copytree(diffusers_models["sprint_p2"][3], dst)
    return dst


def _rewrite(folder, fn):
    state = read_state_dict(folder)
    fn(state)
    safetensors.numpy.save_file(state, str(folder / WEIGHTS))


def test_every_offending_key_is_named_once_and_nothing_is_written(folder, tmp_path):
    def damage(state):
        del state["transformer_blocks.1.attn2.to_k.weight"]
        del state["caption_norm.weight"]
        state["transformer_blocks.0.ff.conv_depth.weight"] = np.zeros((3, 1, 3, 3), np.float32)
        state["extra.tensor"] = np.zeros(2, np.float32)

    _rewrite(folder, damage)
    with pytest.raises(CheckpointError) as err:
        convert.import_diffusers(folder, tmp_path / "out")
    msg = str(err.value)
    assert "4 problem(s)" in msg
    assert "missing: transformer_blocks.1.attn2.to_k.weight (expected shape (16, 16))" in msg
    assert "missing: caption_norm.weight (expected shape (16,))" in msg
    assert "misshaped: transformer_blocks.0.ff.conv_depth.weight: expected (80, 1, 3, 3), found (3, 1, 3, 3)" in msg
    assert "unexpected: extra.tensor (shape (2,))" in msg
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary leftovers


def test_config_that_does_not_match_the_weights(folder, tmp_path):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["qk_norm"] = None  # the weights still carry norm_q / norm_k
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unexpected: transformer_blocks.0.attn1.norm_k.weight"):
        convert.import_diffusers(folder, tmp_path / "out")


def test_unknown_config_key_and_bad_json(folder, tmp_path):
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "rope_theta": 1.0}))
    with pytest.raises(CheckpointError, match="unknown SanaTransformer2DModel config keys: \\['rope_theta'\\]"):
        convert.import_diffusers(folder, tmp_path / "out")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        convert.import_diffusers(folder, tmp_path / "out")


def test_corrupt_safetensors_is_refused(folder, tmp_path):
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or not safetensors"):
        convert.import_diffusers(folder, tmp_path / "out")


def test_pickle_files_are_never_loaded(folder, tmp_path):
    (folder / WEIGHTS).unlink()
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04 not to be unpickled")
    with pytest.raises(CheckpointError, match="pickle files are never loaded"):
        convert.import_diffusers(folder, tmp_path / "out")


def test_sharded_weights_with_index(folder, diffusers_models, tmp_path):
    state = read_state_dict(folder)
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        safetensors.numpy.save_file({k: state[k] for k in ks}, str(folder / name))
    (folder / INDEX).write_text(json.dumps({"weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    (folder / WEIGHTS).unlink()
    params, _ = convert.diffusers_to_params(folder)
    ref, _ = convert.diffusers_to_params(diffusers_models["sprint_p2"][3])
    for a, b in zip(np.asarray(params["proj_out"]["kernel"]), np.asarray(ref["proj_out"]["kernel"]), strict=True):
        np.testing.assert_array_equal(a, b)
    # A shard that goes missing is named.
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002"):
        convert.diffusers_to_params(folder)


def test_outputs_are_not_overwritten_without_force(folder, tmp_path):
    convert.import_diffusers(folder, tmp_path / "ckpt")
    with pytest.raises(SprintjaxError, match="already exists; pass --force"):
        convert.import_diffusers(folder, tmp_path / "ckpt")
    convert.import_diffusers(folder, tmp_path / "ckpt", force=True)
    convert.export_diffusers(tmp_path / "ckpt", tmp_path / "back")
    with pytest.raises(SprintjaxError, match="already exists"):
        convert.export_diffusers(tmp_path / "ckpt", tmp_path / "back")


def test_params_checkpoint_that_does_not_match_its_config(folder, tmp_path):
    params, cfg = convert.diffusers_to_params(folder)
    params["proj_out"]["bias"] = np.zeros(3, np.float32)
    del params["caption_norm"]
    convert.save_params(tmp_path / "ckpt", params, cfg)
    with pytest.raises(CheckpointError) as err:
        convert.load_params(tmp_path / "ckpt")
    assert "missing: ['caption_norm']['weight']" in str(err.value)
    assert "misshaped: ['proj_out']['bias']: expected (16,), found (3,)" in str(err.value)
    with pytest.raises(CheckpointError, match="params do not match the model config"):
        convert.params_to_diffusers(tmp_path / "x", params, cfg)
    assert not (tmp_path / "x").exists()
    with pytest.raises(CheckpointError, match="no model_config.json"):
        convert.load_params(tmp_path)
