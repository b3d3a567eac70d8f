"""MAE pretraining of a ViG, ViG-H or Vim image tower on WebDataset shards.

    accelerate launch pretrain/mae.py recipes/vig_b.yaml [section.key=value ...]
    accelerate launch pretrain/mae.py recipes/vig_b.yaml --export-from runs/mae_vig_b/checkpoints/step_00010000

Runs on CPU, one or many GPUs and nodes (DDP, or DeepSpeed ZeRO 1-3 through the accelerate configs in
``recipes/accelerate/``). The encoder is exported to ``<output_dir>/encoder`` in timm's format at the end.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torchvision.utils import make_grid

from pretrain.checkpoints import CheckpointManager, TrainState, load_for_export
from pretrain.compiling import compile_blocks
from pretrain.data import DeviceNormalize, build_loader
from pretrain.export import export_timm, sub_state_dict
from pretrain.guards import NonFiniteGuard, StopSignal
from pretrain.masked_autoencoder import MaskedAutoencoder
from pretrain.optim import build_optimizer, build_scheduler, scaled_lr, warmup_updates
from pretrain.recipe import RecipeError, load_recipe, recipe_to_dict, run_tool, save_recipe, trainer_arguments
from pretrain.schema import MAERecipe
from pretrain.tracking import Throughput, Tracker, build_accelerator, progress_bar


def encoder_args(recipe: MAERecipe) -> dict:
    return dict(img_size=recipe.model.img_size, in_chans=recipe.model.in_chans)


def export_encoder(accelerator: Accelerator, model: torch.nn.Module, recipe: MAERecipe, out_dir: Path) -> None:
    state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards; call on every process
    if accelerator.is_main_process:
        export_timm(sub_state_dict(state_dict, "encoder."), recipe.model.encoder, out_dir, **encoder_args(recipe))
        accelerator.print(f"exported encoder to {out_dir}")
    accelerator.wait_for_everyone()


def image_grid(model: MaskedAutoencoder, images: torch.Tensor, prediction: torch.Tensor, mask: torch.Tensor,
               mean: torch.Tensor, std: torch.Tensor, count: int = 8) -> torch.Tensor:
    """Rows of original / masked / reconstruction (visible patches pasted back), in [0, 1]."""
    images, prediction, mask = images[:count].float(), prediction[:count], mask[:count]
    masked, reconstruction = model.reconstruct(images, prediction, mask)
    rows = torch.cat([images, masked, reconstruction]) * std + mean
    return make_grid(rows.clamp(0, 1), nrow=images.shape[0])


def main(argv: list[str] | None = None) -> None:
    args = trainer_arguments(argv, __doc__, "encoder", "encoder")
    recipe = load_recipe(args.recipe, MAERecipe, args.overrides)
    if not recipe.data.train_shards and not args.export_from:
        raise ValueError("data.train_shards is empty: name the training shards (a folder written by "
                         "python -m pretrain.data, or a brace pattern)")
    run_dir = Path(recipe.train.output_dir)
    accelerator = build_accelerator(recipe, run_dir)
    set_seed(recipe.train.seed, device_specific=True)

    model = MaskedAutoencoder(**dataclasses.asdict(recipe.model))
    if recipe.train.grad_checkpointing:
        model.encoder.set_grad_checkpointing(True)
    compile_blocks(model, recipe.train.compile)
    if args.export_from:
        model = load_for_export(accelerator, model, recipe.optim, run_dir / "checkpoints", args.export_from)
        export_encoder(accelerator, model, recipe, Path(args.export_to or run_dir / "encoder"))
        return
    data_cfg = model.encoder.pretrained_cfg
    loader = build_loader(recipe.data.train_shards, "mae", recipe.optim.batch_size, recipe.model.img_size,
                          rank=accelerator.process_index, world_size=accelerator.num_processes,
                          num_workers=recipe.data.num_workers, resampled=recipe.data.resampled,
                          samples_per_epoch=recipe.data.samples_per_epoch if recipe.data.resampled else None,
                          seed=recipe.train.seed, shuffle_buffer=recipe.data.shuffle_buffer,
                          max_bad_fraction=recipe.data.max_bad_fraction, normalize=False,
                          pin_memory=accelerator.device.type == "cuda")
    normalize = DeviceNormalize(data_cfg["mean"], data_cfg["std"])

    updates_per_epoch = max(1, loader.steps_per_epoch // recipe.optim.accum_steps)
    total_updates = recipe.optim.epochs * updates_per_epoch
    global_batch = recipe.optim.batch_size * recipe.optim.accum_steps * accelerator.num_processes
    lr = recipe.optim.lr or scaled_lr(recipe.optim.base_lr, global_batch)
    optimizer = build_optimizer(model, lr, recipe.optim.weight_decay, recipe.optim.betas, recipe.optim.eps)
    scheduler = build_scheduler(optimizer, total_updates,
                                warmup_updates(recipe.optim, updates_per_epoch, total_updates), recipe.optim.min_lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    # DeepSpeed's bf16 (fp16) mode holds the module itself in that dtype and, unlike autocast, casts no inputs.
    input_dtype = next(model.parameters()).dtype
    state = TrainState()
    guard = NonFiniteGuard(recipe.train.max_nonfinite, accelerator)
    loader.strict_resume = recipe.train.resume_data == "exact"
    for stateful in (state, loader, scheduler, guard):
        accelerator.register_for_checkpointing(stateful)
    checkpoints = CheckpointManager(accelerator, run_dir / "checkpoints", recipe.train.keep_checkpoints)
    checkpoints.resume(recipe.train.resume)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, run_dir / "recipe.yaml")
    tracker = Tracker(accelerator, run_dir, "mae", recipe_to_dict(recipe))
    last_update = min(total_updates, recipe.train.max_steps or total_updates)
    accelerator.print(f"MAE {recipe.model.encoder} ({recipe.model.mask_mode}): {last_update} updates from step "
                      f"{state.step}, global batch {global_batch}, lr {lr:.3g}, {accelerator.num_processes} processes")
    mean = torch.tensor(data_cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(data_cfg["std"]).view(3, 1, 1)
    throughput = Throughput()
    bar = progress_bar(accelerator, total=last_update, initial=state.step, description="mae")
    grad_norm = torch.tensor(0.0)

    with StopSignal() as stop:
        while state.step < last_update:
            state.epoch = loader.epoch
            for images in loader:
                images = normalize(images, accelerator.device, input_dtype)
                with accelerator.accumulate(model):
                    scheduler.step_update(state.step)
                    with accelerator.autocast():
                        loss, prediction, mask = model(images)
                    if not guard.check(loss, state.step):
                        accelerator.backward(loss)
                        if accelerator.sync_gradients:
                            grad_norm = accelerator.clip_grad_norm_(model.parameters(),
                                                                    recipe.optim.clip_grad or math.inf)
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                throughput.update(images.shape[0] * accelerator.num_processes)
                state.samples_seen += images.shape[0] * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue
                state.step += 1
                bar.update(1)
                if state.step % recipe.train.log_every == 0 or state.step == last_update:
                    scalars = {"loss": accelerator.reduce(loss.detach(), "mean"), "lr": optimizer.param_groups[0]["lr"],
                               "grad_norm": math.nan if grad_norm is None else grad_norm,
                               "images_per_second": throughput.rate() or 0.0,
                               **loader.stats(),
                               "nonfinite_skipped": guard.skipped_total}
                    tracker.log(scalars, state.step)
                    bar.set_postfix(loss=f"{scalars['loss'].item():.4f}", lr=f"{scalars['lr']:.2e}")
                if state.step % recipe.train.image_every == 0 and accelerator.is_main_process:
                    unwrapped = accelerator.unwrap_model(model)
                    tracker.log_image("reconstruction", image_grid(unwrapped, images.cpu(), prediction.cpu(),
                                                                    mask.cpu(), mean, std), state.step)
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
    export_encoder(accelerator, model, recipe, Path(args.export_to or run_dir / "encoder"))
    tracker.close()


if __name__ == "__main__":
    run_tool(main, sys.argv[1:], errors=(RecipeError,))
