"""Embedded demo data: Fashion-MNIST from Debian's ``dataset-fashion-mnist``, else scikit-learn's digits."""

from __future__ import annotations

import gzip
import itertools
import logging
import math
import os
from collections.abc import Sequence

import numpy as np

from .sources import GENERATED_CAPTIONS_NOTE, template_captions
from .writer import ArrayImage, ShardSample, WriteSummary, write_shards

logger = logging.getLogger(__name__)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_TEMPLATES = (
    "a photo of a {}.", "a grayscale photo of a {}.", "a low-resolution photo of a {}.", "a product photo of a {}.",
)
DIGITS_CLASSES = tuple(str(digit) for digit in range(10))
DIGITS_TEMPLATES = (
    "a handwritten digit {}.", "a low-resolution scan of the handwritten digit {}.",
    "a grayscale image of the number {}.", "the digit {} written by hand.",
)
DEFAULT_SIZES = {"fashion-mnist": (10_000, 2_000), "digits": (1_397, 400)}


def resolve_demo_source(source: str = "auto", fashion_mnist_dir: str | os.PathLike = FASHION_MNIST_DIR) -> str:
    """``"fashion-mnist"`` if asked for or (with ``"auto"``) if its files are installed, else ``"digits"``."""
    if source not in ("auto", "fashion-mnist", "digits"):
        raise ValueError(f"demo source must be 'auto', 'fashion-mnist' or 'digits', not {source!r}")
    if source != "auto":
        return source
    installed = os.path.isfile(os.path.join(fashion_mnist_dir, "t10k-labels-idx1-ubyte.gz"))
    return "fashion-mnist" if installed else "digits"


def write_demo(
    out_dir: str | os.PathLike,
    *,
    source: str = "auto",
    train_size: int | None = None,
    val_size: int | None = None,
    max_samples_per_shard: int = 1000,
    workers: int = 1,
    seed: int = 0,
    fashion_mnist_dir: str | os.PathLike = FASHION_MNIST_DIR,
    progress: bool = True,
) -> dict[str, WriteSummary]:
    """Write ``out_dir/train`` and ``out_dir/val`` shards of labelled, template-captioned demo images.

    Fashion-MNIST (28x28 gray): class-stratified subsets of the official train split (default 10,000) and test
    split (default 2,000). Digits (8x8 gray): a fixed class-stratified split of all 1,797 images (default
    1,397 / 400), intensities 0..16 mapped to round(v * 255 / 16), not resized. Images keep their native size
    (the loader's transforms resize them); captions come from class names through templates and are marked so.
    """
    name = resolve_demo_source(source, fashion_mnist_dir)
    default_train, default_val = DEFAULT_SIZES[name]
    sizes = (default_train if train_size is None else train_size, default_val if val_size is None else val_size)
    if name == "fashion-mnist":
        splits = _fashion_mnist(fashion_mnist_dir, sizes, seed)
        class_names, templates = FASHION_MNIST_CLASSES, FASHION_MNIST_TEMPLATES
    else:
        splits = _digits(sizes, seed)
        class_names, templates = DIGITS_CLASSES, DIGITS_TEMPLATES
    logger.info("demo source: %s; captions are generated from class names through templates", name)
    summaries = {}
    for number, (split, (images, labels, indices, pixel_note)) in enumerate(splits.items()):
        captions = template_captions(labels, class_names, templates, seed + number)
        samples = [
            ShardSample(
                ArrayImage(image), label=int(label), caption=caption,
                metadata={"source": name, "split": split, "index": int(index), "label": int(label),
                          "class_name": class_names[label], "caption_source": "template", "template": template},
            )
            for image, label, index, (caption, template) in zip(images, labels, indices, captions)
        ]
        info = {
            "source": name, "split": split, "class_names": list(class_names), "caption_source": "template",
            "caption_templates": list(templates), "captions_note": GENERATED_CAPTIONS_NOTE, "pixels": pixel_note,
            "license": _LICENSES[name],
        }
        summaries[split] = write_shards(
            samples, os.path.join(out_dir, split), dataset_info=info, prefix=split,
            max_samples_per_shard=max_samples_per_shard, workers=workers, shuffle_seed=seed, progress=progress,
        )
    return summaries


_LICENSES = {
    "fashion-mnist": "Fashion-MNIST, Copyright 2017 Zalando SE, MIT (Expat) licence; Debian dataset-fashion-mnist",
    "digits": "UCI optical recognition of handwritten digits (test set), as bundled with scikit-learn",
}

_Split = tuple[np.ndarray, np.ndarray, np.ndarray, str]


def _fashion_mnist(directory: str | os.PathLike, sizes: tuple[int, int], seed: int) -> dict[str, _Split]:
    note = "official 28x28 8-bit grayscale pixels, unchanged"
    splits = {}
    for split, official, size in (("train", "train", sizes[0]), ("val", "t10k", sizes[1])):
        images = _read_idx(os.path.join(directory, f"{official}-images-idx3-ubyte.gz"), dimensions=3)
        labels = _read_idx(os.path.join(directory, f"{official}-labels-idx1-ubyte.gz"), dimensions=1)
        (indices,) = _stratified_chunks(labels, [size], seed)
        splits[split] = (images[indices], labels[indices], indices, note)
    return splits


def _digits(sizes: tuple[int, int], seed: int) -> dict[str, _Split]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exn:
        raise ImportError(
            "the demo needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist) "
            "or scikit-learn (pip install scikit-learn)"
        ) from exn
    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    labels = digits.target
    note = "8x8 scikit-learn digits, intensity v in 0..16 stored as round(v * 255 / 16), not resized"
    train, val = _stratified_chunks(labels, list(sizes), seed)
    return {"train": (images[train], labels[train], train, note), "val": (images[val], labels[val], val, note)}


def _stratified_chunks(labels: np.ndarray, sizes: Sequence[int], seed: int) -> list[np.ndarray]:
    """Disjoint index sets of the given sizes whose class proportions follow the whole set's (within one)."""
    if sum(sizes) > len(labels) or min(sizes) < 1:
        raise ValueError(f"cannot take subsets of sizes {list(sizes)} from {len(labels)} images")
    rng = np.random.default_rng(seed)
    # Spread each class evenly over [0, 1) in random order; any prefix of the merged order is then stratified.
    spread = np.empty(len(labels))
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        spread[rng.permutation(members)] = (np.arange(len(members)) + 0.5) / len(members)
    order = np.lexsort((rng.random(len(labels)), spread))
    bounds = np.cumsum([0, *sizes])
    return [np.sort(order[start:stop]) for start, stop in itertools.pairwise(bounds)]


def _read_idx(path: str, dimensions: int) -> np.ndarray:
    """A gzip-compressed IDX file of unsigned bytes (big-endian header: magic 0x0000 08 nd, then nd sizes)."""
    with gzip.open(path, "rb") as stream:
        data = stream.read()
    magic = int.from_bytes(data[:4], "big")
    if magic != 0x0800 | dimensions:
        raise ValueError(f"{path}: magic {magic:#010x} is not an IDX file of {dimensions}-D unsigned bytes")
    header = 4 + 4 * dimensions
    shape = tuple(int.from_bytes(data[offset : offset + 4], "big") for offset in range(4, header, 4))
    if len(data) - header != math.prod(shape):
        raise ValueError(f"{path}: {len(data) - header} data bytes, header says shape {shape}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)
