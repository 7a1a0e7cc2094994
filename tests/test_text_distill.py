"""Text-encoder distillation (issue 22): a smaller MiniLM that learns the large one's caption embeddings and the
student's early block features, written as a folder prepare-data and export-mobile read like the original."""

import jax
import numpy as np
import pytest
from conftest import tiny

from sprintjax.cli import main


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    from sprintjax.convert import save_params
    from sprintjax.model import SanaTransformer

    cfg = tiny(in_channels=8, out_channels=8, caption_channels=384, guidance_embeds=True)
    path = tmp_path_factory.mktemp("text") / "student"
    save_params(path, SanaTransformer(cfg).init(jax.random.key(5)), cfg)
    return path


def test_small_encoder_learns_the_large_ones_embeddings_on_held_out_captions(student, tmp_path, capsys):
    from transformers import AutoModel

    from sprintjax.bench import shapes
    from sprintjax.data.prepare import TextEncoder, resolve_text_encoder

    out = tmp_path / "small"
    argv = ["distill-text", str(student), str(out), "--text-encoder", "minilm", "--shapes", "400", "--layers", "2",
            "--caption-len", "16", "--steps", "60", "--batch", "32", "--lr", "3e-4"]
    assert main(argv) == 0
    assert "layers [0, 5] kept" in capsys.readouterr().out
    big_folder = resolve_text_encoder("minilm")
    assert AutoModel.from_pretrained(out).config.num_hidden_layers == 2
    held_out = [sc.caption for sc in shapes.sample_images("validation", 64)[1]]
    big = TextEncoder(big_folder, 16)
    want, mask = big(held_out)

    def error(encoder):
        got, got_mask = encoder(held_out)
        assert np.array_equal(got_mask, mask)
        w = mask[..., None]
        return float(np.sum((got - want) ** 2 * w) / np.sum(want**2 * w))

    init = TextEncoder(big_folder, 16)  # the initialisation: the big encoder's layers 0 and 5, untrained
    init.model.encoder.layer = type(init.model.encoder.layer)([init.model.encoder.layer[i] for i in (0, 5)])
    trained = error(TextEncoder(str(out), 16))
    assert trained < 0.5 * error(init), (trained, error(init))


def test_distill_text_refusals_write_nothing(student, tmp_path, capsys):
    out = tmp_path / "x"
    base = ["distill-text", str(student), str(out), "--text-encoder", "minilm", "--shapes", "8", "--steps", "1"]
    for extra, message in ((["--layers", "6"], "--layers must be in 1..5"),
                           (["--feature-blocks", "9"], "--feature-blocks must be in 1..2")):
        assert main(base + extra) == 2, extra
        assert message in capsys.readouterr().err
        assert not out.exists()
