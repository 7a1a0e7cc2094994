"""The embedded dataset: deterministic scenes, a held-out split, a lossless autoencoder, and a detector whose
accuracy on the dataset's own images is measured (it must be perfect on clean renders)."""

import numpy as np

from sprintjax.bench import detector, shapes


def test_scenes_are_deterministic_and_splits_differ():
    a, sa = shapes.sample_images("train", 20)
    b, sb = shapes.sample_images("train", 20)
    assert np.array_equal(a, b) and [s.caption for s in sa] == [s.caption for s in sb]
    v, _ = shapes.sample_images("validation", 20)
    assert not np.array_equal(a, v)
    assert np.array_equal(shapes.sample_images("train", 5, start=7)[0], a[7:12])  # a pure function of the index


def test_held_out_combinations_appear_only_in_validation():
    _, train = shapes.sample_images("train", 3000)
    _, val = shapes.sample_images("validation", 1000)
    combos = lambda scenes: {(o.color, o.shape) for s in scenes for o in s.objects}  # noqa: E731
    assert not combos(train) & shapes.HELD_OUT
    assert shapes.HELD_OUT <= combos(val)
    kinds = {s.kind for s in train}
    assert kinds == {"single", "count", "relation"}
    assert any("to the left of" in s.caption for s in train) and any("two" in s.caption for s in train)


def test_space_to_depth_autoencoder_is_lossless():
    imgs, _ = shapes.sample_images("validation", 16)
    lat = shapes.encode(imgs)
    assert lat.shape == (16, shapes.LATENT_CHANNELS, 8, 8)
    assert 0.5 < float(lat.std()) < 1.5  # about unit scale, like a VAE's scaled latents
    assert np.array_equal(shapes.decode(lat), imgs)


def test_detector_is_exact_on_ground_truth_and_fails_on_wrong_images():
    imgs, scenes = shapes.sample_images("validation", 400)
    score = detector.compositional_score(imgs, scenes)
    assert score["compositional"] == 1.0  # detector accuracy on the dataset's own images
    assert {"compositional_single", "compositional_count", "compositional_relation"} <= score.keys()
    flipped = imgs[:, :, ::-1]  # mirrored: left/right relations break, the rest still holds
    rel = [i for i, s in enumerate(scenes) if s.relation in ("to the left of", "to the right of")]
    assert detector.compositional_score(flipped[rel], [scenes[i] for i in rel])["compositional"] == 0.0
    shuffled = detector.compositional_score(imgs, scenes[1:] + scenes[:1])["compositional"]
    assert shuffled < 0.1  # captions paired with the wrong images
    blank = np.full_like(imgs, 128)
    assert detector.compositional_score(blank, scenes)["compositional"] == 0.0


def test_detector_reads_shapes_and_positions():
    sc = shapes.Scene("relation", (shapes.Obj("red", "circle", 8, 16, 5), shapes.Obj("blue", "triangle", 24, 16, 5)),
                      "a red circle to the left of a blue triangle", "to the left of")
    found = {(d.color, d.shape) for d in detector.detect(shapes.render(sc))}
    assert found == {("red", "circle"), ("blue", "triangle")}
    assert detector.satisfied(sc, detector.detect(shapes.render(sc)))
