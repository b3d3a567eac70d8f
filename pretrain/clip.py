"""CLIP or SigLIP pretraining of a ViG, ViG-H or Vim image tower through open_clip on image-text WebDataset shards.

    accelerate launch pretrain/clip.py recipes/clip_vig_b.yaml [section.key=value ...]
    accelerate launch pretrain/clip.py recipes/clip_vig_b.yaml --export-from runs/clip_vig_b/checkpoints/step_00010000

Same machinery as ``pretrain/mae.py`` (recipes, mixed precision, checkpoints and resume, signals, non-finite guard,
DDP and DeepSpeed). Gradient accumulation is contrastive, as open_clip's ``--accum-freq``: the features of all
``optim.accum_steps`` micro-batches are computed first without gradients, then each micro-batch is run again with
gradients against that cached set, so the loss sees ``batch_size x accum_steps x processes`` pairs. With
``data.val_shards`` set, zero-shot classification runs every ``zeroshot.every`` updates and at the end. The model
is exported to ``<output_dir>/export`` (open_clip) with its image tower in timm's format (``export/image_tower``).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import open_clip
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed

from eval.zeroshot import load_class_names, load_templates, zero_shot
from pretrain.checkpoints import CheckpointManager, TrainState, load_for_export
from pretrain.compiling import compile_blocks
from pretrain.contrastive import (
    ContrastiveModel,
    build_loss,
    clip_model_config,
    clip_tokenizer,
    contrastive_loss,
    create_clip_model,
    export_clip,
    similarity_accuracy,
)
from pretrain.data import DeviceNormalize, build_loader
from pretrain.guards import NonFiniteGuard, StopSignal
from pretrain.optim import build_optimizer, build_scheduler, scaled_lr, warmup_updates
from pretrain.recipe import RecipeError, load_recipe, recipe_to_dict, run_tool, save_recipe, trainer_arguments
from pretrain.schema import CLIPRecipe
from pretrain.tracking import Throughput, Tracker, build_accelerator, progress_bar


def export_model(accelerator: Accelerator, model: torch.nn.Module, model_cfg: dict, out_dir: Path) -> None:
    state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards; call on every process
    if accelerator.is_main_process:
        clip_state = {key.removeprefix("clip."): value for key, value in state_dict.items()}
        preprocess = open_clip.get_model_preprocess_cfg(accelerator.unwrap_model(model).clip)
        export_clip(clip_state, model_cfg, out_dir, preprocess)
        accelerator.print(f"exported the model to {out_dir} (image tower in {out_dir / 'image_tower'})")
    accelerator.wait_for_everyone()


def train_update(accelerator: Accelerator, model: torch.nn.Module, loss_fn: torch.nn.Module,
                 micro_batches: list[tuple[torch.Tensor, torch.Tensor]], guard: NonFiniteGuard, step: int):
    """Forward and backward of one optimizer update; returns (loss, outputs of the last micro-batch, skipped).

    With several micro-batches, the features of all of them are computed first without gradients; each micro-batch
    then runs again with gradients, its slice replaced by live features, so every backward sees all pairs. The sum of
    those backwards is the gradient of the full loss, hence the ``* count`` that undoes accelerate's division by the
    accumulation steps (open_clip's ``--accum-freq`` also counts the logit scale's gradient k times; here it is exact).
    """
    if len(micro_batches) == 1:
        images, texts = micro_batches[0]
        with accelerator.accumulate(model):
            with accelerator.autocast():
                out = model(images, texts)
                loss = contrastive_loss(loss_fn, out)
            if guard.check(loss, step):
                return loss, out, True
            accelerator.backward(loss)
        return loss, out, False

    with torch.no_grad(), accelerator.autocast():
        cached = [model(images, texts) for images, texts in micro_batches]
        features = {key: [out[key] for out in cached] for key in ("image_features", "text_features")}
        full = {key: torch.cat(value) for key, value in features.items()}
        loss = contrastive_loss(loss_fn, {**cached[-1], **full})
    if guard.check(loss, step):
        return loss, cached[-1], True
    count = len(micro_batches)
    for index, (images, texts) in enumerate(micro_batches):
        with accelerator.accumulate(model), accelerator.autocast():
            out = model(images, texts)
            live = {key: torch.cat([*value[:index], out[key], *value[index + 1:]]) for key, value in features.items()}
            # Every pass sees all logits, so the scale and bias would collect k times their gradient; a 1/k share
            # per pass (same value) makes the sum exact.
            shared = {key: out[key] / count + out[key].detach() * (count - 1) / count
                      for key in ("logit_scale", "logit_bias") if key in out}
            micro_loss = contrastive_loss(loss_fn, {**out, **live, **shared})
        accelerator.backward(micro_loss * count)
    return loss, out, False


def main(argv: list[str] | None = None) -> dict | None:
    args = trainer_arguments(argv, __doc__, "model", "export")
    recipe = load_recipe(args.recipe, CLIPRecipe, args.overrides)
    if not recipe.data.train_shards and not args.export_from:
        raise ValueError("data.train_shards is empty: name the image-text training shards (a folder written by "
                         "python -m pretrain.data, or a brace pattern)")
    run_dir = Path(recipe.train.output_dir)
    accelerator = build_accelerator(recipe, run_dir)
    set_seed(recipe.train.seed, device_specific=True)

    model_cfg = clip_model_config(recipe.model.config, image_size=recipe.model.image_size, loss=recipe.model.loss,
                                  text_model_dir=recipe.model.text_model_dir,
                                  drop_path_rate=recipe.model.drop_path_rate)
    clip_model = create_clip_model(model_cfg)
    if recipe.train.grad_checkpointing:
        clip_model.visual.set_grad_checkpointing(True)
    model = ContrastiveModel(clip_model, lock_text=recipe.model.lock_text, text_cache_size=recipe.model.text_cache_size)
    compile_blocks(model, recipe.train.compile)
    export_dir = Path(args.export_to or run_dir / "export")
    if args.export_from:
        model = load_for_export(accelerator, model, recipe.optim, run_dir / "checkpoints", args.export_from)
        export_model(accelerator, model, model_cfg, export_dir)
        return None
    tokenizer = clip_tokenizer(model_cfg)
    preprocess = open_clip.get_model_preprocess_cfg(clip_model)
    loader = build_loader(recipe.data.train_shards, "clip", recipe.optim.batch_size, recipe.model.image_size,
                          rank=accelerator.process_index, world_size=accelerator.num_processes,
                          num_workers=recipe.data.num_workers, resampled=recipe.data.resampled,
                          samples_per_epoch=recipe.data.samples_per_epoch if recipe.data.resampled else None,
                          seed=recipe.train.seed, shuffle_buffer=recipe.data.shuffle_buffer, tokenizer=tokenizer,
                          max_bad_fraction=recipe.data.max_bad_fraction, normalize=False,
                          pin_memory=accelerator.device.type == "cuda")
    normalize = DeviceNormalize(preprocess["mean"], preprocess["std"])

    accum = recipe.optim.accum_steps
    updates_per_epoch = max(1, loader.steps_per_epoch // accum)
    total_updates = recipe.optim.epochs * updates_per_epoch
    warmup = warmup_updates(recipe.optim, updates_per_epoch, total_updates)
    global_batch = recipe.optim.batch_size * accum * accelerator.num_processes
    lr = recipe.optim.lr or scaled_lr(recipe.optim.base_lr, global_batch)
    optimizer = build_optimizer(model, lr, recipe.optim.weight_decay, recipe.optim.betas, recipe.optim.eps)
    scheduler = build_scheduler(optimizer, total_updates, warmup, recipe.optim.min_lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    loss_fn = build_loss(recipe.model.loss, accelerator.process_index, accelerator.num_processes,
                         local_loss=recipe.model.local_loss, gather_with_grad=recipe.model.gather_with_grad)
    state = TrainState()
    guard = NonFiniteGuard(recipe.train.max_nonfinite, accelerator)
    loader.strict_resume = recipe.train.resume_data == "exact"
    for stateful in (state, loader, scheduler, guard):
        accelerator.register_for_checkpointing(stateful)
    checkpoints = CheckpointManager(accelerator, run_dir / "checkpoints", recipe.train.keep_checkpoints)

    zeroshot = None
    if recipe.data.val_shards:
        if accelerator.distributed_type == DistributedType.DEEPSPEED and \
                accelerator.state.deepspeed_plugin.zero_stage == 3:
            raise ValueError("zero-shot evaluation during training needs whole weights on every process; with "
                             "ZeRO-3 leave data.val_shards empty and evaluate the export with python -m eval.zeroshot")
        zeroshot = dict(class_names=load_class_names(recipe.zeroshot.class_names, recipe.data.val_shards),
                        templates=load_templates(recipe.zeroshot.templates, recipe.data.val_shards))

    def evaluate() -> dict:
        result = zero_shot(accelerator.unwrap_model(model).clip, tokenizer, recipe.data.val_shards,
                           **zeroshot, image_size=recipe.model.image_size, batch_size=recipe.zeroshot.batch_size,
                           num_workers=recipe.data.num_workers, device=accelerator.device,
                           mean=preprocess["mean"], std=preprocess["std"], rank=accelerator.process_index,
                           world_size=accelerator.num_processes, autocast=accelerator.autocast)
        accelerator.print(f"step {state.step}: zero-shot top-1 {result['top1']:.2f}%, top-5 {result['top5']:.2f}% "
                          f"({result['samples']} images, {len(zeroshot['class_names'])} classes)")
        tracker.log({"zeroshot/top1": result["top1"], "zeroshot/top5": result["top5"]}, state.step)
        return result

    checkpoints.resume(recipe.train.resume)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, run_dir / "recipe.yaml")
    tracker = Tracker(accelerator, run_dir, "clip", recipe_to_dict(recipe))
    last_update = min(total_updates, recipe.train.max_steps or total_updates)
    accelerator.print(f"{recipe.model.loss.upper()} {recipe.model.config} at {recipe.model.image_size}px: "
                      f"{last_update} updates from step {state.step}, global batch {global_batch}, lr {lr:.3g}, "
                      f"{accelerator.num_processes} processes")
    # DeepSpeed's bf16 (fp16) mode holds the module itself in that dtype and, unlike autocast, casts no inputs.
    input_dtype = next(model.parameters()).dtype
    throughput = Throughput()
    bar = progress_bar(accelerator, total=last_update, initial=state.step, description=recipe.model.loss)
    grad_norm = torch.tensor(0.0)
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    with StopSignal() as stop:
        while state.step < last_update:
            state.epoch = loader.epoch
            for images, texts in loader:
                micro_batches.append((normalize(images, accelerator.device, input_dtype),
                                      texts.to(accelerator.device, non_blocking=True)))
                if len(micro_batches) < accum:
                    continue
                scheduler.step_update(state.step)
                loss, out, skipped = train_update(accelerator, model, loss_fn, micro_batches, guard, state.step)
                if not skipped:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), recipe.optim.clip_grad or math.inf)
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                samples = sum(batch[0].shape[0] for batch in micro_batches) * accelerator.num_processes
                micro_batches = []
                throughput.update(samples)
                state.samples_seen += samples
                state.step += 1
                bar.update(1)
                if state.step % recipe.train.log_every == 0 or state.step == last_update:
                    scalars = {"loss": accelerator.reduce(loss.detach().float(), "mean"),
                               "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
                               "logit_scale": out["logit_scale"].detach().float(),
                               "batch_accuracy": accelerator.reduce(similarity_accuracy(out).detach(), "mean"),
                               "images_per_second": throughput.rate() or 0.0,
                               **loader.stats(),
                               "nonfinite_skipped": guard.skipped_total}
                    tracker.log(scalars, state.step)
                    bar.set_postfix(loss=f"{scalars['loss'].item():.4f}", lr=f"{scalars['lr']:.2e}")
                if zeroshot and recipe.zeroshot.every and state.step % recipe.zeroshot.every == 0 \
                        and state.step != last_update:
                    evaluate()
                stopping = stop.should_stop(accelerator)
                if state.step % recipe.train.checkpoint_every == 0 or stopping or state.step == last_update:
                    checkpoints.save(state.step)
                if stopping:
                    accelerator.print(f"stopped by {stop.received} at step {state.step}; resume with train.resume=auto")
                    tracker.close()
                    raise SystemExit(stop.exit_status)
                if state.step >= last_update:
                    break
    bar.close()
    result = evaluate() if zeroshot else None
    export_model(accelerator, model, model_cfg, export_dir)
    tracker.close()
    return result


if __name__ == "__main__":
    run_tool(main, sys.argv[1:], errors=(RecipeError,))
