"""COCO box mAP (pycocotools' COCOeval) of a detector over a loader, each image counted once across processes."""
from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from eval.accuracy import AutocastFactory, distributed

STAT_NAMES = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")


def coco_box_ap(ground_truth: list[dict], detections: list[dict], num_classes: int) -> dict:
    """COCO's AP (IoU 0.5:0.95), AP50, AP75 and AP by object size, in percent (-1 where undefined, as COCOeval).

    ``ground_truth``: per image ``{"boxes" [N, 4] x0 y0 x1 y1, "labels" [N] (0-based), "iscrowd", "area"}`` (the
    last two optional); ``detections``: per image, in the same order, ``{"boxes", "labels", "scores"}``."""
    images, annotations, results = [], [], []
    for image_id, (truth, found) in enumerate(zip(ground_truth, detections)):
        outside = [label for label in truth["labels"].tolist() if not 0 <= label < num_classes]
        if outside:
            # COCOeval would skip such boxes silently and report the AP of the classes it knows.
            raise ValueError(f"evaluation image {image_id} holds label {int(outside[0])}, outside the model's "
                             f"{num_classes} classes (0..{num_classes - 1})")
        images.append({"id": image_id})
        boxes = truth["boxes"].tolist()
        crowd = truth.get("iscrowd", torch.zeros(len(boxes))).tolist()
        area = truth["area"].tolist() if "area" in truth else [(x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in boxes]
        for box, label, is_crowd, size in zip(boxes, truth["labels"].tolist(), crowd, area):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "area": size,
                                "iscrowd": int(is_crowd)})
        for box, label, score in zip(found["boxes"].tolist(), found["labels"].tolist(), found["scores"].tolist()):
            results.append({"image_id": image_id, "category_id": int(label), "score": score,
                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
    if not images:
        raise ValueError("the evaluation data held no samples")
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        truth = COCO()
        truth.dataset = {"images": images, "annotations": annotations,
                         "categories": [{"id": label} for label in range(num_classes)]}
        truth.createIndex()
        found = truth.loadRes(results) if results else COCO()
        evaluation = COCOeval(truth, found, "bbox")
        if not results:
            evaluation.cocoDt.dataset = {"images": images, "annotations": [], "categories": truth.dataset["categories"]}
            evaluation.cocoDt.createIndex()
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {name: (100 * float(value) if value >= 0 else -1.0) for name, value in zip(STAT_NAMES, evaluation.stats)}


@torch.no_grad()
def detection_scores(detect: Callable[[list[torch.Tensor]], list[dict]], loader: Iterable, num_classes: int,
                     device: str | torch.device, autocast: AutocastFactory = contextlib.nullcontext) -> dict:
    """:func:`coco_box_ap` of ``detect`` (images on ``device`` -> torchvision's per-image dicts, labels 1..C) over
    ``loader``'s ``(images, targets, keys)``, plus the image count. With several ``torch.distributed`` processes
    every rank's images and detections are gathered (give each rank its own images, as an evaluation loader does,
    and call this on every rank) and every rank returns the same scores."""
    device = torch.device(device)
    ground_truth, detections = [], []
    for images, targets, _ in loader:
        with autocast():
            found = detect([image.to(device) for image in images])
        detections += [{"boxes": item["boxes"].float().cpu(), "scores": item["scores"].float().cpu(),
                        "labels": item["labels"].cpu() - 1} for item in found]
        ground_truth += targets
    if distributed():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (ground_truth, detections))
        ground_truth = [item for part, _ in gathered for item in part]
        detections = [item for _, part in gathered for item in part]
    return {**coco_box_ap(ground_truth, detections, num_classes), "samples": len(ground_truth)}
