"""The feature space of the benchmark's Fréchet distance: a small CNN trained once on the shapes dataset.

The network reads a 32x32 image and predicts which (colour, shape) pairs it contains, how many objects there
are, and the spatial relation of a pair; its 128-d penultimate activations are the features. FD is the
Fréchet distance between Gaussian fits of two feature sets (as FID, with this network in place of
Inception). Trained with `python -m sprintjax.bench.features --out sprintjax/assets/shapes_features.safetensors`
(seed 0, 1500 steps of batch 128, about a minute on 2 cores) and shipped in the repository.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import safetensors.numpy
from scipy import linalg

from sprintjax.bench import shapes

PAIRS = [(c, s) for c in shapes.COLORS for s in shapes.SHAPES]
RELS = [None, *shapes.RELATIONS]
WEIGHTS = Path(__file__).parents[1] / "assets" / "shapes_features.safetensors"


class FeatureNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        for ch, stride in ((32, 1), (64, 2), (128, 2), (128, 2)):
            x = nn.relu(nn.Conv(ch, (3, 3), strides=(stride, stride))(x))
        feats = nn.relu(nn.Dense(128)(jnp.mean(x, axis=(1, 2))))
        return feats, (nn.Dense(len(PAIRS))(feats), nn.Dense(2)(feats), nn.Dense(len(RELS))(feats))


def _labels(scenes):
    pairs = np.zeros((len(scenes), len(PAIRS)), np.float32)
    for i, sc in enumerate(scenes):
        for o in sc.objects:
            pairs[i, PAIRS.index((o.color, o.shape))] = 1
    count = np.array([len(sc.objects) - 1 for sc in scenes])
    rel = np.array([RELS.index(sc.relation) for sc in scenes])
    return pairs, count, rel


def _prep(images):
    return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


def train(steps: int = 1500, batch: int = 128, seed: int = 0, log=print) -> dict:
    net = FeatureNet()
    params = net.init(jax.random.key(seed), jnp.zeros((1, 32, 32, 3)))["params"]
    tx = optax.adam(1e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x, pairs, count, rel):
        def loss_fn(p):
            _, (lp, lc, lr) = net.apply({"params": p}, x)
            return (optax.sigmoid_binary_cross_entropy(lp, pairs).mean()
                    + optax.softmax_cross_entropy_with_integer_labels(lc, count).mean()
                    + optax.softmax_cross_entropy_with_integer_labels(lr, rel).mean())
        loss, g = jax.value_and_grad(loss_fn)(params)
        upd, opt = tx.update(g, opt)
        return optax.apply_updates(params, upd), opt, loss

    for i in range(steps):
        images, scenes = shapes.sample_images("train", batch, start=(seed * 10_000_000) + i * batch)
        params, opt, loss = step(params, opt, _prep(images), *map(jnp.asarray, _labels(scenes)))
        if (i + 1) % 250 == 0:
            log(f"feature net step {i + 1}/{steps}: loss {float(loss):.4f}")
    return params


def save(params, path: Path) -> None:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    flat = {jax.tree_util.keystr(k): np.ascontiguousarray(v) for k, v in leaves}
    safetensors.numpy.save_file(flat, str(path))


def load(path: Path = WEIGHTS):
    template = jax.eval_shape(lambda: FeatureNet().init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"])
    flat = safetensors.numpy.load_file(str(path))
    leaves = jax.tree_util.tree_flatten_with_path(template)[0]
    missing = [jax.tree_util.keystr(k) for k, _ in leaves if jax.tree_util.keystr(k) not in flat]
    if missing:
        raise ValueError(f"{path} lacks feature-net tensors {missing[:3]}")
    return jax.tree.unflatten(jax.tree.structure(template), [flat[jax.tree_util.keystr(k)] for k, _ in leaves])


@jax.jit
def _features(params, x):
    return FeatureNet().apply({"params": params}, x)[0]


def features(params, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """uint8 [N, 32, 32, 3] -> [N, 128] features."""
    return np.concatenate([np.asarray(_features(params, _prep(images[i:i + batch])))
                           for i in range(0, len(images), batch)])


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2}) of Gaussian fits (float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    eye = np.eye(a.shape[1]) * 1e-6  # ReLU features have dead units: keep the covariances invertible
    s_a, s_b = np.cov(a, rowvar=False) + eye, np.cov(b, rowvar=False) + eye
    covmean, _ = linalg.sqrtm(s_a @ s_b, disp=False)
    covmean = covmean.real
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a + s_b - 2 * covmean))


def main(argv=None):
    p = argparse.ArgumentParser(description="Train the benchmark's feature network once and save it.")
    p.add_argument("--out", default=str(WEIGHTS))
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    params = train(a.steps, seed=a.seed)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    save(params, Path(a.out))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
