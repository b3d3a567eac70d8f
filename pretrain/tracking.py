"""Run setup and logging: the Accelerator, TensorBoard always, Weights & Biases when available, PNG images, throughput and a progress bar.

Everything goes through accelerate's trackers, which only the main process starts, so callers may log from
every process.
"""

from __future__ import annotations

import io
import os
import re
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, is_wandb_available
from PIL import Image
from tqdm.auto import tqdm

from .atomic import write_atomically
from .guards import check_batch_settings, check_clip_setting

ImageLike = np.ndarray | Image.Image | torch.Tensor


def wandb_wanted(use_wandb: bool | Literal["auto"]) -> bool:
    """Resolve the recipe's ``use_wandb``.

    ``"auto"`` means: the package is installed and configured through ``WANDB_API_KEY`` or ``WANDB_MODE``
    (e.g. ``offline``), so an unconfigured machine never stops at a login prompt. ``True`` without the package
    is an error rather than a silently missing log.
    """
    if isinstance(use_wandb, str) and use_wandb != "auto":
        raise ValueError(f"use_wandb must be true, false or 'auto', got {use_wandb!r}")
    if use_wandb == "auto":
        return bool(is_wandb_available()) and any(name in os.environ for name in ("WANDB_API_KEY", "WANDB_MODE"))
    if use_wandb and not is_wandb_available():
        raise RuntimeError("use_wandb is true but wandb is not installed (pip install wandb)")
    return bool(use_wandb)


def accelerator_kwargs(run_dir: str | Path, use_wandb: bool | Literal["auto"] = "auto") -> dict[str, Any]:
    """Keyword arguments for ``Accelerator(...)`` that set up logging into ``run_dir``.

    Trackers have to be chosen when the Accelerator is built: TensorBoard logs go to ``run_dir/logs``.
    Checkpoint naming stays off, since :class:`~pretrain.checkpoints.CheckpointManager` names checkpoints.
    """
    run_dir = Path(run_dir)
    project_config = ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs"),
                                          automatic_checkpoint_naming=False)
    log_with = ["tensorboard", "wandb"] if wandb_wanted(use_wandb) else ["tensorboard"]
    return {"log_with": log_with, "project_config": project_config}


def build_accelerator(recipe: Any, run_dir: str | Path) -> Accelerator:
    """The Accelerator of a run, from a recipe with ``optim`` and ``train`` sections (see ``pretrain.schema``)."""
    accelerator = Accelerator(gradient_accumulation_steps=recipe.optim.accum_steps,
                              mixed_precision=recipe.train.mixed_precision,
                              **accelerator_kwargs(run_dir, recipe.train.wandb))
    # The loader is never prepared, so the recipe is the one source of micro-batch and accumulation.
    check_batch_settings(accelerator, recipe.optim.batch_size, recipe.optim.accum_steps)
    check_clip_setting(accelerator, recipe.optim.clip_grad)
    return accelerator


class Tracker:
    """Scalars and images of one run, for an Accelerator built with :func:`accelerator_kwargs`.

    ``config`` (the resolved recipe as a nested dict) is stored as hyper-parameters, flattened to dotted keys.
    Images are also written as ``run_dir/images/<tag>_<step>.png``.
    """

    def __init__(self, accelerator: Accelerator, run_dir: str | Path, project_name: str,
                 config: Mapping[str, Any] | None = None):
        self.accelerator = accelerator
        self.image_dir = Path(run_dir) / "images"
        wandb_options = {"wandb": {"dir": str(run_dir), "name": Path(run_dir).name}}
        accelerator.init_trackers(project_name, config=_flat_hparams(config or {}), init_kwargs=wandb_options)

    def log(self, scalars: Mapping[str, float | int | torch.Tensor], step: int) -> None:
        """Log scalar values (0-d tensors are read out) at ``step``."""
        values = {name: value.item() if isinstance(value, torch.Tensor) else value for name, value in scalars.items()}
        self.accelerator.log(values, step=step)

    def log_image(self, tag: str, image: ImageLike, step: int) -> Path | None:
        """Save ``image`` as a PNG and log it; returns the file on the main process, None elsewhere.

        ``image``: a PIL image, a ``[C, H, W]`` tensor or an ``[H, W, C]`` array (C is 1 or 3, or no channel
        axis), either uint8 or floats in [0, 1] (clipped).
        """
        if not self.accelerator.is_main_process:
            return None
        pixels = _rgb_uint8(image)
        path = self.image_dir / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', tag)}_{step:08d}.png"
        encoded = io.BytesIO()
        Image.fromarray(pixels).save(encoded, format="PNG")
        write_atomically(path, encoded.getvalue())
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({tag: pixels[None]}, step=step, dataformats="NHWC")
            elif tracker.name == "wandb":
                tracker.log_images({tag: [Image.fromarray(pixels)]}, step=step)
        return path

    def close(self) -> None:
        """Flush and close every tracker (``accelerator.end_training``)."""
        self.accelerator.end_training()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Throughput:
    """Images per second over the last ``window`` steps, counted over all processes.

    ``update(samples)`` takes this process's batch size, once per step; it is multiplied by ``num_processes``
    because every process runs the same micro-batch (so no collective is needed to count).
    """

    def __init__(self, num_processes: int = 1, window: int = 20):
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.num_processes = num_processes
        self._marks: deque[tuple[float, int]] = deque(maxlen=window + 1)

    def update(self, samples: int) -> None:
        self._marks.append((time.perf_counter(), samples * self.num_processes))

    def rate(self) -> float | None:
        """Samples per second over the window, or None before two updates (one interval) were seen."""
        if len(self._marks) < 2:
            return None
        elapsed = self._marks[-1][0] - self._marks[0][0]
        # The first mark only opens the interval: its samples were processed before it.
        samples = sum(count for _, count in list(self._marks)[1:])
        return samples / elapsed if elapsed > 0 else None


def progress_bar(accelerator: Accelerator, total: int, initial: int = 0, description: str = "train") -> tqdm:
    """A tqdm bar over optimizer steps, shown by the main process only (a disabled no-op elsewhere)."""
    return tqdm(total=total, initial=initial, desc=description, dynamic_ncols=True,
                disable=not accelerator.is_main_process)


def _flat_hparams(config: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    # TensorBoard's hparams accept only scalars and strings.
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flat_hparams(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def _rgb_uint8(image: ImageLike) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu()
        image = (image.permute(1, 2, 0) if image.ndim == 3 else image).numpy()
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an RGB or grayscale image ([C,H,W] tensor or [H,W,C] array), got {array.shape}")
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        return np.round(np.clip(array, 0.0, 1.0) * 255).astype(np.uint8)
    raise TypeError(f"expected uint8 or floating-point pixels, got {array.dtype}")
