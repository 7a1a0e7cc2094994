"""Training data: records written and read back, per-process blocks, exact resume, and prepare-data with real
(tiny, random-weight) AutoencoderDC and Gemma-2 encoders loaded from local folders."""

import functools

import numpy as np
import pytest
import torch
from PIL import Image

from sprintjax.data import pipeline
from sprintjax.data.prepare import find_pairs, prepare

SHAPES = {"latents": (4, 8, 8), "caption": (5, 12), "caption_mask": (5,)}


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    make = functools.partial(pipeline.synthetic_examples, 40, SHAPES, 0)
    return pipeline.write_records(tmp_path_factory.mktemp("rec"), {"train": make}, SHAPES, np.ones((5, 12)),
                                  np.ones(5))


def test_global_batches_are_the_same_for_any_process_count_and_resume_exactly(records):
    one = pipeline.train_iterator(records, "train", 8, seed=3)
    ref = [next(one)["latents"] for _ in range(7)]  # crosses an epoch boundary (40 examples)
    parts = [pipeline.train_iterator(records, "train", 8, 3, p, 4) for p in range(4)]
    for k in range(7):
        np.testing.assert_array_equal(np.concatenate([next(it)["latents"] for it in parts]), ref[k])
    again = pipeline.train_iterator(records, "train", 8, seed=3)
    next(again)
    state = again.get_state()
    resumed = pipeline.train_iterator(records, "train", 8, seed=3)
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["latents"], ref[1])
    caption, mask = pipeline.load_null_caption(records)
    assert caption.shape == (5, 12) and mask.dtype == np.int32


def test_worker_processes_give_the_same_stream(records):
    import absl.flags

    absl.flags.FLAGS.mark_as_parsed()  # grain workers read absl flags (the CLI does this)
    plain = pipeline.train_iterator(records, "train", 8, seed=5)
    workers = pipeline.train_iterator(records, "train", 8, seed=5, worker_count=2)
    for _ in range(3):
        np.testing.assert_array_equal(next(workers)["latents"], next(plain)["latents"])


def test_missing_records_and_splits_are_clear_errors(records, tmp_path):
    with pytest.raises(pipeline.DataError, match="no training records under"):
        pipeline.open_split(tmp_path, "train")
    with pytest.raises(pipeline.DataError, match="has no split 'validation'"):
        pipeline.open_split(records, "validation")
    with pytest.raises(pipeline.DataError, match="does not divide over 3 processes"):
        pipeline.train_iterator(records, "train", 8, 0, 0, 3)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    from sprintjax.convert.torch_ref import tiny_encoders

    return tiny_encoders(tmp_path_factory.mktemp("enc"))


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a red circle left of a blue square" if i % 2 else "two green triangles")
    return folder


def test_prepare_data_encodes_with_the_real_encoders_and_resumes(encoders, images, tmp_path, monkeypatch):
    from transformers import AutoModel, AutoTokenizer

    from sprintjax.data import prepare as prep

    vae, te = encoders
    pairs = find_pairs(images=str(images))
    calls = {"n": 0}
    original = prep.ImageEncoder.__call__

    def flaky(self, paths):  # the run dies after two batches ...
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, paths)

    monkeypatch.setattr(prep.ImageEncoder, "__call__", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare({"train": pairs}, tmp_path / "out", str(vae), str(te), resolution=32, max_length=6, batch_size=2,
                progress=False)
    assert len(list((tmp_path / "out" / ".staging").glob("train_*.safetensors"))) == 2
    monkeypatch.setattr(prep.ImageEncoder, "__call__", original)
    calls["n"] = 0
    folder = prepare({"train": pairs}, tmp_path / "out", str(vae), str(te), resolution=32, max_length=6,
                     batch_size=2, progress=False)  # ... and the rerun encodes only the last batch
    assert not (tmp_path / "out" / ".staging").exists()
    src = pipeline.open_split(folder, "train")
    assert len(src) == 5
    ex = src[1]
    assert ex["latents"].shape == (4, 16, 16) and ex["caption"].shape == (6, 16)
    # Check against the encoders used directly.
    from diffusers import AutoencoderDC

    model = AutoencoderDC.from_pretrained(vae).eval()
    loader = prep.ImageEncoder(str(vae), 32)
    pixels = np.stack([loader.pixels(pairs[0][0]), loader.pixels(pairs[1][0])])  # batched as prepare batched them:
    img = pixels.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0
    with torch.no_grad():  # oneDNN's kernels for batch 1 and 2 round differently on some CPUs
        lat = model.encode(torch.from_numpy(img)).latent.numpy()[1] * 0.41407
    np.testing.assert_allclose(ex["latents"], lat, rtol=1e-5, atol=1e-6)
    tok = AutoTokenizer.from_pretrained(te)
    ids = tok([pairs[1][1]], padding="max_length", max_length=6, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = AutoModel.from_pretrained(te).eval()(**ids)[0].numpy()[0]
    np.testing.assert_allclose(ex["caption"], hidden, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ex["caption_mask"], ids.attention_mask.numpy()[0])
    null, null_mask = pipeline.load_null_caption(folder)
    assert null.shape == (6, 16) and null_mask.tolist() == [1, 0, 0, 0, 0, 0]  # "" is just <bos>


def test_instruction_prefix_keeps_the_first_and_last_tokens(encoders):
    from sprintjax.data.prepare import TextEncoder

    enc = TextEncoder(str(encoders[1]), max_length=4, instruction="the big one of ")
    cap, mask = enc(["red circle"])
    assert cap.shape == (1, 4, 16) and enc.total == 4 + len(enc.tokenizer.encode("the big one of ")) - 2
    # <bos> + 'the big one of red circle' = 7 tokens in 6 slots (truncated): the last 3 kept after <bos>.
    assert mask.tolist() == [[1, 1, 1, 1]]


def test_null_caption_is_the_bare_empty_prompt_even_with_an_instruction(encoders):
    """facts §3: "" padded to max_length, no instruction, no token selection (not the caption path)."""
    from transformers import AutoModel, AutoTokenizer

    from sprintjax.data.prepare import TextEncoder

    enc = TextEncoder(str(encoders[1]), max_length=4, instruction="the big one of ")
    null, null_mask = enc.encode_null()
    tok = AutoTokenizer.from_pretrained(encoders[1])
    ids = tok([""], padding="max_length", max_length=4, truncation=True, return_tensors="pt")
    with torch.no_grad():
        want = AutoModel.from_pretrained(encoders[1]).eval()(**ids)[0].numpy()[0]
    np.testing.assert_allclose(null, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(null_mask, ids.attention_mask.numpy()[0])
    as_caption, _ = enc([""])  # the instruction-prefixed encoding this replaces
    assert np.abs(as_caption[0] - null).max() > 1e-3


def test_find_pairs_errors(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(pipeline.DataError, match="has no caption file a.txt"):
        find_pairs(images=str(tmp_path))
    (tmp_path / "c.jsonl").write_text('{"image": "missing.png", "caption": "x"}\n')
    with pytest.raises(pipeline.DataError, match="not found"):
        find_pairs(captions_jsonl=str(tmp_path / "c.jsonl"))


def test_prepare_shapes_with_builtin_autoencoder_and_minilm(tmp_path):
    """The embedded dataset goes through prepare-data like real data: both splits, lossless latents, MiniLM."""
    from sprintjax.bench import shapes
    from sprintjax.cli import main

    out = tmp_path / "shapes"
    assert main(["prepare-data", "--shapes", "--num", "12", "--num-validation", "6", "--vae", "builtin-s2d",
                 "--text-encoder", "minilm", "--max-length", "16", "--batch-size", "5", "--out", str(out)]) == 0
    train, val = pipeline.open_split(out, "train"), pipeline.open_split(out, "validation")
    assert len(train) == 12 and len(val) == 6
    imgs, scenes = shapes.sample_images("validation", 6)
    got = np.stack([val[i]["latents"] for i in range(6)])
    np.testing.assert_array_equal(shapes.decode(got), imgs)  # lossless, and in source order
    assert val[0]["caption"].shape == (16, 384)
    n_tokens = int(val[0]["caption_mask"].sum())
    assert n_tokens == len(scenes[0].caption.split()) + 2  # [CLS] words [SEP]
    null, mask = pipeline.load_null_caption(out)
    assert null.shape == (16, 384) and int(mask.sum()) == 2
