"""The TFDS builder of sprintjax training records: precomputed latents, caption embeddings and masks.

The VAE and the text encoder run offline (the paper's setting), so a record is
{"latents": [C, H, W] float32 (VAE scale), "caption": [L, C_text] float32, "caption_mask": [L] int32}, plus
"control": [C, H, W] float32 (a control image's latents) in ControlNet data.
Records are written as ArrayRecord and read back with `tfds.builder_from_directory(...).as_data_source`,
which needs neither TensorFlow nor this class. The null-caption embedding is stored beside the records
(`null_caption.safetensors`), since the teacher's CFG needs it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import tensorflow_datasets as tfds


class LatentTextRecords(tfds.core.GeneratorBasedBuilder):
    """A dataset whose examples come from a Python iterable (built by `write_records`)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "latents + caption embeddings + caption masks"}

    def __init__(self, *, shapes: dict[str, tuple] | None = None,
                 splits: dict[str, Callable[[], Iterable[dict]]] | None = None, **kwargs):
        self._shapes, self._splits = shapes, splits or {}
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        s = self._shapes
        return self.dataset_info_from_configs(
            description="SANA-Sprint training records: VAE latents and text-encoder caption embeddings.",
            disable_shuffling=True,  # records keep the source order; grain shuffles at read time
            features=tfds.features.FeaturesDict({
                "latents": tfds.features.Tensor(shape=s["latents"], dtype=np.float32),
                "caption": tfds.features.Tensor(shape=s["caption"], dtype=np.float32),
                "caption_mask": tfds.features.Tensor(shape=s["caption_mask"], dtype=np.int32),
                **({"control": tfds.features.Tensor(shape=s["control"], dtype=np.float32)} if "control" in s
                   else {}),
            }))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {name: self._generate_examples(make) for name, make in self._splits.items()}

    def _generate_examples(self, make):
        yield from enumerate(make())
