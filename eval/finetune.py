"""Fine-tune a pretrained ViG, ViG-H or Vim tower for image classification on labelled WebDataset shards.

    accelerate launch eval/finetune.py recipes/finetune_vig_b.yaml model.encoder=runs/mae_vig_b/encoder \
        data.train_shards=/data/in1k/train data.val_shards=/data/in1k/val
    accelerate launch eval/finetune.py recipes/finetune_vig_b.yaml model.encoder=vig_base   # from scratch

MAE's end-to-end fine-tuning protocol (``main_finetune.py``) on the trainers' machinery (recipes, mixed precision,
checkpoints and resume, signals, non-finite guard, DDP and DeepSpeed): a new linear head on the pooled feature,
AdamW with layer-wise LR decay, drop path, RandAugment and random erasing, mixup and cutmix with label smoothing,
warm-up and cosine decay per update. Top-1 / top-5 on ``data.val_shards`` (resize and center crop) every
``train.eval_every`` epochs and at the end, appended to ``<output_dir>/metrics.jsonl``. The fine-tuned classifier
is exported to ``<output_dir>/model`` in timm's format (``timm.create_model(name, num_classes=N,
checkpoint_path=".../model.safetensors")``).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import timm
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

import vig  # noqa: F401  (registers the architectures with timm)
from eval.accuracy import eval_mode, topk_accuracy
from eval.tuning import (
    append_metrics,
    build_schedule,
    class_count,
    fit,
    prepare_training,
    recorded_class_names,
    training_stream_options,
    with_class_count,
)
from pretrain.checkpoints import load_for_export
from pretrain.compiling import compile_blocks
from pretrain.data import build_loader
from pretrain.export import export_timm
from pretrain.recipe import RecipeError, load_recipe, recipe_to_dict, run_tool, save_recipe, trainer_arguments
from pretrain.schema import AugmentSection, FinetuneRecipe
from pretrain.tracking import Tracker, build_accelerator


def tower_config(encoder: str) -> dict:
    """What rebuilds the tower ``encoder`` names without its weights: an exported tower's ``config.json``, or
    ``{"architecture": name}`` for an architecture name."""
    config_path = Path(encoder) / "config.json"
    return json.loads(config_path.read_text()) if config_path.is_file() else {"architecture": encoder}


def tower_args(encoder: str) -> dict:
    """The architecture arguments an exported tower was built with (``in_chans``, ``global_pool``, ...; its
    ``model_args`` less ``num_classes``), or none for an architecture name."""
    model_args = tower_config(encoder).get("model_args", {})
    return {key: value for key, value in model_args.items() if key != "num_classes"}


def create_classifier(encoder: str, num_classes: int, img_size: int | None, drop_path_rate: float,
                      tower_weights: bool = True) -> nn.Module:
    """A classifier with a freshly initialised head on an exported tower's weights, or on a random tower when
    ``encoder`` names an architecture instead of a folder. ``tower_weights=False`` builds an exported tower's
    architecture alone (its folder then needs only ``config.json``), for weights loaded afterwards."""
    args = dict(num_classes=num_classes, drop_path_rate=drop_path_rate, **({"img_size": img_size} if img_size else {}))
    folder = Path(encoder)
    if folder.is_dir():
        config_path, weights = folder / "config.json", folder / "model.safetensors"
        if not config_path.is_file() or (tower_weights and not weights.is_file()):
            raise FileNotFoundError(f"{folder} is not an exported tower: it needs config.json and model.safetensors")
        config = json.loads(config_path.read_text())
        loading = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(weights))) if tower_weights else {}
        model = timm.create_model(config["architecture"], **loading, **{**tower_args(encoder), **args})
        model.pretrained_cfg = {**model.pretrained_cfg, **config.get("pretrained_cfg", {})}
    elif encoder in timm.list_models():
        model = timm.create_model(encoder, **args)
    else:
        raise FileNotFoundError(f"model.encoder={encoder!r} is neither an exported tower folder nor a registered "
                                "architecture")
    if img_size:
        channels = model.pretrained_cfg["input_size"][0]
        model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (channels, img_size, img_size)}
    return model


def input_size(model: nn.Module) -> int:
    return int(model.pretrained_cfg["input_size"][-1])


def mixup_and_loss(augment: AugmentSection, num_classes: int) -> tuple[Mixup | None, nn.Module]:
    """timm's batch mixing and the loss that matches its targets (soft targets when mixing, else smoothed)."""
    if augment.mixup > 0 or augment.cutmix > 0:
        mixup = Mixup(mixup_alpha=augment.mixup, cutmix_alpha=augment.cutmix, prob=augment.mixup_prob,
                      switch_prob=augment.mixup_switch_prob, label_smoothing=augment.smoothing,
                      num_classes=num_classes)
        return mixup, SoftTargetCrossEntropy()
    if augment.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(augment.smoothing)
    return None, nn.CrossEntropyLoss()


def check_labels(labels: torch.Tensor, num_classes: int, shards: str) -> None:
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(labels.max() if labels.max() >= num_classes else labels.min())
        raise ValueError(f"label {bad} in {shards} is outside the model's {num_classes} classes: set "
                         "model.num_classes or fix the shards' labels")


def export_classifier(accelerator: Accelerator, model: nn.Module, class_names: list[str] | None, num_classes: int,
                      out_dir: Path, model_args: dict) -> None:
    state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards; call on every process
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        export_timm(state_dict, unwrapped.pretrained_cfg["architecture"], out_dir, num_classes=num_classes,
                    label_names=class_names, **{**model_args, "img_size": input_size(unwrapped)})
        accelerator.print(f"exported the classifier to {out_dir}")
    accelerator.wait_for_everyone()


def model_name(accelerator: Accelerator, model: nn.Module) -> str:
    return accelerator.unwrap_model(model).pretrained_cfg["architecture"]


def main(argv: list[str] | None = None) -> dict | None:
    args = trainer_arguments(argv, __doc__, "classifier", "model")
    recipe = load_recipe(args.recipe, FinetuneRecipe, args.overrides)
    if not recipe.model.encoder:
        raise ValueError("model.encoder is empty: name an exported tower folder or an architecture")
    if not recipe.data.train_shards and not args.export_from:
        raise ValueError("data.train_shards is empty: fine-tuning needs labelled training shards")
    run_dir = Path(recipe.train.output_dir)
    accelerator = build_accelerator(recipe, run_dir)
    set_seed(recipe.train.seed, device_specific=True)

    class_names = recorded_class_names(recipe.data.train_shards)
    num_classes = class_count(recipe, class_names)
    recipe = with_class_count(recipe, num_classes)
    if class_names is not None and len(class_names) != num_classes:
        class_names = None  # a head of another size than the recorded classes: export it without label names
    # An export replaces every weight with the checkpoint's: the tower's architecture is all it needs.
    model = create_classifier(recipe.model.encoder, num_classes, recipe.model.img_size, recipe.model.drop_path_rate,
                              tower_weights=not args.export_from)
    if recipe.train.grad_checkpointing:
        model.set_grad_checkpointing(True)
    compile_blocks(model, recipe.train.compile)
    export_dir = Path(args.export_to or run_dir / "model")
    if args.export_from:
        if class_names is None:
            accelerator.print(f"no class names recorded with data.train_shards={recipe.data.train_shards!r}: the "
                              "export has no label_names")
        model = load_for_export(accelerator, model, recipe.optim, run_dir / "checkpoints", args.export_from,
                                layer_decay=recipe.model.layer_decay)
        export_classifier(accelerator, model, class_names, num_classes, export_dir, tower_args(recipe.model.encoder))
        return None
    image_size, data_cfg = input_size(model), model.pretrained_cfg
    augment = recipe.augment
    mixup, criterion = mixup_and_loss(augment, num_classes)
    if mixup is not None and recipe.optim.batch_size % 2:
        raise ValueError(f"mixup and cutmix pair each image with another: optim.batch_size must be even, not "
                         f"{recipe.optim.batch_size}")
    loader = build_loader(recipe.data.train_shards, "classify", recipe.optim.batch_size, image_size,
                          rank=accelerator.process_index, world_size=accelerator.num_processes,
                          num_workers=recipe.data.num_workers, mean=data_cfg["mean"], std=data_cfg["std"],
                          **training_stream_options(recipe),
                          augment=dict(auto_augment=augment.auto_augment, color_jitter=augment.color_jitter,
                                       re_prob=augment.re_prob, scale=tuple(augment.scale)))
    val_loader = None
    if recipe.data.val_shards:
        val_loader = build_loader(recipe.data.val_shards, "eval", recipe.optim.batch_size, image_size,
                                  rank=accelerator.process_index, world_size=accelerator.num_processes,
                                  num_workers=recipe.data.num_workers, mean=data_cfg["mean"], std=data_cfg["std"],
                                  crop_pct=data_cfg.get("crop_pct", 0.875))

    schedule = build_schedule(recipe, model, loader, accelerator.num_processes, recipe.model.layer_decay)
    model, state, guard, checkpoints = prepare_training(accelerator, recipe, model, schedule, loader, run_dir,
                                                        val_loader is not None)
    # DeepSpeed's bf16 (fp16) mode holds the module itself in that dtype and, unlike autocast, casts no inputs.
    input_dtype = next(model.parameters()).dtype

    def evaluate() -> dict:
        unwrapped = accelerator.unwrap_model(model)
        with eval_mode(unwrapped):
            result = topk_accuracy(lambda images: unwrapped(images.to(dtype=input_dtype)), val_loader, num_classes,
                                   accelerator.device, autocast=accelerator.autocast)
        result = {"step": state.step, "epoch": loader.epoch, **result}
        accelerator.print(f"step {state.step}: top-1 {result['top1']:.2f}%, top-5 {result['top5']:.2f}% "
                          f"({result['samples']} images)")
        tracker.log({"val/top1": result["top1"], "val/top5": result["top5"], "val/loss": result["loss"]},
                    state.step)
        append_metrics(accelerator, run_dir, result)
        return result

    def loss_of(batch) -> tuple[torch.Tensor, int]:
        images, labels = batch
        check_labels(labels, num_classes, recipe.data.train_shards)
        images = images.to(accelerator.device, dtype=input_dtype, non_blocking=True)
        targets = labels.to(accelerator.device, non_blocking=True)
        if mixup is not None:
            images, targets = mixup(images, targets)
        with accelerator.autocast():
            return criterion(model(images).float(), targets), images.shape[0]

    checkpoints.resume(recipe.train.resume)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, run_dir / "recipe.yaml")
    tracker = Tracker(accelerator, run_dir, "finetune", recipe_to_dict(recipe))
    last_update = min(schedule.total_updates, recipe.train.max_steps or schedule.total_updates)
    source = "random init" if not Path(recipe.model.encoder).is_dir() else recipe.model.encoder
    accelerator.print(f"fine-tuning {model_name(accelerator, model)} ({source}) for {num_classes} classes at "
                      f"{image_size}px: {last_update} updates from step {state.step}, global batch "
                      f"{schedule.global_batch}, lr {schedule.lr:.3g}, {accelerator.num_processes} processes")
    fit(accelerator, recipe, model, schedule, loader, state, guard, checkpoints, tracker, loss_of,
        evaluate if val_loader is not None else None, "finetune")
    result = evaluate() if val_loader is not None else None
    export_classifier(accelerator, model, class_names, num_classes, export_dir, tower_args(recipe.model.encoder))
    tracker.close()
    return result


if __name__ == "__main__":
    run_tool(main, sys.argv[1:], errors=(RecipeError,))
