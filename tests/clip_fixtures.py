"""A tiny open_clip model with a ViG-T image tower, and digits image-caption batches, for the CLIP tests."""
from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from pretrain.contrastive import create_clip_model

TINY_CONFIG_NAME = "Tiny-ViG-T"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"timm_model_name": "vig_tiny", "timm_model_pretrained": False, "timm_pool": "avg",
                   "timm_proj": "linear", "image_size": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def register_tiny_config(folder: Path) -> str:
    """Write the tiny config as an open_clip JSON file in ``folder`` and register it; returns its name."""
    path = Path(folder) / f"{TINY_CONFIG_NAME}.json"
    path.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(path)
    return TINY_CONFIG_NAME


def tiny_clip(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_clip_model(TINY_CONFIG)


def digits_batch(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` scikit-learn digits as 3x32x32 images and their tokenized template captions."""
    digits = load_digits()
    images = torch.tensor(digits.images[:count], dtype=torch.float32) / 16.0
    images = F.interpolate(images[:, None], size=32, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    captions = [f"a handwritten digit {label}." for label in digits.target[:count]]
    tokens = open_clip.SimpleTokenizer(context_length=16)(captions)
    return (images - 0.5) / 0.25, tokens
