"""The benchmark's distance: zero for identical sets, small between two samples of the data, and growing with
corruption; the shipped feature network loads and sees what it was trained on."""

import numpy as np
import pytest

from sprintjax.bench import features, shapes


@pytest.fixture(scope="module")
def net():
    return features.load()


def test_frechet_distance_of_gaussians_has_its_closed_form():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((20000, 3))
    b = rng.standard_normal((20000, 3)) * 2.0 + 1.0  # mean shift 1 per dim, std 2
    # ||mu||^2 + tr(I + 4I - 2 * 2I) = 3 + 3 * (1 + 4 - 4) = 6
    assert features.frechet_distance(a, b) == pytest.approx(6.0, rel=0.05)
    assert abs(features.frechet_distance(a, a)) < 1e-6


def test_distance_ranks_corruption(net):
    imgs, scenes = shapes.sample_images("validation", 600)
    ref = features.features(net, imgs)
    other = features.features(net, shapes.sample_images("validation", 600, start=600)[0])
    rng = np.random.default_rng(0)
    dists = []
    for sigma in (10, 30, 60):
        noisy = np.clip(imgs + rng.normal(0, sigma, imgs.shape), 0, 255).astype(np.uint8)
        dists.append(features.frechet_distance(ref, features.features(net, noisy)))
    same = features.frechet_distance(ref, other)
    assert same < dists[0] < dists[1] < dists[2]
    _, (_, count_logits, _) = features.FeatureNet().apply({"params": net}, features._prep(imgs))
    assert float((np.asarray(count_logits).argmax(1) == [len(s.objects) - 1 for s in scenes]).mean()) > 0.95
