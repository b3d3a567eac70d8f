"""Fine-tune a pretrained ViG, ViG-H or Vim tower for semantic segmentation on image + mask WebDataset shards.

    python -m pretrain.data.segmentation demo --out demo_data/segmentation   # derived data: docs/segmentation.md
    accelerate launch eval/segment.py recipes/demo_segment_vig_t.yaml model.encoder=runs/demo_mae_vig_t/encoder
    accelerate launch eval/segment.py recipes/segment_vig_b.yaml model.encoder=runs/mae_vig_b/encoder \
        data.train_shards=/data/ade20k/train data.val_shards=/data/ade20k/val

The BEiT / MAE ADE20K protocol on the trainers' machinery (recipes, mixed precision, checkpoints and resume,
signals, non-finite guard, DDP): the tower plus a semantic-FPN decoder (``eval/segmenter.py``), pixel-wise
cross-entropy ignoring label 255, AdamW with layer-wise LR decay (the decoder at the full LR), warm-up and cosine
decay per update, random resize / crop / flip. mIoU, mean class accuracy and pixel accuracy on ``data.val_shards``
(short side resized to the crop size, center crop; each image counted once across processes) every
``train.eval_every`` epochs and at the end, appended to ``<output_dir>/metrics.jsonl``. The fine-tuned weights are
saved to ``<output_dir>/model/model.safetensors`` with the recipe that rebuilds the model.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import set_seed
from torch import nn

from eval.accuracy import eval_mode
from eval.finetune import create_classifier, model_name, tower_config
from eval.miou import segmentation_scores
from eval.segmenter import Segmenter
from eval.tuning import (
    append_metrics,
    build_schedule,
    class_count,
    fit,
    prepare_training,
    rebuild_exported,
    recorded_class_names,
    save_with_recipe,
    training_stream_options,
    with_class_count,
)
from pretrain.checkpoints import load_for_export
from pretrain.compiling import compile_blocks
from pretrain.data.segmentation import IGNORE_INDEX, build_segmentation_loader
from pretrain.recipe import (
    NonNegativeInt,
    PositiveInt,
    RecipeError,
    load_recipe,
    recipe_to_dict,
    run_tool,
    save_recipe,
    trainer_arguments,
)
from pretrain.schema import DataSection, FinetuneOptimSection, FinetuneTrainSection
from pretrain.tracking import Tracker, build_accelerator


@dataclass
class SegmentModelSection:
    encoder: str = ""
    """An exported tower folder (``config.json`` + ``model.safetensors``) or an architecture name (random init)."""
    num_classes: PositiveInt | None = None
    """None: the ``class_names`` in the ``dataset.json`` of data.train_shards."""
    crop_size: PositiveInt = 512
    """Training crop and evaluation size; the tower is built at this input size."""
    decoder_dim: PositiveInt = 256
    dropout: float = 0.1
    drop_path_rate: float = 0.1
    layer_decay: float = 0.65


@dataclass
class SegmentAugmentSection:
    scale: tuple[float, float] = (0.5, 2.0)
    """Range of the random resize factor of the short side relative to model.crop_size."""


@dataclass
class SegmentOptimSection(FinetuneOptimSection):
    """BEiT's ADE20K settings: AdamW (0.9, 0.999), LR 1e-4 for 16 images per update, weight decay 0.05."""
    lr: float | None = 1e-4
    epochs: PositiveInt = 128
    warmup_epochs: NonNegativeInt = 0
    warmup_steps: NonNegativeInt | None = 1500
    min_lr: float = 0.0


@dataclass
class SegmentRecipe:
    model: SegmentModelSection = field(default_factory=SegmentModelSection)
    augment: SegmentAugmentSection = field(default_factory=SegmentAugmentSection)
    data: DataSection = field(default_factory=lambda: DataSection(resampled=False))
    optim: SegmentOptimSection = field(default_factory=SegmentOptimSection)
    train: FinetuneTrainSection = field(default_factory=FinetuneTrainSection)


def create_segmenter(model: SegmentModelSection, num_classes: int, tower_weights: bool = True) -> Segmenter:
    tower = create_classifier(model.encoder, 0, model.crop_size, model.drop_path_rate, tower_weights)
    return Segmenter(tower, num_classes, model.decoder_dim, model.dropout)


def load_segmenter(folder: str | Path) -> Segmenter:
    """The segmenter exported to ``folder`` (``<output_dir>/model``), in eval mode, from that folder alone."""
    return rebuild_exported(folder, SegmentRecipe, create_segmenter)


def check_masks(masks: torch.Tensor, keys: list[str], num_classes: int, shards: str) -> None:
    outside = (masks >= num_classes) & (masks != IGNORE_INDEX) | (masks < 0)
    if outside.any():
        index = int(outside.flatten(1).any(1).nonzero()[0])
        value = int(masks[index][outside[index]][0])
        raise ValueError(f"mask of sample {keys[index]} in {shards} holds label {value}, outside the model's "
                         f"{num_classes} classes (and not the ignore index {IGNORE_INDEX}): set model.num_classes "
                         "or fix the shards")


def main(argv: list[str] | None = None) -> dict | None:
    args = trainer_arguments(argv, __doc__, "segmenter", "model")
    recipe = load_recipe(args.recipe, SegmentRecipe, args.overrides)
    if not recipe.model.encoder:
        raise ValueError("model.encoder is empty: name an exported tower folder or an architecture")
    if not recipe.data.train_shards and not args.export_from:
        raise ValueError("data.train_shards is empty: segmentation needs image + mask training shards")
    num_classes = class_count(recipe, recorded_class_names(recipe.data.train_shards))
    recipe = with_class_count(recipe, num_classes)
    run_dir = Path(recipe.train.output_dir)
    accelerator = build_accelerator(recipe, run_dir)
    set_seed(recipe.train.seed, device_specific=True)

    # An export replaces every weight with the checkpoint's: the tower's architecture is all it needs.
    model = create_segmenter(recipe.model, num_classes, tower_weights=not args.export_from)
    if recipe.train.grad_checkpointing:
        model.set_grad_checkpointing(True)
    compile_blocks(model, recipe.train.compile)
    export_dir = Path(args.export_to or run_dir / "model")
    if args.export_from:
        model = load_for_export(accelerator, model, recipe.optim, run_dir / "checkpoints", args.export_from,
                                layer_decay=recipe.model.layer_decay)
        save_with_recipe(accelerator, model, recipe, f"the segmenter ({num_classes} classes)", export_dir,
                         num_classes, tower_config(recipe.model.encoder))
        return None
    crop, cfg = recipe.model.crop_size, model.pretrained_cfg
    shared = dict(rank=accelerator.process_index, world_size=accelerator.num_processes,
                  num_workers=recipe.data.num_workers, mean=cfg["mean"], std=cfg["std"])
    loader = build_segmentation_loader(recipe.data.train_shards, True, recipe.optim.batch_size, crop,
                                       scale=tuple(recipe.augment.scale),
                                       **training_stream_options(recipe), **shared)
    val_loader = None
    if recipe.data.val_shards:
        val_loader = build_segmentation_loader(recipe.data.val_shards, False, recipe.optim.batch_size, crop, **shared)
    schedule = build_schedule(recipe, model, loader, accelerator.num_processes, recipe.model.layer_decay)
    model, state, guard, checkpoints = prepare_training(accelerator, recipe, model, schedule, loader, run_dir,
                                                        val_loader is not None)
    input_dtype = next(model.parameters()).dtype  # DeepSpeed's bf16 mode holds (and expects) bf16 inputs
    criterion = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)

    def loss_of(batch) -> tuple[torch.Tensor, int]:
        images, masks, keys = batch
        check_masks(masks, keys, num_classes, recipe.data.train_shards)
        images = images.to(accelerator.device, dtype=input_dtype, non_blocking=True)
        with accelerator.autocast():
            logits = model(images)
        return criterion(logits.float(), masks.to(accelerator.device, non_blocking=True)), images.shape[0]

    def evaluate() -> dict:
        unwrapped = accelerator.unwrap_model(model)
        with eval_mode(unwrapped):
            scores = segmentation_scores(lambda images: unwrapped(images.to(dtype=input_dtype)), val_loader,
                                         num_classes, accelerator.device, IGNORE_INDEX, accelerator.autocast)
        result = {"step": state.step, "epoch": loader.epoch, **scores}
        accelerator.print(f"step {state.step}: mIoU {result['miou']:.2f}%, pixel accuracy {result['pixel_acc']:.2f}% "
                          f"({result['samples']} images)")
        tracker.log({"val/miou": result["miou"], "val/pixel_acc": result["pixel_acc"], "val/loss": result["loss"]},
                    state.step)
        append_metrics(accelerator, run_dir, result)
        return result

    checkpoints.resume(recipe.train.resume)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, run_dir / "recipe.yaml")
    tracker = Tracker(accelerator, run_dir, "segment", recipe_to_dict(recipe))
    source = "random init" if not Path(recipe.model.encoder).is_dir() else recipe.model.encoder
    last_update = min(schedule.total_updates, recipe.train.max_steps or schedule.total_updates)
    accelerator.print(f"segmentation fine-tuning of {model_name(accelerator, model)} ({source}) for {num_classes} "
                      f"classes at {crop}px: {last_update} updates from step {state.step}, global batch "
                      f"{schedule.global_batch}, lr {schedule.lr:.3g}, {accelerator.num_processes} processes")
    fit(accelerator, recipe, model, schedule, loader, state, guard, checkpoints, tracker, loss_of,
        evaluate if val_loader is not None else None, "segment")
    result = evaluate() if val_loader is not None else None
    save_with_recipe(accelerator, model, recipe, f"the segmenter ({num_classes} classes)", export_dir,
                     num_classes, tower_config(recipe.model.encoder))
    tracker.close()
    return result


if __name__ == "__main__":
    run_tool(main, sys.argv[1:], errors=(RecipeError,))
