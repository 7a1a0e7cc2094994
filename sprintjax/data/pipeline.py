"""Writing and reading training records: ArrayRecord + TFDS metadata, read by grain with per-process shards.

Each process reads only its own rows of every global batch: global batch k is examples [k B, (k + 1) B) of
the shuffled, repeated stream, and process p reads the contiguous block [k B + p b, k B + (p + 1) b) with
b = B / processes. So the global batch (and every loss) is the same on 1 process or many, and
`jax.make_array_from_process_local_data` assembles it without moving data between hosts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import grain
import numpy as np
import safetensors.numpy

from sprintjax.errors import SprintjaxError

NULL_CAPTION = "null_caption.safetensors"


class DataError(SprintjaxError):
    """Missing or unreadable training data."""


def write_records(data_dir: str | Path, splits: dict[str, Callable[[], Iterable[dict]]], shapes: dict[str, tuple],
                  null_caption: np.ndarray, null_mask: np.ndarray) -> Path:
    """Writes splits as ArrayRecord with TFDS metadata, plus the null-caption embedding; returns the folder."""
    from sprintjax.data.builder import LatentTextRecords

    builder = LatentTextRecords(shapes=shapes, splits=splits, data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    out = Path(builder.data_dir)
    safetensors.numpy.save_file({"caption": np.ascontiguousarray(null_caption, np.float32),
                                 "mask": np.ascontiguousarray(null_mask, np.int32)}, str(out / NULL_CAPTION))
    return out


def find_records(data_dir: str | Path) -> Path:
    """The dataset version folder below `data_dir` (the folder itself if it holds dataset_info.json)."""
    root = Path(data_dir)
    if (root / "dataset_info.json").is_file():
        return root
    found = sorted(root.glob("*/*/dataset_info.json"))
    if not found:
        raise DataError(f"no training records under {root} (expected a TFDS dataset folder with "
                        f"dataset_info.json; run `sprintjax prepare-data` first)")
    return found[-1].parent


def open_split(data_dir: str | Path, split: str):
    """A random-access source of one split (no TensorFlow needed)."""
    import tensorflow_datasets as tfds

    path = find_records(data_dir)
    builder = tfds.builder_from_directory(str(path))
    if split not in builder.info.splits:
        raise DataError(f"{path} has no split {split!r} (it has {sorted(builder.info.splits)})")
    files = list(path.glob(f"*-{split}.array_record*"))
    if not files:
        raise DataError(f"the record files of split {split!r} are missing from {path}")
    return builder.as_data_source(split)


def first_records(data_dir: str | Path, split: str, n: int, keys) -> dict[str, np.ndarray]:
    """The first n records of a split (fewer if it has fewer), each key stacked into one float32 array."""
    source = open_split(data_dir, split)
    examples = [source[i] for i in range(min(n, len(source)))]
    return {k: np.stack([e[k] for e in examples]).astype(np.float32) for k in keys}


def load_null_caption(data_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    path = find_records(data_dir) / NULL_CAPTION
    if not path.is_file():
        raise DataError(f"{path} is missing: the null-caption embedding is stored with the dataset")
    tensors = safetensors.numpy.load_file(str(path))
    return tensors["caption"], tensors["mask"]


class ProcessBlocks(grain.MapDataset):
    """Element i of process p: row p * b + i % b of global batch i // b (see the module docstring)."""

    def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int, process_count: int):
        super().__init__(parent)
        self._gb, self._p, self._local = global_batch, process_index, global_batch // process_count

    def __len__(self) -> int:
        return (len(self._parent) // self._gb) * self._local

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        step, row = divmod(index, self._local)
        return self._parent[step * self._gb + self._p * self._local + row]


def _as_batch(ex: dict) -> dict:
    batch = {"latents": ex["latents"].astype(np.float32), "caption": ex["caption"].astype(np.float32),
             "caption_mask": ex["caption_mask"].astype(np.float32)}
    if "control" in ex:  # ControlNet records
        batch["control"] = ex["control"].astype(np.float32)
    return batch


def train_iterator(data_dir, split: str, global_batch: int, seed: int, process_index: int = 0,
                   process_count: int = 1, worker_count: int = 0, prefetch: int = 2):
    """An endless, seeded, checkpointable iterator of this process's share of each global batch.

    The iterator has `get_state()` / `set_state()`; restoring a state resumes the exact same stream.
    """
    if global_batch % process_count:
        raise DataError(f"global batch {global_batch} does not divide over {process_count} processes")
    source = open_split(data_dir, split)
    ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat()
    ds = ProcessBlocks(ds, global_batch, process_index, process_count)
    ds = ds.batch(global_batch // process_count, drop_remainder=True).map(_as_batch)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, prefetch), prefetch_buffer_size=prefetch))
    if worker_count > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(it)


def synthetic_examples(n: int, shapes: dict[str, tuple], seed: int):
    """Deterministic smooth random latents with random caption embeddings and lengths (for smoke configs)."""
    rng = np.random.default_rng(seed)
    c, h, w = shapes["latents"]
    length, width = shapes["caption"]
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    for _ in range(n):
        freq = rng.uniform(1, 3, (c, 2))
        phase = rng.uniform(0, 2 * np.pi, (c, 1, 1))
        lat = np.sin(2 * np.pi * (freq[:, :1, None] * yy + freq[:, 1:, None] * xx) + phase)
        lat = lat + 0.1 * rng.standard_normal((c, h, w))
        keep = rng.integers(1, length + 1)
        mask = (np.arange(length) < keep).astype(np.int32)
        cap = (rng.standard_normal((length, width)) * mask[:, None]).astype(np.float32)
        yield {"latents": lat.astype(np.float32), "caption": cap, "caption_mask": mask}
