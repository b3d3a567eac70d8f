"""The fine-tuning loop shared by classification, segmentation and detection (``finetune.py``, ``segment.py``,
``detect.py``): optimizer
and schedule, updates with accumulation, the non-finite guard and gradient clipping, logging, periodic evaluation,
checkpoints and stopping on a signal."""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file
from torch import nn

from pretrain.atomic import atomic_directory, write_atomically
from pretrain.checkpoints import CheckpointManager, TrainState
from pretrain.data import ShardLoader, read_dataset_info
from pretrain.guards import NonFiniteGuard, StopSignal
from pretrain.optim import build_optimizer, build_scheduler, scaled_lr, warmup_updates
from pretrain.recipe import load_recipe, save_recipe
from pretrain.tracking import Throughput, Tracker, progress_bar

TOWER_FOLDER = "tower"  # in a save_with_recipe export: the tower's config.json


@dataclass
class Schedule:
    optimizer: torch.optim.Optimizer
    scheduler: object
    lr: float
    updates_per_epoch: int
    total_updates: int
    global_batch: int


def build_schedule(recipe, model: nn.Module, loader: ShardLoader, num_processes: int, layer_decay: float) -> Schedule:
    """AdamW with layer-wise LR decay and the per-update warm-up + cosine schedule of ``recipe.optim``."""
    optim = recipe.optim
    updates_per_epoch = max(1, loader.steps_per_epoch // optim.accum_steps)
    total_updates = optim.epochs * updates_per_epoch
    global_batch = optim.batch_size * optim.accum_steps * num_processes
    lr = optim.lr or scaled_lr(optim.base_lr, global_batch)
    optimizer = build_optimizer(model, lr, optim.weight_decay, optim.betas, optim.eps, layer_decay=layer_decay)
    warmup = warmup_updates(optim, updates_per_epoch, total_updates)
    scheduler = build_scheduler(optimizer, total_updates, warmup, optim.min_lr)
    return Schedule(optimizer, scheduler, lr, updates_per_epoch, total_updates, global_batch)


def prepare_training(accelerator: Accelerator, recipe, model: nn.Module, schedule: Schedule, loader: ShardLoader,
                     run_dir: Path, evaluating: bool
                     ) -> tuple[nn.Module, TrainState, NonFiniteGuard, CheckpointManager]:
    """The prepared model (``schedule.optimizer`` prepared in place), the progress counters and non-finite guard,
    registered with the loader and scheduler for checkpointing (in the order resumed checkpoints expect), and the
    run's checkpoint manager."""
    model, schedule.optimizer = accelerator.prepare(model, schedule.optimizer)
    if evaluating and accelerator.distributed_type == DistributedType.DEEPSPEED \
            and accelerator.state.deepspeed_plugin.zero_stage == 3:
        raise ValueError("evaluation during fine-tuning needs whole weights on every process; with ZeRO-3 leave "
                         "data.val_shards empty and evaluate the exported model")
    state = TrainState()
    guard = NonFiniteGuard(recipe.train.max_nonfinite, accelerator)
    loader.strict_resume = recipe.train.resume_data == "exact"
    for stateful in (state, loader, schedule.scheduler, guard):
        accelerator.register_for_checkpointing(stateful)
    return model, state, guard, CheckpointManager(accelerator, run_dir / "checkpoints", recipe.train.keep_checkpoints)


def append_metrics(accelerator: Accelerator, run_dir: Path, result: dict) -> None:
    """Append one JSON line to ``<run_dir>/metrics.jsonl``, replacing the file atomically (main process)."""
    if accelerator.is_main_process:
        metrics = run_dir / "metrics.jsonl"
        previous = metrics.read_text() if metrics.is_file() else ""
        write_atomically(metrics, (previous + json.dumps(result) + "\n").encode())


def max_lr(optimizer: torch.optim.Optimizer) -> float:
    """The LR of the groups at full rate (the head's, under layer-wise decay)."""
    return max(group["lr"] for group in optimizer.param_groups)


def fit(accelerator: Accelerator, recipe, model: nn.Module, schedule: Schedule, loader: ShardLoader,
        state: TrainState, guard: NonFiniteGuard, checkpoints: CheckpointManager, tracker: Tracker,
        loss_of: Callable[[object], tuple[torch.Tensor, int]], evaluate: Callable[[], dict] | None,
        description: str) -> None:
    """Train until ``train.max_steps`` or the schedule's end. A signal (SIGTERM, SIGINT) stops it after the current
    update: a checkpoint is saved and ``SystemExit`` raised with ``StopSignal.exit_status``.

    ``loss_of(batch)`` returns the batch's loss and image count; ``evaluate`` (if any) runs every
    ``train.eval_every`` epochs before the last update (the caller evaluates at the end).
    """
    optimizer, scheduler = schedule.optimizer, schedule.scheduler
    last_update = min(schedule.total_updates, recipe.train.max_steps or schedule.total_updates)
    throughput = Throughput()
    bar = progress_bar(accelerator, total=last_update, initial=state.step, description=description)
    grad_norm = torch.tensor(0.0)
    eval_every = recipe.train.eval_every * schedule.updates_per_epoch
    with StopSignal() as stop:
        while state.step < last_update:
            state.epoch = loader.epoch
            for batch in loader:
                with accelerator.accumulate(model):
                    scheduler.step_update(state.step)
                    loss, images = loss_of(batch)
                    if not guard.check(loss, state.step):
                        accelerator.backward(loss)
                        if accelerator.sync_gradients:
                            grad_norm = accelerator.clip_grad_norm_(model.parameters(),
                                                                    recipe.optim.clip_grad or math.inf)
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                throughput.update(images * accelerator.num_processes)
                state.samples_seen += images * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue
                state.step += 1
                bar.update(1)
                if state.step % recipe.train.log_every == 0 or state.step == last_update:
                    scalars = {"loss": accelerator.reduce(loss.detach(), "mean"), "lr": max_lr(optimizer),
                               "grad_norm": math.nan if grad_norm is None else grad_norm,
                               "images_per_second": throughput.rate() or 0.0,
                               **loader.stats(),
                               "nonfinite_skipped": guard.skipped_total}
                    tracker.log(scalars, state.step)
                    bar.set_postfix(loss=f"{scalars['loss'].item():.4f}", lr=f"{scalars['lr']:.2e}")
                if evaluate is not None and eval_every and state.step % eval_every == 0 \
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


def save_with_recipe(accelerator: Accelerator, model: nn.Module, recipe, description: str, out_dir: Path,
                     num_classes: int, tower_config: dict) -> None:
    """The whole fine-tuned model (``model.safetensors``, fp32), the recipe that built it and the tower's
    architecture (``tower/config.json``: ``tower_config``, an exported tower's ``config.json``), written atomically
    to ``out_dir`` by the main process; :func:`rebuild_exported` needs nothing else. The saved recipe records the
    class count as ``model.num_classes``."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        with atomic_directory(out_dir) as staging:
            save_file({key: value.detach().float().cpu().contiguous() for key, value in state_dict.items()},
                      str(staging / "model.safetensors"))
            save_recipe(with_class_count(recipe, num_classes), staging / "recipe.yaml")
            (staging / TOWER_FOLDER).mkdir()
            (staging / TOWER_FOLDER / "config.json").write_text(json.dumps(tower_config, indent=2) + "\n")
        accelerator.print(f"saved {description} to {out_dir}")
    accelerator.wait_for_everyone()


def rebuild_exported(folder: str | Path, recipe_class: type, create: Callable[..., nn.Module]) -> nn.Module:
    """The model a :func:`save_with_recipe` export holds, in eval mode, from that folder alone:
    ``create(model_section, num_classes, tower_weights=False)`` builds the architecture with the tower of
    ``tower/config.json``, and ``model.safetensors`` fills it."""
    folder = Path(folder)
    for needed in ("recipe.yaml", "model.safetensors", f"{TOWER_FOLDER}/config.json"):
        if not (folder / needed).is_file():
            raise FileNotFoundError(f"{folder / needed} not found: {folder} is not an export of this trainer")
    recipe = load_recipe(folder / "recipe.yaml", recipe_class)
    model = create(dataclasses.replace(recipe.model, encoder=str(folder / TOWER_FOLDER)), recipe.model.num_classes,
                   tower_weights=False)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.eval()


def recorded_class_names(shards: str) -> list[str] | None:
    """The ``class_names`` of the shards' ``dataset.json``, or None where it records none (or there is none)."""
    if not shards:
        return None
    try:
        names = read_dataset_info(shards).get("class_names")
    except FileNotFoundError:
        return None
    return [str(name) for name in names] if names else None


def class_count(recipe, class_names: list | None) -> int:
    """``model.num_classes``, else the number of ``class_names`` recorded with the training shards."""
    num_classes = recipe.model.num_classes or len(class_names or [])
    if not num_classes:
        raise ValueError(f"no class names are recorded with data.train_shards={recipe.data.train_shards!r} (no "
                         "dataset.json there, or none with class_names): set model.num_classes")
    return num_classes


def with_class_count(recipe, num_classes: int):
    """``recipe`` with ``model.num_classes`` set, so that the recipes a run saves rebuild and export its model
    without the training shards."""
    return dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, num_classes=num_classes))


def training_stream_options(recipe) -> dict:
    """The training loader's options from ``recipe.data`` and the seed (``pretrain.data.build_loader``'s names)."""
    data = recipe.data
    return dict(resampled=data.resampled, samples_per_epoch=data.samples_per_epoch if data.resampled else None,
                seed=recipe.train.seed, shuffle_buffer=data.shuffle_buffer, max_bad_fraction=data.max_bad_fraction)
