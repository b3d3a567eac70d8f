"""Fine-tune a pretrained ViG, ViG-H or Vim tower for object detection on image + boxes WebDataset shards.

    python -m pretrain.data.detection demo --out demo_data/detection       # derived data: docs/detection.md
    accelerate launch eval/detect.py recipes/demo_detect_vig_t.yaml model.encoder=runs/demo_mae_vig_t/encoder
    accelerate launch eval/detect.py recipes/detect_vig_b.yaml model.encoder=runs/mae_vig_b/encoder \
        data.train_shards=/data/coco/train data.val_shards=/data/coco/val

The ViTDet / MAE COCO protocol, reduced, on the trainers' machinery (recipes, mixed precision, checkpoints and
resume, signals, non-finite guard, DDP): the tower's pyramid through an FPN into torchvision's Faster R-CNN
(``eval/detector.py``), AdamW with layer-wise LR decay (FPN and heads at the full LR), warm-up and cosine decay per
update, large-scale jitter and flip. COCO box AP, AP50, AP75 (pycocotools) on ``data.val_shards`` (each image once
across processes) every ``train.eval_every`` epochs and at the end, appended to ``<output_dir>/metrics.jsonl``. The
fine-tuned weights are saved to ``<output_dir>/model/model.safetensors`` with the recipe that rebuilds the model.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import set_seed

from eval.accuracy import eval_mode
from eval.box_map import detection_scores
from eval.detector import Detector
from eval.finetune import create_classifier, model_name, tower_config
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
from pretrain.data.detection import build_detection_loader
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
class DetectModelSection:
    encoder: str = ""
    """An exported tower folder (``config.json`` + ``model.safetensors``) or an architecture name (random init)."""
    num_classes: PositiveInt | None = None
    """Object classes, background not counted; None: the ``class_names`` of data.train_shards' ``dataset.json``."""
    image_size: PositiveInt = 1024
    """Images are resized to fit this square and padded to it; the tower is built at this input size."""
    fpn_dim: PositiveInt = 256
    box_head_dim: PositiveInt = 1024
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    """One anchor size (pixels) per FPN level, strides 4, 8, 16, 32, 64; ratios 0.5, 1, 2."""
    detections_per_image: PositiveInt = 100
    proposals: PositiveInt = 1000
    """RPN proposals kept per image at test time (twice as many in training)."""
    rois_per_image: PositiveInt = 512
    """Proposals sampled per training image for the RoI heads' losses."""
    drop_path_rate: float = 0.1
    layer_decay: float = 0.7


@dataclass
class DetectAugmentSection:
    scale: tuple[float, float] = (0.1, 2.0)
    """Large-scale jitter: range of the resize factor relative to model.image_size before the square crop."""


@dataclass
class DetectOptimSection(FinetuneOptimSection):
    """ViTDet's COCO settings: AdamW (0.9, 0.999), LR 1e-4 for 64 images per update, weight decay 0.1."""
    lr: float | None = 1e-4
    weight_decay: float = 0.1
    epochs: PositiveInt = 100
    warmup_epochs: NonNegativeInt = 0
    warmup_steps: NonNegativeInt | None = 250
    min_lr: float = 0.0


@dataclass
class DetectRecipe:
    model: DetectModelSection = field(default_factory=DetectModelSection)
    augment: DetectAugmentSection = field(default_factory=DetectAugmentSection)
    data: DataSection = field(default_factory=lambda: DataSection(resampled=False))
    optim: DetectOptimSection = field(default_factory=DetectOptimSection)
    train: FinetuneTrainSection = field(default_factory=FinetuneTrainSection)


def load_detector(folder: str | Path) -> Detector:
    """The detector exported to ``folder`` (``<output_dir>/model``), in eval mode, from that folder alone."""
    return rebuild_exported(folder, DetectRecipe, create_detector)


def create_detector(model: DetectModelSection, num_classes: int, tower_weights: bool = True) -> Detector:
    tower = create_classifier(model.encoder, 0, model.image_size, model.drop_path_rate, tower_weights)
    return Detector(tower, num_classes, model.image_size, model.fpn_dim, model.box_head_dim,
                    tuple(model.anchor_sizes), model.detections_per_image, model.proposals, model.rois_per_image)


def check_labels(targets: list[dict], keys: list[str], num_classes: int, shards: str) -> None:
    for target, key in zip(targets, keys):
        outside = target["labels"][(target["labels"] < 0) | (target["labels"] >= num_classes)]
        if len(outside):
            raise ValueError(f"sample {key} in {shards} holds label {int(outside[0])}, outside the model's "
                             f"{num_classes} classes: set model.num_classes or fix the shards")


def main(argv: list[str] | None = None) -> dict | None:
    args = trainer_arguments(argv, __doc__, "detector", "model")
    recipe = load_recipe(args.recipe, DetectRecipe, args.overrides)
    if not recipe.model.encoder:
        raise ValueError("model.encoder is empty: name an exported tower folder or an architecture")
    if not recipe.data.train_shards and not args.export_from:
        raise ValueError("data.train_shards is empty: detection needs image + boxes training shards")
    num_classes = class_count(recipe, recorded_class_names(recipe.data.train_shards))
    recipe = with_class_count(recipe, num_classes)
    run_dir = Path(recipe.train.output_dir)
    accelerator = build_accelerator(recipe, run_dir)
    set_seed(recipe.train.seed, device_specific=True)

    # An export replaces every weight with the checkpoint's: the tower's architecture is all it needs.
    model = create_detector(recipe.model, num_classes, tower_weights=not args.export_from)
    if recipe.train.grad_checkpointing:
        model.set_grad_checkpointing(True)
    compile_blocks(model, recipe.train.compile)
    export_dir = Path(args.export_to or run_dir / "model")
    if args.export_from:
        model = load_for_export(accelerator, model, recipe.optim, run_dir / "checkpoints", args.export_from,
                                layer_decay=recipe.model.layer_decay)
        save_with_recipe(accelerator, model, recipe, f"the detector ({num_classes} classes)", export_dir,
                         num_classes, tower_config(recipe.model.encoder))
        return None
    size = recipe.model.image_size
    shared = dict(rank=accelerator.process_index, world_size=accelerator.num_processes,
                  num_workers=recipe.data.num_workers)
    loader = build_detection_loader(recipe.data.train_shards, True, recipe.optim.batch_size, size,
                                    scale=tuple(recipe.augment.scale),
                                    **training_stream_options(recipe), **shared)
    val_loader = None
    if recipe.data.val_shards:
        val_loader = build_detection_loader(recipe.data.val_shards, False, recipe.optim.batch_size, size, **shared)
    schedule = build_schedule(recipe, model, loader, accelerator.num_processes, recipe.model.layer_decay)
    model, state, guard, checkpoints = prepare_training(accelerator, recipe, model, schedule, loader, run_dir,
                                                        val_loader is not None)
    input_dtype = next(model.parameters()).dtype  # DeepSpeed's bf16 mode holds (and expects) bf16 inputs

    def loss_of(batch) -> tuple[torch.Tensor, int]:
        images, targets, keys = batch
        check_labels(targets, keys, num_classes, recipe.data.train_shards)
        images = [image.to(accelerator.device, dtype=input_dtype, non_blocking=True) for image in images]
        # torchvision's labels count background as 0
        targets = [{"boxes": target["boxes"].to(accelerator.device), "labels": target["labels"].to(
            accelerator.device) + 1} for target in targets]
        with accelerator.autocast():
            losses = model(images, targets)
        return sum(loss.float() for loss in losses.values()), len(images)

    def evaluate() -> dict:
        unwrapped = accelerator.unwrap_model(model)
        with eval_mode(unwrapped):
            scores = detection_scores(lambda images: unwrapped([image.to(dtype=input_dtype) for image in images]),
                                      val_loader, num_classes, accelerator.device, accelerator.autocast)
        result = {"step": state.step, "epoch": loader.epoch, **scores}
        accelerator.print(f"step {state.step}: box AP {result['ap']:.2f}, AP50 {result['ap50']:.2f}, AP75 "
                          f"{result['ap75']:.2f} ({result['samples']} images)")
        tracker.log({f"val/{name}": result[name] for name in ("ap", "ap50", "ap75")}, state.step)
        append_metrics(accelerator, run_dir, result)
        return result

    checkpoints.resume(recipe.train.resume)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, run_dir / "recipe.yaml")
    tracker = Tracker(accelerator, run_dir, "detect", recipe_to_dict(recipe))
    source = "random init" if not Path(recipe.model.encoder).is_dir() else recipe.model.encoder
    last_update = min(schedule.total_updates, recipe.train.max_steps or schedule.total_updates)
    accelerator.print(f"detection fine-tuning of {model_name(accelerator, model)} ({source}) for {num_classes} "
                      f"classes at {size}px: {last_update} updates from step {state.step}, global batch "
                      f"{schedule.global_batch}, lr {schedule.lr:.3g}, {accelerator.num_processes} processes")
    fit(accelerator, recipe, model, schedule, loader, state, guard, checkpoints, tracker, loss_of,
        evaluate if val_loader is not None else None, "detect")
    result = evaluate() if val_loader is not None else None
    save_with_recipe(accelerator, model, recipe, f"the detector ({num_classes} classes)", export_dir,
                     num_classes, tower_config(recipe.model.encoder))
    tracker.close()
    return result


if __name__ == "__main__":
    run_tool(main, sys.argv[1:], errors=(RecipeError,))
