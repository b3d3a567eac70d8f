"""Semantic-segmentation scores from a confusion matrix summed over distributed ranks: mIoU, pixel accuracy."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from eval.accuracy import AutocastFactory, distributed


def confusion_matrix(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """``[C, C]`` int64 counts, row = true class, column = predicted class, over pixels not ``ignore_index``."""
    valid = targets != ignore_index
    if valid.any() and (targets[valid].min() < 0 or targets[valid].max() >= num_classes):
        bad = targets[valid & ((targets < 0) | (targets >= num_classes))][0]
        raise ValueError(f"label {int(bad)} is outside the {num_classes} classes (and not the ignore index "
                         f"{ignore_index}): the model's classes do not match the evaluation masks")
    pairs = targets[valid] * num_classes + predictions[valid]
    return torch.bincount(pairs, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def scores(confusion: torch.Tensor) -> dict:
    """mIoU, mean class accuracy and pixel accuracy in percent, and the per-class IoU (None for a class neither in
    the labels nor predicted), as mmsegmentation reports them (mean over classes with a defined IoU)."""
    confusion = confusion.double()
    hits, labelled, predicted = confusion.diag(), confusion.sum(1), confusion.sum(0)
    union = labelled + predicted - hits
    iou = torch.where(union > 0, hits / union.clamp(min=1), torch.nan)
    accuracy = torch.where(labelled > 0, hits / labelled.clamp(min=1), torch.nan)
    return {"miou": 100 * iou.nanmean().item(), "macc": 100 * accuracy.nanmean().item(),
            "pixel_acc": 100 * (hits.sum() / confusion.sum().clamp(min=1)).item(),
            "iou": [None if value != value else round(100 * value, 4) for value in iou.tolist()]}


@torch.no_grad()
def segmentation_scores(logits_of: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, num_classes: int,
                        device: str | torch.device, ignore_index: int = 255,
                        autocast: AutocastFactory = contextlib.nullcontext) -> dict:
    """:func:`scores` of ``loader``'s ``(images, masks, ...)`` batches, plus the mean pixel cross-entropy and the
    image count; with several ``torch.distributed`` processes the counts are summed, so give each rank its own
    images (an evaluation loader reads each once) and call this on every rank."""
    device = torch.device(device)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss summed over pixels, images
    for images, masks, *_ in loader:
        images, masks = images.to(device), masks.to(device)
        with autocast():
            logits = logits_of(images)
        logits = logits.float()
        totals[0] += nn.functional.cross_entropy(logits, masks, ignore_index=ignore_index, reduction="sum")
        totals[1] += images.shape[0]
        confusion += confusion_matrix(logits.argmax(1), masks, num_classes, ignore_index)
    if distributed():
        dist.all_reduce(confusion)
        dist.all_reduce(totals)
    if totals[1] == 0:
        raise ValueError("the evaluation data held no samples")
    pixels = max(int(confusion.sum()), 1)
    return {**scores(confusion.cpu()), "loss": totals[0].item() / pixels, "samples": int(totals[1].item())}
