"""Semantic-segmentation shards: an image and a mask per sample, a derived offline demo set, and their loader.

Each sample is ``KEY.{jpg|png|webp}`` (the image), ``KEY.seg.png`` (8-bit single-channel class indices, 255 =
ignore, the same height and width as the image) and ``KEY.json``; ``dataset.json`` records ``class_names`` (index
i names class i) and ``ignore_index``. Write them with::

    python -m pretrain.data.segmentation demo --out demo_seg            # derived canvases, train/ and val/
    python -m pretrain.data.segmentation pairs IMAGES MASKS --out DIR --class-names FILE [--reduce-zero-label]

and read them with :func:`build_segmentation_loader`, which yields ``(images [B, 3, S, S], masks [B, S, S] long,
keys)`` with the position, resume and bad-sample guarantees of :func:`pretrain.data.build_loader`.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from ..atomic import atomic_file
from .demo import DIGITS_CLASSES, FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, _read_idx, resolve_demo_source
from .loader import ShardLoader, build_loader
from .shards import INFO_FILE, SIZES_FILE
from .stream import (
    IMAGE_KEYS,
    BadSample,
    Delivery,
    WorkerStream,
    _BadLog,
    _decode_rgb,
)
from .transforms import IMAGENET_MEAN, IMAGENET_STD
from .writer import FileImage, _encode_image

logger = logging.getLogger(__name__)

MASK_KEY = "seg.png"
IGNORE_INDEX = 255
DERIVED_LABELS_NOTE = ("derived labels, not hand annotations: items pasted on a black canvas, a pixel labelled with "
                       "its item's class + 1 (1 in binary sets) where the item's intensity exceeds the threshold, "
                       "0 (background) elsewhere")


@dataclass(frozen=True, eq=False)
class SegmentationSample:
    """An image (file or uint8 array) and its class-index mask (a PNG file or a uint8 ``HxW`` array)."""

    image: FileImage | np.ndarray
    mask: str | np.ndarray
    metadata: dict = field(default_factory=dict)


def write_segmentation_shards(samples: Sequence[SegmentationSample], out_dir: str | os.PathLike, *,
                              class_names: Sequence[str], dataset_info: dict | None = None, prefix: str = "shard",
                              max_samples_per_shard: int = 1000, shuffle_seed: int | None = 0,
                              reduce_zero_label: bool = False) -> dict[str, int]:
    """Write ``samples`` as ``out_dir/{prefix}-NNNNNN.tar`` plus ``dataset.json`` and (last) ``sizes.json``.

    Shards are written atomically, in a fixed pseudo-random order (``shuffle_seed``; None keeps the given order).
    ``reduce_zero_label`` (ADE20K's annotations) maps mask value 0 to ignore and every other value v to v - 1.
    Raises ValueError naming the sample when a mask's size differs from its image's or a value is no class.
    """
    def members(sample: SegmentationSample) -> dict[str, bytes]:
        extension, image_bytes, mask = _encode_sample(sample, len(class_names), reduce_zero_label)
        return {extension: image_bytes, MASK_KEY: _png(mask),
                "json": json.dumps(sample.metadata, sort_keys=True).encode()}

    info = {**(dataset_info or {}), "format": "webdataset", "task": "segmentation", "class_names": list(class_names),
            "ignore_index": IGNORE_INDEX, "mask_key": MASK_KEY}
    return write_keyed_shards(samples, members, out_dir, info, prefix, max_samples_per_shard, shuffle_seed)


def write_keyed_shards(samples: Sequence, members: Callable[[object], dict[str, bytes]], out_dir: str | os.PathLike,
                       info: dict, prefix: str, max_samples_per_shard: int, shuffle_seed: int | None) -> dict[str, int]:
    """Samples as ``{prefix}-NNNNNN.tar`` shards (``members(sample)``: extension -> bytes), keyed by position in a
    fixed pseudo-random order, then ``dataset.json`` (``info`` + the sample count) and, last, ``sizes.json``."""
    os.makedirs(out_dir, exist_ok=True)
    order = np.arange(len(samples)) if shuffle_seed is None else np.random.default_rng(shuffle_seed).permutation(
        len(samples))
    width = max(6, len(str(len(samples) - 1)))
    sizes = {}
    for number, start in enumerate(range(0, len(samples), max_samples_per_shard)):
        name = f"{prefix}-{number:06d}.tar"
        with atomic_file(os.path.join(out_dir, name)) as stream:
            tar = wds.TarWriter(stream, encoder=False, mtime=0)  # fixed mtime: the archive depends on content only
            for position in range(start, min(start + max_samples_per_shard, len(samples))):
                tar.write({"__key__": f"{position:0{width}d}", **members(samples[order[position]])})
            tar.close()
        sizes[name] = min(max_samples_per_shard, len(samples) - start)
    for filename, value in ((INFO_FILE, {**info, "num_samples": len(samples)}), (SIZES_FILE, sizes)):
        with atomic_file(os.path.join(out_dir, filename)) as stream:
            stream.write((json.dumps(value, indent=1) + "\n").encode())
    return sizes


def _encode_sample(sample: SegmentationSample, num_classes: int, reduce_zero_label: bool) -> tuple[str, bytes,
                                                                                                  np.ndarray]:
    where = sample.image.path if isinstance(sample.image, FileImage) else sample.metadata or "array sample"
    if isinstance(sample.image, FileImage):
        extension, image_bytes = _encode_image(sample.image)
        with Image.open(io.BytesIO(image_bytes)) as decoded:
            image_size = decoded.size[::-1]
    else:
        extension, image_bytes, image_size = "png", _png(sample.image), sample.image.shape[:2]
    mask = sample.mask
    if isinstance(mask, str):
        with Image.open(mask) as decoded:
            if decoded.mode not in ("L", "P"):
                raise ValueError(f"mask {mask} of {where} is a {decoded.mode} image; masks are single-channel class "
                                 "indices (mode L or P)")
            mask = np.array(decoded)
    if mask.dtype != np.uint8 or mask.shape != tuple(image_size):
        raise ValueError(f"mask of {where} is {mask.dtype} {mask.shape}, its image {tuple(image_size)}: a mask must "
                         "be uint8 with the image's height and width")
    if reduce_zero_label:
        mask = np.where(mask == 0, IGNORE_INDEX, mask.astype(np.int16) - 1).astype(np.uint8)
    values = np.unique(mask)
    outside = values[(values >= num_classes) & (values != IGNORE_INDEX)]
    if outside.size:
        raise ValueError(f"mask of {where} holds value {int(outside[0])}, outside the {num_classes} classes "
                         f"(and not the ignore index {IGNORE_INDEX})")
    return extension, image_bytes, mask


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def derived_canvases(items: np.ndarray, labels: np.ndarray, count: int, *, canvas: int = 64,
                     per_canvas: tuple[int, int] = (2, 4), threshold: int = 64, binary: bool = False,
                     seed: int = 0) -> Iterator[SegmentationSample]:
    """``count`` canvases of ``per_canvas`` randomly placed items (later items cover earlier ones) and the
    derived mask: item class + 1 (``binary``: 1) where an item's pixel exceeds ``threshold``, 0 elsewhere. The
    metadata records each item's index, label and ``[top, left]`` placement, in pasting order."""
    rng = np.random.default_rng(seed)
    side = items.shape[1]
    if side > canvas:
        raise ValueError(f"items of {side} pixels do not fit a canvas of {canvas}")
    for _ in range(count):
        image = np.zeros((canvas, canvas), np.uint8)
        mask = np.zeros((canvas, canvas), np.uint8)
        chosen = rng.choice(len(items), int(rng.integers(per_canvas[0], per_canvas[1] + 1)), replace=False)
        placements = []
        for index in chosen:
            top, left = rng.integers(0, canvas - side + 1, size=2)
            placements.append([int(top), int(left)])
            window = (slice(top, top + side), slice(left, left + side))
            foreground = items[index] > threshold
            image[window][foreground] = items[index][foreground]
            mask[window][foreground] = 1 if binary else labels[index] + 1
        yield SegmentationSample(image, mask, {"items": [int(i) for i in chosen],
                                               "item_labels": [int(labels[i]) for i in chosen],
                                               "placements": placements})


def demo_items(source: str, seed: int, fashion_mnist_dir: str | os.PathLike = FASHION_MNIST_DIR
               ) -> tuple[str, tuple[str, ...], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The source's name, class names and ``{"train", "val"}`` -> (uint8 items [N, side, side], labels [N]):
    Fashion-MNIST's official train and test splits, or scikit-learn digits upscaled 3x to 24 pixels (a fixed
    half/half split of the 1,797 images) where Fashion-MNIST is not installed."""
    name = resolve_demo_source(source, fashion_mnist_dir)
    if name == "fashion-mnist":
        class_names = FASHION_MNIST_CLASSES
        splits = {split: (_read_idx(os.path.join(fashion_mnist_dir, f"{official}-images-idx3-ubyte.gz"), 3),
                          _read_idx(os.path.join(fashion_mnist_dir, f"{official}-labels-idx1-ubyte.gz"), 1))
                  for split, official in (("train", "train"), ("val", "t10k"))}
    else:
        from sklearn.datasets import load_digits
        digits = load_digits()
        images = np.kron(np.rint(digits.images * (255 / 16)).astype(np.uint8), np.ones((3, 3), np.uint8))
        half = np.random.default_rng(seed).permutation(len(images))
        splits = {"train": (images[half[::2]], digits.target[half[::2]]),
                  "val": (images[half[1::2]], digits.target[half[1::2]])}
        class_names = DIGITS_CLASSES
    return name, class_names, splits


def write_demo_segmentation(out_dir: str | os.PathLike, *, source: str = "auto", train_size: int = 2000,
                            val_size: int = 200, canvas: int = 64, per_canvas: tuple[int, int] = (2, 4),
                            threshold: int = 64, binary: bool = False, seed: int = 0,
                            max_samples_per_shard: int = 1000,
                            fashion_mnist_dir: str | os.PathLike = FASHION_MNIST_DIR) -> dict[str, dict[str, int]]:
    """``out_dir/train`` and ``out_dir/val``: canvases of Fashion-MNIST items (train canvases from the official
    train split, val canvases from the test split), or of scikit-learn digits upscaled 3x to 24 pixels (a fixed
    half/half split of the 1,797 images) where Fashion-MNIST is not installed. ``binary`` labels every item
    pixel 1 (foreground) instead of its class + 1. See :data:`DERIVED_LABELS_NOTE`."""
    name, class_names, splits = demo_items(source, seed, fashion_mnist_dir)
    written = {}
    for number, (split, size) in enumerate((("train", train_size), ("val", val_size))):
        items, labels = splits[split]
        samples = list(derived_canvases(items, labels, size, canvas=canvas, per_canvas=per_canvas,
                                        threshold=threshold, binary=binary, seed=seed + number))
        info = {"source": name, "split": split, "labels": DERIVED_LABELS_NOTE, "canvas": canvas,
                "items_per_canvas": list(per_canvas), "threshold": threshold}
        written[split] = write_segmentation_shards(samples, os.path.join(out_dir, split),
                                                   class_names=["background", *(["foreground"] if binary
                                                                                else class_names)],
                                                   dataset_info=info,
                                                   prefix=split, max_samples_per_shard=max_samples_per_shard,
                                                   shuffle_seed=seed)
    return written


def paired_samples(images: str | os.PathLike, masks: str | os.PathLike) -> list[SegmentationSample]:
    """Images of a folder with the same-stem ``.png`` masks of another (ADE20K: ``images/training`` and
    ``annotations/training``); an image without a mask is an error naming it."""
    image_files = sorted(path for path in Path(images).iterdir() if path.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not image_files:
        raise FileNotFoundError(f"no .jpg or .png images in {images}")
    samples = []
    for path in image_files:
        mask = Path(masks) / f"{path.stem}.png"
        if not mask.is_file():
            raise FileNotFoundError(f"image {path} has no mask {mask}")
        samples.append(SegmentationSample(FileImage(str(path)), str(mask), {"image": path.name}))
    return samples


def segmentation_transform(training: bool, crop_size: int, scale: tuple[float, float] = (0.5, 2.0),
                           mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> v2.Compose:
    """Joint image/mask pipeline. Training (mmsegmentation's ADE20K recipe without photometric jitter): resize
    the short side to ``crop_size`` times a factor drawn from ``scale``, random crop (padding the image with 0 and
    the mask with the ignore index), horizontal flip. Evaluation: short side to ``crop_size``, center crop."""
    if training:
        geometry = [v2.RandomResize(round(crop_size * scale[0]), round(crop_size * scale[1]) + 1),
                    v2.RandomCrop(crop_size, pad_if_needed=True,
                                  fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
                    v2.RandomHorizontalFlip()]
    else:
        geometry = [v2.Resize(crop_size), v2.CenterCrop(crop_size)]
    # A dtype (not a dict) converts images only; the mask keeps its integer class indices.
    return v2.Compose([*geometry, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


class SegmentationStream(WorkerStream):
    """:class:`WorkerStream` for image + mask samples (the same epoch layout, resume position and refills)."""

    def _required_keys(self) -> tuple[str, ...]:
        return (MASK_KEY,)

    def _deliveries(self, samples: Iterable[dict], bad: _BadLog) -> Iterator[Delivery]:
        config = self.config
        prepared = (pair for pair in (_prepare_pair(sample, config.transform, bad) for sample in samples) if pair)
        return _batches(prepared, config.batch_size, config.drop_last, bad)


class SegmentationLoader(ShardLoader):
    """:class:`ShardLoader` over :class:`SegmentationStream`: batches ``(images, masks, keys)``."""

    stream_class = SegmentationStream


def build_segmentation_loader(shards: str | os.PathLike | Sequence[str | os.PathLike], training: bool,
                              batch_size: int, crop_size: int, *, scale: tuple[float, float] = (0.5, 2.0),
                              mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                              **options) -> SegmentationLoader:
    """A :class:`SegmentationLoader` for one rank; ``options`` are :func:`pretrain.data.build_loader`'s (rank,
    world_size, num_workers, resampled, seed, shuffle_buffer, max_bad_fraction, ...). Training shuffles and
    drops partial batches; evaluation reads every sample once, each on one rank."""
    base = build_loader(shards, "mae" if training else "eval", batch_size, crop_size, **options)
    config = dataclasses.replace(base.config, transform=segmentation_transform(training, crop_size, scale, mean, std))
    return SegmentationLoader(config, num_workers=base.num_workers, pin_memory=base.pin_memory,
                              start_next_epoch_early=base.start_next_epoch_early)


def _prepare_pair(sample: dict, transform, bad: _BadLog) -> tuple[str, torch.Tensor, torch.Tensor] | None:
    extension = next(key for key in IMAGE_KEYS if key in sample)
    key = sample["__key__"]
    try:  # undecodable bytes are bad samples, skipped and counted
        image = _decode_rgb(extension, sample[extension])
        with Image.open(io.BytesIO(sample[MASK_KEY])) as decoded:
            mask = np.array(decoded)
    except Exception as exn:
        bad.add(BadSample(sample["__url__"], key, f"{type(exn).__name__}: {exn}"))
        return None
    if mask.ndim != 2 or mask.shape != (image.height, image.width):
        raise ValueError(f"sample {key} of {sample['__url__']}: mask of shape {mask.shape} for an image of "
                         f"{image.height}x{image.width}; a mask must be single-channel with the image's size")
    image, mask = transform(tv_tensors.Image(v2.functional.pil_to_tensor(image)),
                            tv_tensors.Mask(torch.from_numpy(mask)))
    return key, image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()


def _batches(pairs: Iterator, batch_size: int, drop_last: bool, bad: _BadLog,
             collate: Callable[[list], object] | None = None) -> Iterator[Delivery]:
    collate = collate or _collate
    batch = []
    for pair in pairs:
        batch.append(pair)
        if len(batch) == batch_size:
            yield Delivery(collate(batch), len(batch), bad.drain())
            batch = []
    if batch and not drop_last:
        yield Delivery(collate(batch), len(batch), bad.drain())


def _collate(batch: list[tuple[str, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    return (torch.stack([image for _, image, _ in batch]), torch.stack([mask for _, _, mask in batch]),
            [key for key, _, _ in batch])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.data.segmentation",
                                     description="Write semantic-segmentation WebDataset shards.")
    commands = parser.add_subparsers(required=True, dest="command")
    demo = commands.add_parser("demo", help="derived canvases of Fashion-MNIST items (else scikit-learn digits)")
    demo.add_argument("--source", choices=("auto", "fashion-mnist", "digits"), default="auto")
    demo.add_argument("--train-size", type=int, default=2000, help="training canvases")
    demo.add_argument("--val-size", type=int, default=200, help="validation canvases")
    demo.add_argument("--canvas", type=int, default=64, help="canvas side in pixels")
    demo.add_argument("--binary", action="store_true", help="label items 1 (foreground) instead of class + 1")
    demo.add_argument("--fashion-mnist-dir", default=FASHION_MNIST_DIR)
    pairs = commands.add_parser("pairs", help="a folder of images and a folder of same-stem .png masks (ADE20K)")
    pairs.add_argument("images")
    pairs.add_argument("masks")
    pairs.add_argument("--class-names", required=True, help="one class name per line, line i naming mask value i "
                       "(after --reduce-zero-label)")
    pairs.add_argument("--reduce-zero-label", action="store_true",
                       help="mask value 0 is 'unlabelled' (ignored), v > 0 becomes class v - 1 (ADE20K)")
    for command in (demo, pairs):
        command.add_argument("--out", required=True, help="output directory")
        command.add_argument("--seed", type=int, default=0)
        command.add_argument("--max-samples-per-shard", type=int, default=1000)
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            written = write_demo_segmentation(args.out, source=args.source, train_size=args.train_size,
                                              val_size=args.val_size, canvas=args.canvas, binary=args.binary,
                                              seed=args.seed,
                                              max_samples_per_shard=args.max_samples_per_shard,
                                              fashion_mnist_dir=args.fashion_mnist_dir)
        else:
            names = [line.strip() for line in Path(args.class_names).read_text().splitlines() if line.strip()]
            written = {args.out: write_segmentation_shards(
                paired_samples(args.images, args.masks), args.out, class_names=names, prefix="shard",
                max_samples_per_shard=args.max_samples_per_shard, shuffle_seed=args.seed,
                reduce_zero_label=args.reduce_zero_label)}
    except (FileNotFoundError, ValueError, ImportError) as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 1
    for split, sizes in written.items():
        print(f"{split}: {sum(sizes.values())} samples in {len(sizes)} shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
