"""Run under ``torchrun --nproc_per_node 2`` (gloo, CPU) by tests/test_clip.py.

Each rank takes its half of one fixed global batch of digits images and captions and computes the CLIP and the
SigLIP loss with features exchanged across ranks; the loss averaged over ranks and the all-reduced gradients must
equal a single process's loss and gradients on the whole batch. Rank 0 writes both to the JSON file given.
"""
from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from clip_fixtures import digits_batch, tiny_clip

from pretrain.contrastive import ContrastiveModel, build_loss, contrastive_loss


def loss_and_grads(model: ContrastiveModel, loss_fn, images, texts) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = contrastive_loss(loss_fn, model(images, texts))
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    images, texts = digits_batch(8)
    model = ContrastiveModel(tiny_clip(seed=0)).eval()  # eval: no dropout, so both runs see one function
    half = images.shape[0] // world
    report = {}
    for kind in ("clip", "siglip"):
        if kind == "siglip":
            with torch.no_grad():
                model.clip.logit_bias = torch.nn.Parameter(torch.tensor(-2.0))
        local = slice(rank * half, (rank + 1) * half)
        loss, grads = loss_and_grads(model, build_loss(kind, rank, world), images[local], texts[local])
        loss_sum = torch.tensor(loss)
        dist.all_reduce(loss_sum)
        for grad in grads.values():
            dist.all_reduce(grad)
            grad /= world
        single_loss, single_grads = loss_and_grads(model, build_loss(kind, 0, 1), images, texts)
        worst = max((grads[name] - single_grads[name]).abs().max().item() / (single_grads[name].abs().max().item()
                                                                               + 1e-12) for name in single_grads)
        report[kind] = {"distributed_loss": loss_sum.item() / world, "single_loss": single_loss,
                        "worst_relative_grad_difference": worst, "parameters_compared": len(single_grads)}
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
