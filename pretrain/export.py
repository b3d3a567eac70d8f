"""Export a pretrained image tower in timm's format (``config.json`` + ``model.safetensors``).

The folder loads with ``timm.create_model(name, checkpoint_path=f"{folder}/model.safetensors", num_classes=0)``
or ``timm.create_model("local-dir:" + folder, pretrained=True)``; for fine-tuning with a new head, use
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...), num_classes=N)``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import timm
import torch
from timm.models import save_for_hf

import vig  # noqa: F401  (registers the architectures with timm)
from pretrain.atomic import atomic_directory


def export_timm(state_dict: Mapping[str, torch.Tensor], architecture: str, out_dir: str | Path, *,
                num_classes: int = 0, label_names: Sequence[str] | None = None, **model_args) -> Path:
    """Build ``architecture`` with ``model_args`` (headless, or with a ``num_classes`` head whose classes
    ``label_names`` names), load ``state_dict`` strictly and write the folder atomically: a crash leaves the
    previous export (or nothing), never half of one."""
    out_dir = Path(out_dir)
    if label_names is not None and len(label_names) != num_classes:
        raise ValueError(f"{len(label_names)} label names for a head of {num_classes} classes")
    model = timm.create_model(architecture, num_classes=num_classes, **model_args)
    model.load_state_dict({k: v.detach().float().cpu() for k, v in state_dict.items()}, strict=True)
    # The registered tag (in1k) names the official ImageNet weights, which these are not.
    model.pretrained_cfg = {key: value for key, value in model.pretrained_cfg.items() if key != "tag"}
    if "img_size" in model_args:
        size = model_args["img_size"]
        height, width = (size, size) if isinstance(size, int) else size
        model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (model_args.get("in_chans", 3), height, width)}
    with atomic_directory(out_dir) as staging:
        save_for_hf(model, str(staging), model_config={"label_names": list(label_names)} if label_names else None,
                    model_args=dict(model_args), safe_serialization=True)
    return out_dir


def sub_state_dict(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix`` (e.g. ``encoder.``) with the prefix removed."""
    return {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
