"""Object-detection shards: an image and its boxes per sample, a derived offline demo set, COCO conversion, a loader.

Each sample is ``KEY.{jpg|png|webp}`` (the image) and ``KEY.json``: ``{"boxes": [[x0, y0, x1, y1], ...]}`` in
pixels (x1 > x0, y1 > y0, inside the image), ``"labels"`` (class indices 0..C-1, one per box) and optionally
``"iscrowd"`` (0/1 per box; crowd boxes are not trained on and are ignore regions in evaluation, as in COCO) and
``"area"`` (per box, the object's area for COCO's size ranges; default the box area). ``dataset.json`` records
``class_names``. Write them with::

    python -m pretrain.data.detection demo --out demo_data/detection        # derived canvases, train/ and val/
    python -m pretrain.data.detection coco instances_val2017.json val2017/ --out DIR

and read them with :func:`build_detection_loader`, which yields ``(images, targets, keys)``: lists of float
``[3, H, W]`` images in [0, 1] and of ``{"boxes", "labels", ...}`` dicts, with the position, resume and
bad-sample guarantees of :func:`pretrain.data.build_loader`.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from .demo import FASHION_MNIST_DIR
from .loader import ShardLoader, build_loader
from .segmentation import _batches, _png, demo_items, derived_canvases, write_keyed_shards
from .stream import IMAGE_KEYS, BadSample, Delivery, WorkerStream, _BadLog, _decode_rgb
from .writer import FileImage, _encode_image

DERIVED_BOXES_NOTE = ("derived labels, not hand annotations: items pasted on a black canvas (later items cover "
                      "earlier ones), each box the extent of its item's visible pixels above the threshold, its "
                      "class the item's class; items covered entirely get no box")
COCO_OVERSHOOT = 1.0  # pixels: COCO's float boxes may end a rounding step past the image edge; clipped


@dataclass(frozen=True, eq=False)
class DetectionSample:
    """An image (file or uint8 array), its ``[N, 4]`` x0, y0, x1, y1 pixel boxes and ``[N]`` class indices."""

    image: FileImage | np.ndarray
    boxes: Sequence[Sequence[float]]
    labels: Sequence[int]
    metadata: dict = field(default_factory=dict)
    iscrowd: Sequence[int] | None = None
    area: Sequence[float] | None = None


def check_boxes(boxes: np.ndarray, labels: np.ndarray, width: int, height: int, where: str,
                num_classes: int | None = None) -> None:
    """ValueError naming ``where`` for boxes that are not ``[N, 4]`` with as many labels, leave the
    ``width`` x ``height`` image, have no positive width and height, or carry a label outside the classes."""
    if boxes.ndim != 2 or boxes.shape[1] != 4 or labels.shape != (len(boxes),):
        raise ValueError(f"{where}: boxes of shape {tuple(boxes.shape)} and labels of shape {tuple(labels.shape)}; "
                         "expected [N, 4] x0, y0, x1, y1 boxes and N labels")
    for box, label in zip(boxes.tolist(), labels.tolist()):
        x0, y0, x1, y1 = box
        if not x1 > x0 or not y1 > y0:
            raise ValueError(f"{where}: box {box} has no positive size (x1 must exceed x0, y1 y0)")
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            raise ValueError(f"{where}: box {box} leaves the {width}x{height} image")
        if label < 0 or (num_classes is not None and label >= num_classes):
            raise ValueError(f"{where}: box {box} with label {label} is outside the "
                             f"{num_classes if num_classes is not None else 'known'} classes")


def write_detection_shards(samples: Sequence[DetectionSample], out_dir: str | os.PathLike, *,
                           class_names: Sequence[str], dataset_info: dict | None = None, prefix: str = "shard",
                           max_samples_per_shard: int = 1000, shuffle_seed: int | None = 0) -> dict[str, int]:
    """Write ``samples`` as ``out_dir/{prefix}-NNNNNN.tar`` plus ``dataset.json`` and (last) ``sizes.json``,
    atomically, in a fixed pseudo-random order (``shuffle_seed``; None keeps the given order). Raises ValueError
    naming the sample for a box outside its image, of non-positive size, or with a label that is no class."""
    def members(sample: DetectionSample) -> dict[str, bytes]:
        if isinstance(sample.image, FileImage):
            where = sample.image.path
            extension, image_bytes = _encode_image(sample.image)
            with Image.open(io.BytesIO(image_bytes)) as decoded:
                width, height = decoded.size
        else:
            where = f"sample {json.dumps(sample.metadata, sort_keys=True)[:200]}"
            extension, image_bytes = "png", _png(sample.image)
            height, width = sample.image.shape[:2]
        boxes = np.asarray(sample.boxes, np.float64).reshape(-1, 4) if len(sample.boxes) else np.zeros((0, 4))
        labels = np.asarray(sample.labels, np.int64)
        check_boxes(boxes, labels, width, height, where, len(class_names))
        target = {"boxes": boxes.tolist(), "labels": labels.tolist()}
        for name in ("iscrowd", "area"):
            if getattr(sample, name) is not None:
                target[name] = list(getattr(sample, name))
        return {extension: image_bytes, "json": json.dumps({**sample.metadata, **target}, sort_keys=True).encode()}

    info = {**(dataset_info or {}), "format": "webdataset", "task": "detection", "class_names": list(class_names),
            "box_format": "xyxy pixels"}
    return write_keyed_shards(samples, members, out_dir, info, prefix, max_samples_per_shard, shuffle_seed)


def derived_detection_canvases(items: np.ndarray, labels: np.ndarray, count: int, *, canvas: int = 64,
                               per_canvas: tuple[int, int] = (2, 4), threshold: int = 64,
                               seed: int = 0) -> Iterator[DetectionSample]:
    """The canvases of :func:`pretrain.data.segmentation.derived_canvases` with a box per item: the extent of
    its pixels above ``threshold`` that no later item covers (see :data:`DERIVED_BOXES_NOTE`)."""
    side = items.shape[1]
    for sample in derived_canvases(items, labels, count, canvas=canvas, per_canvas=per_canvas,
                                   threshold=threshold, seed=seed):
        layers = np.zeros((len(sample.metadata["items"]), canvas, canvas), bool)
        for layer, (index, (top, left)) in enumerate(zip(sample.metadata["items"], sample.metadata["placements"])):
            layers[layer, top:top + side, left:left + side] = items[index] > threshold
        boxes, kept = [], []
        for layer in range(len(layers)):
            pixels = layers[layer] & ~layers[layer + 1:].any(0)
            if pixels.any():
                rows, cols = np.nonzero(pixels)
                boxes.append([int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1])
                kept.append(sample.metadata["item_labels"][layer])
        yield DetectionSample(sample.image, boxes, kept, sample.metadata)


def write_demo_detection(out_dir: str | os.PathLike, *, source: str = "auto", train_size: int = 2000,
                         val_size: int = 200, canvas: int = 64, per_canvas: tuple[int, int] = (2, 4),
                         threshold: int = 64, single_class: bool = False, seed: int = 0,
                         max_samples_per_shard: int = 1000,
                         fashion_mnist_dir: str | os.PathLike = FASHION_MNIST_DIR) -> dict[str, dict[str, int]]:
    """``out_dir/train`` and ``out_dir/val``: derived canvases of Fashion-MNIST items (train from the official
    train split, val from the test split), or of scikit-learn digits where Fashion-MNIST is not installed
    (:func:`pretrain.data.segmentation.demo_items`). ``single_class`` labels every box 0, "item"."""
    name, class_names, splits = demo_items(source, seed, fashion_mnist_dir)
    written = {}
    for number, (split, size) in enumerate((("train", train_size), ("val", val_size))):
        items, labels = splits[split]
        samples = list(derived_detection_canvases(items, np.zeros_like(labels) if single_class else labels, size,
                                                  canvas=canvas, per_canvas=per_canvas, threshold=threshold,
                                                  seed=seed + number))
        info = {"source": name, "split": split, "labels": DERIVED_BOXES_NOTE, "canvas": canvas,
                "items_per_canvas": list(per_canvas), "threshold": threshold}
        written[split] = write_detection_shards(samples, os.path.join(out_dir, split),
                                                class_names=["item"] if single_class else list(class_names),
                                                dataset_info=info, prefix=split,
                                                max_samples_per_shard=max_samples_per_shard, shuffle_seed=seed)
    return written


def coco_samples(annotations: str | os.PathLike, images: str | os.PathLike
                 ) -> tuple[list[DetectionSample], list[str], list[int]]:
    """Samples, class names and COCO category ids (class i is category ``ids[i]``, sorted by id) of a COCO-format
    instances JSON and its image folder. Boxes (COCO's x, y, w, h) become x0, y0, x1, y1; a box ending at most
    :data:`COCO_OVERSHOOT` pixels past the image is clipped; zero-size boxes are left out (detectron2 does so).
    Errors name the annotation for a missing image, a negative size, a box outside the image or an unknown
    category."""
    data = json.loads(Path(annotations).read_text())
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"{annotations} has no {key!r}: not a COCO instances file")
    categories = sorted(data["categories"], key=lambda category: category["id"])
    index = {category["id"]: number for number, category in enumerate(categories)}
    by_image = {image["id"]: [] for image in data["images"]}
    for annotation in data["annotations"]:
        if annotation["image_id"] not in by_image:
            raise ValueError(f"annotation {annotation.get('id')} in {annotations} names image "
                             f"{annotation['image_id']}, which its 'images' lack")
        by_image[annotation["image_id"]].append(annotation)
    samples = []
    for image in data["images"]:
        path = Path(images) / image["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"image {image['id']} of {annotations}: no file {path}")
        width, height = image["width"], image["height"]
        boxes, labels, crowd, area = [], [], [], []
        for annotation in by_image[image["id"]]:
            where = f"annotation {annotation.get('id')} (image {image['file_name']}) in {annotations}"
            x, y, w, h = annotation["bbox"]
            if w < 0 or h < 0:
                raise ValueError(f"{where}: bbox {annotation['bbox']} has a negative size")
            if annotation["category_id"] not in index:
                raise ValueError(f"{where}: category {annotation['category_id']} is not in 'categories'")
            if x < 0 or y < 0 or x + w > width + COCO_OVERSHOOT or y + h > height + COCO_OVERSHOOT:
                raise ValueError(f"{where}: bbox {annotation['bbox']} leaves the {width}x{height} image")
            box = [x, y, min(x + w, width), min(y + h, height)]
            if box[2] <= box[0] or box[3] <= box[1]:
                continue
            boxes.append(box)
            labels.append(index[annotation["category_id"]])
            crowd.append(int(annotation.get("iscrowd", 0)))
            area.append(float(annotation.get("area", w * h)))
        samples.append(DetectionSample(FileImage(str(path)), boxes, labels, {"image_id": image["id"]}, crowd, area))
    return samples, [category["name"] for category in categories], [category["id"] for category in categories]


def detection_transform(training: bool, image_size: int, scale: tuple[float, float] = (0.1, 2.0)) -> v2.Compose:
    """Training: ViTDet's large-scale jitter (resize to fit ``image_size`` times a factor drawn from ``scale``,
    a random ``image_size`` crop padded with 0, boxes cut at its edges and dropped when empty) and horizontal
    flip. Evaluation: images as they are (the detector resizes them and maps its boxes back)."""
    geometry = [v2.ScaleJitter((image_size, image_size), scale_range=tuple(scale)),
                v2.RandomCrop(image_size, pad_if_needed=True, fill=0), v2.RandomHorizontalFlip(),
                v2.SanitizeBoundingBoxes()] if training else []
    return v2.Compose([*geometry, v2.ToDtype(torch.float32, scale=True)])


class DetectionStream(WorkerStream):
    """:class:`WorkerStream` for image + boxes samples (the same epoch layout, resume position and refills)."""

    def _required_keys(self) -> tuple[str, ...]:
        return ("json",)

    def _deliveries(self, samples: Iterable[dict], bad: _BadLog) -> Iterator[Delivery]:
        config = self.config
        training = config.drop_last
        prepared = (item for item in (_prepare_detection(sample, config.transform, training, bad)
                                      for sample in samples) if item)
        return _batches(prepared, config.batch_size, config.drop_last, bad, _collate)


class DetectionLoader(ShardLoader):
    """:class:`ShardLoader` over :class:`DetectionStream`: batches ``(images, targets, keys)`` of lists."""

    stream_class = DetectionStream


def build_detection_loader(shards: str | os.PathLike | Sequence[str | os.PathLike], training: bool,
                           batch_size: int, image_size: int, *, scale: tuple[float, float] = (0.1, 2.0),
                           **options) -> DetectionLoader:
    """A :class:`DetectionLoader` for one rank; ``options`` are :func:`pretrain.data.build_loader`'s (rank,
    world_size, num_workers, resampled, seed, shuffle_buffer, max_bad_fraction, ...). Training shuffles, drops
    partial batches and leaves crowd boxes out; evaluation reads every sample once, each on one rank, with its
    ``iscrowd`` and ``area`` per box."""
    base = build_loader(shards, "mae" if training else "eval", batch_size, image_size, **options)
    config = dataclasses.replace(base.config, transform=detection_transform(training, image_size, scale))
    return DetectionLoader(config, num_workers=base.num_workers, pin_memory=base.pin_memory,
                           start_next_epoch_early=base.start_next_epoch_early)


def _prepare_detection(sample: dict, transform, training: bool, bad: _BadLog) -> tuple | None:
    extension = next(key for key in IMAGE_KEYS if key in sample)
    key, where = sample["__key__"], f"sample {sample['__key__']} of {sample['__url__']}"
    try:  # undecodable bytes are bad samples, skipped and counted
        image = _decode_rgb(extension, sample[extension])
        target = json.loads(sample["json"])
    except Exception as exn:
        bad.add(BadSample(sample["__url__"], key, f"{type(exn).__name__}: {exn}"))
        return None
    if "boxes" not in target or "labels" not in target:
        raise ValueError(f"{where}: its json has no 'boxes' and 'labels' (keys {sorted(target)})")
    boxes = np.asarray(target["boxes"], np.float32).reshape(-1, 4) if target["boxes"] else np.zeros((0, 4), np.float32)
    labels = np.asarray(target["labels"], np.int64)
    check_boxes(boxes, labels, image.width, image.height, where)
    crowd = np.asarray(target.get("iscrowd") or [0] * len(labels), np.int64)
    area = np.asarray(target.get("area") or ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])), np.float32)
    if crowd.shape != labels.shape or area.shape != labels.shape:
        raise ValueError(f"{where}: iscrowd {crowd.shape} and area {area.shape} must hold one value per box")
    if training:
        boxes, labels = boxes[crowd == 0], labels[crowd == 0]
    picture = tv_tensors.Image(v2.functional.pil_to_tensor(image))
    boxes = tv_tensors.BoundingBoxes(torch.from_numpy(boxes), format="XYXY", canvas_size=(image.height, image.width))
    picture, target = transform(picture, {"boxes": boxes, "labels": torch.from_numpy(labels)})
    target = {"boxes": target["boxes"].as_subclass(torch.Tensor), "labels": target["labels"]}
    if not training:
        target.update(iscrowd=torch.from_numpy(crowd), area=torch.from_numpy(area))
    return key, picture.as_subclass(torch.Tensor), target


def _collate(batch: list[tuple]) -> tuple[list[torch.Tensor], list[dict], list[str]]:
    return [image for _, image, _ in batch], [target for _, _, target in batch], [key for key, _, _ in batch]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.data.detection",
                                     description="Write object-detection WebDataset shards.")
    commands = parser.add_subparsers(required=True, dest="command")
    demo = commands.add_parser("demo", help="derived canvases of Fashion-MNIST items (else scikit-learn digits)")
    demo.add_argument("--source", choices=("auto", "fashion-mnist", "digits"), default="auto")
    demo.add_argument("--train-size", type=int, default=2000, help="training canvases")
    demo.add_argument("--val-size", type=int, default=200, help="validation canvases")
    demo.add_argument("--canvas", type=int, default=64, help="canvas side in pixels")
    demo.add_argument("--single-class", action="store_true", help="one class, 'item', instead of the items' own")
    demo.add_argument("--fashion-mnist-dir", default=FASHION_MNIST_DIR)
    coco = commands.add_parser("coco", help="a COCO-format instances JSON and its image folder")
    coco.add_argument("annotations", help="e.g. annotations/instances_train2017.json")
    coco.add_argument("images", help="the folder its file_name entries are relative to, e.g. train2017/")
    for command in (demo, coco):
        command.add_argument("--out", required=True, help="output directory")
        command.add_argument("--seed", type=int, default=0)
        command.add_argument("--max-samples-per-shard", type=int, default=1000)
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            written = write_demo_detection(args.out, source=args.source, train_size=args.train_size,
                                           val_size=args.val_size, canvas=args.canvas,
                                           single_class=args.single_class, seed=args.seed,
                                           max_samples_per_shard=args.max_samples_per_shard,
                                           fashion_mnist_dir=args.fashion_mnist_dir)
        else:
            samples, names, ids = coco_samples(args.annotations, args.images)
            written = {args.out: write_detection_shards(
                samples, args.out, class_names=names, dataset_info={"category_ids": ids,
                                                                    "annotations": str(args.annotations)},
                max_samples_per_shard=args.max_samples_per_shard, shuffle_seed=args.seed)}
    except (FileNotFoundError, ValueError, ImportError) as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 1
    for split, sizes in written.items():
        print(f"{split}: {sum(sizes.values())} samples in {len(sizes)} shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
