"""Linear probe of a frozen image tower on labelled WebDataset shards (MAE's protocol, on cached features).

    python -m eval.linear_probe --encoder runs/mae_vig_b/encoder \
        --train-shards /data/in1k/train --val-shards /data/in1k/val [--random-init]

The encoder is frozen; its pooled, normalised feature (``forward_head(..., pre_logits=True)``: ViG's average
of the final-norm tokens, Vim's middle class token) is extracted once per image (resize + center crop, no
augmentation), then a head of BatchNorm without affine parameters plus a Linear layer is trained with LARS
(base lr 0.1 per 256, cosine, warm-up, no weight decay), as in MAE's ``main_linprobe.py``. Caching the features
instead of re-augmenting every epoch is the cheap variant for small data; it reports top-1 and top-5 on the
validation shards. ``--random-init`` probes the same architecture without its trained weights (a baseline).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import timm
import torch
from timm.optim import Lars
from torch import nn

import vig  # noqa: F401  (registers the architectures with timm)
from pretrain.atomic import write_atomically
from pretrain.data import DeviceNormalize, build_loader
from pretrain.recipe import at_least, run_tool


def load_encoder(folder: Path, random_init: bool) -> nn.Module:
    """An exported tower (``config.json`` + ``model.safetensors``), or its architecture freshly initialised."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: --encoder must be a folder written by the exporter")
    config = json.loads(config_path.read_text())
    args = {key: value for key, value in config.get("model_args", {}).items() if key != "num_classes"}
    checkpoint = None if random_init else str(folder / "model.safetensors")
    model = timm.create_model(config["architecture"], num_classes=0, checkpoint_path=checkpoint, **args)
    model.pretrained_cfg = {**model.pretrained_cfg, **config.get("pretrained_cfg", {})}
    return model.eval().requires_grad_(False)


@torch.no_grad()
def extract(model: nn.Module, shards: str, image_size: int, batch_size: int, num_workers: int,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = model.pretrained_cfg
    loader = build_loader(shards, "eval", batch_size, image_size, num_workers=num_workers,
                          crop_pct=cfg.get("crop_pct", 0.875), normalize=False, pin_memory=device.type == "cuda")
    normalize = DeviceNormalize(cfg["mean"], cfg["std"])
    features, labels = [], []
    for images, batch_labels in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pooled = model.forward_head(model.forward_features(normalize(images, device)), pre_logits=True)
        features.append(pooled.float().cpu())
        labels.append(batch_labels)
    return torch.cat(features), torch.cat(labels)


def accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return (top == labels.unsqueeze(1)).any(dim=1).float().mean().item() * 100


def train_head(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, epochs: int, batch_size: int,
               base_lr: float, warmup_epochs: int, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    head = nn.Sequential(nn.BatchNorm1d(train_x.shape[1], affine=False, eps=1e-6),
                         nn.Linear(train_x.shape[1], num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    optimizer = Lars(head.parameters(), lr=base_lr * batch_size / 256, momentum=0.9, weight_decay=0.0)
    if len(train_x) < 2:
        raise ValueError(f"the linear probe needs at least 2 training samples for its BatchNorm, got {len(train_x)}")
    # A last batch of one sample is left out of each epoch: BatchNorm cannot normalise a single feature vector.
    batch_starts = [start for start in range(0, len(train_x), batch_size) if len(train_x) - start > 1]
    steps_per_epoch = len(batch_starts)
    total, warmup = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
    peak = optimizer.param_groups[0]["lr"]
    step = 0
    head.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=generator)
        for start in batch_starts:
            index = order[start:start + batch_size]
            progress = (step - warmup) / (total - warmup)
            scale = step / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * progress))
            for group in optimizer.param_groups:
                group["lr"] = peak * scale
            loss = nn.functional.cross_entropy(head(train_x[index]), train_y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return head.eval()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", type=Path, required=True, help="exported encoder folder")
    parser.add_argument("--train-shards", required=True)
    parser.add_argument("--val-shards", required=True)
    parser.add_argument("--random-init", action="store_true", help="probe the architecture at initialisation")
    parser.add_argument("--img-size", type=int, help="default: the exported model's img_size")
    parser.add_argument("--epochs", type=at_least(1), default=90)
    parser.add_argument("--warmup-epochs", type=at_least(0), default=10)
    parser.add_argument("--batch-size", type=at_least(2), default=256, help="at least 2, for the BatchNorm")
    parser.add_argument("--base-lr", type=float, default=0.1)
    parser.add_argument("--num-workers", "--workers", type=at_least(0), default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, help="write the result as JSON here")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = load_encoder(args.encoder, args.random_init)
    model.to(device)
    image_size = args.img_size or model.pretrained_cfg["input_size"][-1]
    train_x, train_y = extract(model, args.train_shards, image_size, args.batch_size, args.num_workers, device)
    val_x, val_y = extract(model, args.val_shards, image_size, args.batch_size, args.num_workers, device)
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    head = train_head(train_x, train_y, num_classes, args.epochs, args.batch_size, args.base_lr,
                      min(args.warmup_epochs, args.epochs - 1), args.seed)
    with torch.no_grad():
        logits = head(val_x)
    result = {"encoder": str(args.encoder), "random_init": args.random_init, "top1": accuracy(logits, val_y, 1),
              "top5": accuracy(logits, val_y, 5), "train_samples": len(train_x), "val_samples": len(val_x),
              "feature_dim": train_x.shape[1], "epochs": args.epochs}
    if args.output:
        write_atomically(args.output, (json.dumps(result, indent=2) + "\n").encode())
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run_tool(main)
