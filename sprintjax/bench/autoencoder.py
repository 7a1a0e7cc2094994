"""The shapes benchmark's learned autoencoder (`--vae builtin-ae`): 32x32 RGB <-> 8x8x8 latents.

SANA diffuses in the latent space of its DC-AE, whose latents are smooth and low-dimensional; the benchmark's
lossless space-to-depth latents (`builtin-s2d`, 48 channels of raw 4x4 pixel patches with hard edges) are
neither. This small convolutional KL autoencoder plays the DC-AE's part for the miniature: a downsampling
by 4 to 8 channels (6x fewer numbers than the pixels), trained with a light KL term (weight `KL_WEIGHT`, as
latent-diffusion VAEs) so that nearby latents decode to nearby images. Latents are the posterior means times
`scaling_factor` (unit standard deviation, as SANA's 0.41407).

Like the DC-AE, which is trained on generic images apart from any text-to-image data, it is trained without
captions on its own `codec` split of scenes (every colour/shape pair, other seeds than train and validation).
Trained on the training split instead, it learnt that split's pairs and decoded held-out ones as seen ones (a
yellow triangle as a yellow circle): 0.61 compositional on reconstructions of held-out scenes against 0.99 on
the others, a ceiling on every model trained on its latents that the lossless `builtin-s2d` does not have.
The generator still never sees a held-out pair: its training records are encoded training-split images. A
first design with a wider receptive field was worse still (0.83 overall); this one stays local (~12 pixels).

Trained once with `python -m sprintjax.bench.autoencoder` (seed 0; ~15 minutes on 2 CPU cores), which also prints
the reconstruction figures, and shipped as `sprintjax/assets/shapes_ae.safetensors` (see assets/README.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import safetensors.numpy

from sprintjax.bench import shapes

LATENT_CHANNELS = 8
KL_WEIGHT = 1e-4
WEIGHTS = Path(__file__).parents[1] / "assets" / "shapes_ae.safetensors"


class Encoder(nn.Module):
    @nn.compact
    def __call__(self, x):  # [B, 32, 32, 3] in [-1, 1] -> mean, logvar [B, 8, 8, C]
        x = _space_to_depth(x)  # [B, 16, 16, 12]
        x = nn.silu(nn.Conv(64, (3, 3))(x))
        x = nn.silu(nn.Conv(64, (2, 2), strides=(2, 2), padding="VALID")(x))  # [B, 8, 8, 64]
        x = nn.silu(nn.Conv(64, (1, 1))(x))
        moments = nn.Conv(2 * LATENT_CHANNELS, (1, 1))(x)
        return moments[..., :LATENT_CHANNELS], jnp.clip(moments[..., LATENT_CHANNELS:], -20.0, 10.0)


class Decoder(nn.Module):
    @nn.compact
    def __call__(self, z):  # [B, 8, 8, C] -> [B, 32, 32, 3] in about [-1, 1]
        x = nn.silu(nn.Conv(64, (1, 1))(z))
        x = nn.silu(nn.Conv(64, (3, 3))(x))
        x = _depth_to_space(nn.Conv(4 * 64, (1, 1))(x))  # [B, 16, 16, 64]
        x = nn.silu(nn.Conv(64, (3, 3))(x))
        return _depth_to_space(nn.Conv(12, (1, 1))(x))


def _space_to_depth(x):  # [B, H, W, C] -> [B, H/2, W/2, 4C]
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h // 2, w // 2, 4 * c)


def _depth_to_space(x):  # inverse of _space_to_depth
    b, h, w, c = x.shape
    return x.reshape(b, h, w, 2, 2, c // 4).transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, c // 4)


def _pixels(images):
    return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


def init(seed: int = 0) -> dict:
    ke, kd = jax.random.split(jax.random.key(seed))
    return {"encoder": Encoder().init(ke, jnp.zeros((1, 32, 32, 3)))["params"],
            "decoder": Decoder().init(kd, jnp.zeros((1, 8, 8, LATENT_CHANNELS)))["params"]}


def _loss(params, x, rng):
    """Reconstruction MSE of a posterior sample + KL_WEIGHT * KL(q(z|x) || N(0, I)) per latent element."""
    mean, logvar = Encoder().apply({"params": params["encoder"]}, x)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
    rec = jnp.mean(jnp.square(Decoder().apply({"params": params["decoder"]}, z) - x))
    kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return rec + KL_WEIGHT * kl, (rec, kl)


def train(steps: int = 3000, batch: int = 64, lr: float = 1e-3, seed: int = 0, log=print) -> dict:
    """The autoencoder on fresh scenes of the uncaptioned `codec` split (every colour/shape pair, seeds apart
    from train and validation); returns params with `scaling_factor` set from 2048 further codec scenes."""
    params = init(seed)
    tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, lr, 200, steps, lr * 0.02))
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x, rng):
        (loss, (rec, kl)), g = jax.value_and_grad(_loss, has_aux=True)(params, x, rng)
        upd, opt = tx.update(g, opt)
        return optax.apply_updates(params, upd), opt, rec, kl

    key, start = jax.random.key(seed + 1), time.time()
    for i in range(steps):
        images, _ = shapes.sample_images("codec", batch, start=seed * 10_000_000 + i * batch)
        params, opt, rec, kl = step(params, opt, _pixels(images), jax.random.fold_in(key, i))
        if (i + 1) % 250 == 0:
            log(f"autoencoder step {i + 1}/{steps}: reconstruction {float(rec):.5f}, kl {float(kl):.3f} "
                f"({time.time() - start:.0f} s)")
    images, _ = shapes.sample_images("codec", 2048, start=9_999_000)
    mean = np.concatenate([np.asarray(_mean(params["encoder"], _pixels(images[i:i + 256])))
                           for i in range(0, 2048, 256)])
    return dict(params, scaling_factor=np.asarray(1.0 / mean.std(), np.float32))


@jax.jit
def _mean(enc_params, x):
    return Encoder().apply({"params": enc_params}, x)[0]


@jax.jit
def _decode(dec_params, z):
    return Decoder().apply({"params": dec_params}, z)


def encode(params, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """uint8 [B, 32, 32, 3] -> latents [B, LATENT_CHANNELS, 8, 8] (posterior means times the scaling factor)."""
    out = [np.asarray(_mean(params["encoder"], _pixels(images[i:i + batch]))) for i in range(0, len(images), batch)]
    return (np.concatenate(out) * params["scaling_factor"]).transpose(0, 3, 1, 2)


def _decoded(params, latents: np.ndarray, batch: int) -> np.ndarray:
    z = np.asarray(latents, np.float32).transpose(0, 2, 3, 1) / params["scaling_factor"]
    return np.concatenate([np.asarray(_decode(params["decoder"], z[i:i + batch])) for i in range(0, len(z), batch)])


def decode(params, latents: np.ndarray, batch: int = 256) -> np.ndarray:
    """latents [B, LATENT_CHANNELS, 8, 8] -> uint8 [B, 32, 32, 3]."""
    return np.clip(np.round((_decoded(params, latents, batch) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def decode_unit(params, latents: np.ndarray, batch: int = 256) -> np.ndarray:
    """latents [B, LATENT_CHANNELS, 8, 8] -> float32 [B, 32, 32, 3] in [0, 1] (the mobile decoder's output)."""
    return np.clip((_decoded(params, latents, batch) + 1.0) / 2.0, 0.0, 1.0)


def save(params, path: Path) -> None:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    flat = {jax.tree_util.keystr(k): np.ascontiguousarray(v) for k, v in leaves}
    tmp = Path(path).with_suffix(".tmp")
    safetensors.numpy.save_file(flat, str(tmp))
    tmp.replace(path)  # atomic


def load(path: Path = WEIGHTS) -> dict:
    template = jax.eval_shape(lambda: dict(init(), scaling_factor=jnp.zeros((), jnp.float32)))
    flat = safetensors.numpy.load_file(str(path))
    leaves = jax.tree_util.tree_flatten_with_path(template)[0]
    missing = [jax.tree_util.keystr(k) for k, _ in leaves if jax.tree_util.keystr(k) not in flat]
    if missing:
        raise ValueError(f"{path} lacks autoencoder tensors {missing[:3]}")
    return jax.tree.unflatten(jax.tree.structure(template), [flat[jax.tree_util.keystr(k)] for k, _ in leaves])


def reconstruction_report(params, n: int = 1000) -> dict:
    """What the latent space costs the benchmark: PSNR, FD and compositional score of the reconstructions of
    the first n validation renders (held-out combinations included) against the renders themselves."""
    from sprintjax.bench import detector, features

    images, scenes = shapes.sample_images("validation", n)
    rec = decode(params, encode(params, images))
    mse = np.mean(np.square(rec.astype(np.float64) - images.astype(np.float64)))
    feat = features.load()
    return {"psnr_db": float(10 * np.log10(255.0**2 / mse)),
            "fd": features.frechet_distance(features.features(feat, rec), features.features(feat, images)),
            "compositional": detector.compositional_score(rec, scenes)["compositional"]}


def main(argv=None):
    p = argparse.ArgumentParser(description="Train the shapes benchmark's autoencoder once and save it "
                                            "(or, with --report-only, measure saved weights).")
    p.add_argument("--out", default=str(WEIGHTS))
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report-only", action="store_true", help="measure the weights at --out without training")
    a = p.parse_args(argv)
    if not a.report_only:
        params = train(a.steps, seed=a.seed)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        save(params, Path(a.out))
        print(f"wrote {a.out} (scaling factor {float(params['scaling_factor']):.5f})", flush=True)
    params = load(Path(a.out))
    print("reconstructions of 1000 validation renders:", json.dumps(reconstruction_report(params)))


if __name__ == "__main__":
    main()
