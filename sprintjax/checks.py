"""Input and output checks shared by the commands: arrays that must be finite numbers, images that must
decode, weights that must be finite. Each failure is a SprintjaxError naming the thing, the sample and the
index, raised before a model loads (inputs) or before anything is written (outputs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sprintjax.errors import SprintjaxError


def nonfinite_samples(a: np.ndarray) -> list[int]:
    """Indices along the first axis (samples) holding a NaN or an Inf."""
    a = np.asarray(a)
    if a.ndim == 0:
        return [] if np.isfinite(a) else [0]
    return np.flatnonzero(~np.isfinite(a.reshape(a.shape[0], -1)).all(axis=1)).tolist()


def finite_input(a: np.ndarray, what: str, sample_axis: int = 0) -> np.ndarray:
    """`a` as float32 if it is a finite real array; else an error naming the first bad sample and element."""
    a = np.asarray(a)
    if a.dtype.kind not in "fiub":
        raise SprintjaxError(f"{what} must be a real numeric array, got dtype {a.dtype}")
    a = a.astype(np.float32)
    bad = np.argwhere(~np.isfinite(a))
    if len(bad):
        first = tuple(int(i) for i in bad[0])
        samples = sorted({int(i[sample_axis]) for i in bad}) if a.ndim > sample_axis else []
        raise SprintjaxError(f"{what} holds {len(bad)} non-finite value(s) (NaN/Inf), in sample(s) {samples[:10]}; "
                             f"the first at index {list(first)}: {a[first]}")
    return a


def finite_output(a: np.ndarray, what: str, inputs: str = "") -> None:
    """Refuses a non-finite result before it is written, naming the samples (and what fed them)."""
    bad = nonfinite_samples(a)
    if bad:
        raise SprintjaxError(f"{what}: sample(s) {bad[:10]} of {len(a)} came out non-finite (NaN/Inf); nothing "
                             f"was written.{' ' + inputs if inputs else ''}")


def finite_params(params, what: str) -> None:
    """Weights that hold a NaN or Inf are refused, naming the first leaves."""
    import jax

    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    bad = [jax.tree_util.keystr(p) for p, leaf in flat if not np.all(np.isfinite(np.asarray(leaf)))]
    if bad:
        raise SprintjaxError(f"{what} holds non-finite weights in {bad[:5]}{' ...' if len(bad) > 5 else ''}")


def images_decode(paths: list[Path]) -> None:
    """Every image opens and decodes fully (checked before any model loads); one error lists the bad ones."""
    from PIL import Image

    bad = []
    for p in paths:
        if isinstance(p, np.ndarray):
            continue
        try:
            with Image.open(p) as img:
                img.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            bad.append(f"{p} ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    if bad:
        raise SprintjaxError(f"{len(bad)} image(s) cannot be decoded: " + "; ".join(bad[:5])
                             + (" ..." if len(bad) > 5 else ""))
