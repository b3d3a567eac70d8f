"""Crash-safe training checkpoints on top of ``accelerator.save_state`` / ``load_state``.

Layout of the checkpoint directory::

    step_00001000/          complete: written, marked and renamed into place
        COMPLETE            JSON {"step": 1000, "sequence": 7}
        model.safetensors, optimizer.bin, random_states_<rank>.pkl, custom_checkpoint_<i>.pkl, ...
    step_00002000.tmp/      a save in progress or interrupted by a crash: never read, removed by the next save

Only names ``step_<digits>`` holding ``COMPLETE`` count as checkpoints, so a crash at any moment leaves the
previous checkpoints usable. ``sequence`` numbers the saves in this directory: "latest" means saved last, not
highest step, so after resuming from an older checkpoint (or starting over) the new line of training wins.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from . import atomic
from .optim import build_optimizer

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger(__name__)

MARKER = "COMPLETE"
IN_PROGRESS_SUFFIX = ".tmp"
_CHECKPOINT_NAME = re.compile(r"step_\d+")


class CheckpointError(RuntimeError):
    """A checkpoint to resume from is missing or incomplete, or resuming cannot work yet."""


@dataclasses.dataclass
class TrainState:
    """Progress counters the trainer registers with ``accelerator.register_for_checkpointing``.

    ``step`` counts optimizer updates (what the LR schedule and the checkpoint names use), ``samples_seen`` the
    images consumed by all processes together.
    """

    step: int = 0
    epoch: int = 0
    samples_seen: int = 0

    def state_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, int(state[field.name]))


class CheckpointManager:
    """Saves and restores the full training state of an ``Accelerator`` in ``directory``.

    Everything ``accelerator.save_state`` covers is saved: prepared models, optimizers and LR schedulers, the
    grad scaler, every process's RNG states and the objects registered with ``register_for_checkpointing``
    (saved from the main process, so they must hold the same state on every rank). Both :meth:`save` and
    :meth:`resume` must be called by every process: under DeepSpeed each rank writes and reads its own shards.
    """

    def __init__(self, accelerator: Accelerator, directory: str | Path, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, got {keep_last}")
        if accelerator.project_configuration.automatic_checkpoint_naming:
            # save_state would ignore our directory and write to project_dir/checkpoints/checkpoint_<i> instead.
            raise ValueError("CheckpointManager names checkpoints itself: build the Accelerator with "
                             "ProjectConfiguration(automatic_checkpoint_naming=False)")
        self.accelerator = accelerator
        self.directory = Path(directory)
        self.keep_last = keep_last
        # Without a shared filesystem accelerate writes on each node's first process, so each node finishes its copy.
        on_each_node = accelerator.project_configuration.save_on_each_node
        self._writes = accelerator.is_local_main_process if on_each_node else accelerator.is_main_process

    def save(self, step: int) -> Path:
        """Save the training state as ``step_<step>``, prune old checkpoints and return the new directory.

        A complete checkpoint of the same step is replaced.
        """
        final = self.directory / f"step_{step:08d}"
        in_progress = final.with_name(final.name + IN_PROGRESS_SUFFIX)
        if self._writes:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._remove_unfinished()
            # Every rank writes its RNG state into it, possibly before the main process would create it.
            in_progress.mkdir()
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(in_progress))
        self.accelerator.wait_for_everyone()
        if self._writes:
            sequence = 1 + max((_marker(path)["sequence"] for path in self.checkpoints()), default=0)
            write_atomically(in_progress / MARKER, json.dumps({"step": step, "sequence": sequence}).encode("utf-8"))
            self._move_into_place(in_progress, final)
            self._prune(keep=final)
        self.accelerator.wait_for_everyone()
        logger.info("saved checkpoint %s", final)
        return final

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints in the order they were saved, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [path for path in self.directory.iterdir()
                 if _CHECKPOINT_NAME.fullmatch(path.name) and (path / MARKER).is_file()]
        return sorted(found, key=lambda path: _marker(path)["sequence"])

    def latest(self) -> Path | None:
        """The complete checkpoint saved last, or None."""
        found = self.checkpoints()
        return found[-1] if found else None

    def resume(self, spec: str | Path | None) -> int | None:
        """Restore the training state named by ``spec`` and return its step, or return None to start fresh.

        ``spec``: None or ``"none"`` starts fresh; ``"auto"`` resumes from :meth:`latest` when there is one and
        starts fresh otherwise; anything else is the path of a checkpoint directory, which must be complete.
        Call it after ``accelerator.prepare`` and after registering custom objects, on every process.
        """
        path = self.find(spec)
        if path is None:
            return None
        step = int(_marker(path)["step"])
        if not self.accelerator._models:
            raise CheckpointError("resume() must come after accelerator.prepare(model, ...): load_state only "
                                  "restores objects the accelerator already knows")
        self.accelerator.load_state(str(path))
        logger.info("resumed from %s (step %d)", path, step)
        return step

    def find(self, spec: str | Path | None) -> Path | None:
        """The complete checkpoint ``spec`` names (see :meth:`resume`), or None to start fresh."""
        if spec is None or str(spec).lower() == "none":
            if self.checkpoints():
                logger.warning("starting fresh although %s holds checkpoints: from the first save on, resume=auto "
                               "continues this run and keep_last prunes the older ones", self.directory)
            return None
        if str(spec).lower() == "auto":
            path = self.latest()
            if path is None:
                logger.info("no checkpoint in %s: starting fresh", self.directory)
            return path
        path = Path(spec)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint {path} does not exist")
        if not (path / MARKER).is_file():
            holder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
            inside = CheckpointManager(self.accelerator, holder).checkpoints()
            if inside:
                raise CheckpointError(f"{path} is not a checkpoint but holds them: name one, e.g. {inside[-1]}, "
                                      "or set train.resume=auto with train.output_dir set to the run")
            raise CheckpointError(f"checkpoint {path} is incomplete (no {MARKER} marker: its save was "
                                  "interrupted); resume from another checkpoint")
        return path

    def restore(self, spec: str | Path) -> int:
        """:meth:`resume` for exports, which must find a checkpoint: ``none``, or ``auto`` with none saved, raise."""
        if self.find(spec) is None:
            raise CheckpointError(f"no checkpoint to export from: {str(spec)!r} names none (complete checkpoints in "
                                  f"{self.directory}: {len(self.checkpoints())})")
        return self.resume(spec)

    def _remove_unfinished(self) -> None:
        for path in self.directory.glob(f"*{IN_PROGRESS_SUFFIX}"):
            logger.warning("removing unfinished checkpoint %s", path)
            shutil.rmtree(path)

    def _move_into_place(self, in_progress: Path, final: Path) -> None:
        replaced = final.with_name(f"{final.name}.replaced{IN_PROGRESS_SUFFIX}")
        if final.exists():
            # rename cannot replace a non-empty directory; a crash before the rmtree leaves only ignored names.
            os.replace(final, replaced)
        os.replace(in_progress, final)
        atomic.sync_directory(self.directory)
        if replaced.exists():
            shutil.rmtree(replaced)

    def _prune(self, keep: Path) -> None:
        for path in self.checkpoints()[: -self.keep_last]:
            if path != keep:
                shutil.rmtree(path)


def load_for_export(accelerator: Accelerator, model, optim, directory: str | Path, checkpoint: str | Path,
                    layer_decay: float | None = None):
    """Prepare ``model`` with the optimizer the recipe section ``optim`` (and ``layer_decay``, for fine-tuning) built
    for training (DeepSpeed's engine reads its weight shards through both) and load ``checkpoint`` into them, for
    exporting. Nothing else is registered, so the data loader and LR schedule the run saved stay unread: an export
    needs neither the training data nor its layout. Returns the prepared model."""
    optimizer = build_optimizer(model, optim.lr or optim.base_lr, optim.weight_decay, optim.betas, optim.eps,
                                layer_decay=layer_decay)
    model, _ = accelerator.prepare(model, optimizer)
    checkpoints = CheckpointManager(accelerator, directory)
    found = checkpoints.find(checkpoint)
    # load_state restores registered objects by position and insists on as many as were saved.
    for _ in (found.glob("custom_checkpoint_*.pkl") if found else ()):
        accelerator.register_for_checkpointing(_Unread())
    checkpoints.restore(checkpoint)
    return model


class _Unread:
    """Stands in for a saved object that an export does not need."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically; an interrupted write leaves only an ignored ``.tmp`` file."""
    atomic.write_atomically(path, data, temp_suffix=IN_PROGRESS_SUFFIX)


def _marker(checkpoint: Path) -> dict[str, int]:
    return json.loads((checkpoint / MARKER).read_text())
