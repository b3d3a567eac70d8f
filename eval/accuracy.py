"""Top-1 / top-5 accuracy of a classifier over a loader of ``(images, labels)``, summed over distributed ranks.

Shared by zero-shot classification (logits from text embeddings) and fine-tuning (logits from the model's head).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

AutocastFactory = Callable[[], contextlib.AbstractContextManager]


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Eval mode for the block; restores every submodule's own train/eval flag afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def topk_accuracy(logits_of: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, num_classes: int,
                  device: str | torch.device, autocast: AutocastFactory = contextlib.nullcontext) -> dict:
    """Top-1 and top-5 accuracy (percent), mean cross-entropy and sample count of ``loader``'s batches.

    ``logits_of`` maps images on ``device`` to ``[B, num_classes]`` logits (put the model in eval mode around the
    call); top-5 is top-min(5, C). When ``torch.distributed`` runs more than one process, the counts are summed
    over ranks, so every rank returns the global figures (give each rank its own part of the data, e.g.
    ``build_loader(..., "eval", rank=r, world_size=w)``, and call this on every rank). Ranks with fewer batches
    run extra forwards on a dummy image so that every rank makes the same number of forward passes (sharded
    models such as ZeRO-3 gather weights in each).
    """
    device = torch.device(device)
    top_k = min(5, num_classes)
    counts = torch.zeros(4, dtype=torch.float64, device=device)  # top-1 correct, top-k correct, loss sum, samples
    batches, image_shape = 0, None
    for batch in loader:
        images, labels = batch[0], batch[1]
        images = images.to(device, non_blocking=True)
        labels = torch.as_tensor(labels).to(device, non_blocking=True)
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            bad = int(labels.max() if labels.max() >= num_classes else labels.min())
            raise ValueError(f"label {bad} is outside the {num_classes} classes of the classifier: the classifier's "
                             "classes do not match the evaluation data's labels")
        with autocast():
            logits = logits_of(images)
        if logits.shape != (labels.numel(), num_classes):
            raise ValueError(f"logits of shape {tuple(logits.shape)} for {labels.numel()} images and {num_classes} "
                             "classes")
        logits = logits.float()
        hits = logits.topk(top_k, dim=1).indices == labels.unsqueeze(1)
        counts[0] += hits[:, 0].sum()
        counts[1] += hits.any(dim=1).sum()
        counts[2] += nn.functional.cross_entropy(logits, labels, reduction="sum")
        counts[3] += labels.numel()
        batches += 1
        image_shape = tuple(images.shape[1:])
    if distributed():
        _even_out_forwards(logits_of, batches, image_shape, device, autocast)
        dist.all_reduce(counts)
    samples = int(counts[3].item())
    if samples == 0:
        raise ValueError("the evaluation data held no samples")
    return {"top1": 100 * counts[0].item() / samples, "top5": 100 * counts[1].item() / samples,
            "loss": counts[2].item() / samples, "samples": samples}


def _even_out_forwards(logits_of: Callable[[torch.Tensor], torch.Tensor], batches: int,
                       image_shape: tuple[int, ...] | None, device: torch.device, autocast: AutocastFactory) -> None:
    """Run dummy image forwards on ranks that had fewer batches than the busiest rank."""
    shape = torch.tensor(list(image_shape or (0, 0, 0)) + [batches], dtype=torch.long, device=device)
    dist.all_reduce(shape, op=dist.ReduceOp.MAX)
    *dims, most = shape.tolist()
    if most > batches and min(dims) > 0:
        dummy = torch.zeros(1, *dims, device=device)
        for _ in range(most - batches):
            with autocast():
                logits_of(dummy)
