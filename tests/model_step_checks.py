"""A shared GPU check: one training step of a registered tower through the fused kernels matches the reference
path (used by the kernel test files; needs CUDA and timm)."""
from __future__ import annotations

import timm
import torch
import torch.nn.functional as F

import vig  # noqa: F401  (registers the models with timm)
import vig_kernels


def assert_training_step_matches_reference(model_name: str, batch: int = 4) -> None:
    """bf16-autocast cross-entropy step of ``model_name`` with backend ``triton`` and ``reference``: the losses
    agree to 2e-3 and the concatenated parameter gradients to 2e-2 (relative norms)."""
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    labels = torch.randint(0, 1000, (batch,), device="cuda")
    results = {}
    for backend in ("triton", "reference"):
        torch.manual_seed(0)
        model = timm.create_model(model_name).cuda().train()
        with vig_kernels.use_backend(backend), torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), labels)
        loss.backward()
        results[backend] = (loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None])
    (loss_t, grads_t), (loss_r, grads_r) = results["triton"], results["reference"]
    assert abs(loss_t - loss_r) <= 2e-3 * abs(loss_r), (loss_t, loss_r)
    assert len(grads_t) == len(grads_r)
    total = torch.cat([g.flatten().double() for g in grads_r])
    diff = torch.cat([(a - b).flatten().double() for a, b in zip(grads_t, grads_r)])
    assert (diff.norm() / total.norm()).item() < 2e-2
