"""Run guards: batch settings checked at start-up, non-finite losses skipped, SIGTERM / SIGINT turned into a clean stop.

Skip and stop decisions are taken jointly by all processes: one rank skipping or stopping alone would leave the
others waiting in a collective forever.
"""

from __future__ import annotations

import logging
import signal
import types
from typing import TYPE_CHECKING, Any

import torch
from accelerate.utils import DistributedType

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger(__name__)


def check_batch_settings(accelerator: Accelerator, micro_batch: int, accumulation_steps: int) -> None:
    """Make the recipe the one source of the micro-batch and the accumulation steps; call before ``prepare``.

    Raises ``ValueError`` where the Accelerator (e.g. ``accelerate launch --gradient_accumulation_steps``, which
    overrides the constructor argument) or the DeepSpeed config disagree with the recipe: accelerate would
    otherwise resolve a DeepSpeed mismatch in DeepSpeed's favour with only a log line. DeepSpeed values left
    at ``"auto"`` are filled from the recipe, so the micro-batch never has to be read off a data loader.
    """
    if accelerator.gradient_accumulation_steps != accumulation_steps:
        raise ValueError(f"the Accelerator accumulates {accelerator.gradient_accumulation_steps} micro-batches but "
                         f"the recipe says {accumulation_steps}: build it with gradient_accumulation_steps from the "
                         "recipe and do not pass --gradient_accumulation_steps to accelerate launch")
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    wanted = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": accumulation_steps,
              "train_batch_size": micro_batch * accumulation_steps * accelerator.num_processes}
    for key, value in wanted.items():
        given = config.get(key, "auto")
        if given == "auto":
            config[key] = value
        elif int(given) != value:
            raise ValueError(f"the DeepSpeed config sets {key}={given} but the recipe gives {value}: set it to "
                             '"auto" (filled from the recipe) or to the same value')


def check_clip_setting(accelerator: Accelerator, clip_grad: float | None) -> None:
    """Make the recipe's ``optim.clip_grad`` (None: no clipping) the clipping DeepSpeed applies; call before
    ``prepare``.

    Under DeepSpeed the trainer's ``clip_grad_norm_`` call does nothing: the engine clips inside its step, at the
    config's ``gradient_clipping``, which accelerate fills with 1.0 when it is ``"auto"`` (the default), so a
    recipe without clipping would silently be clipped at 1.0 there but not under DDP. ``"auto"`` is filled from
    the recipe (0.0 switches DeepSpeed's clipping off); an explicit value that disagrees is an error.
    """
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    wanted = float(clip_grad or 0.0)
    given = config.get("gradient_clipping", "auto")
    if given == "auto":
        config["gradient_clipping"] = wanted
    elif float(given) != wanted:
        raise ValueError(f"the DeepSpeed config sets gradient_clipping={given} but the recipe's optim.clip_grad is "
                         f"{clip_grad}: set it to \"auto\" (filled from the recipe) or to the same value")


class NonFiniteGuard:
    """Tells the trainer to skip steps with a NaN/Inf loss and gives up after ``max_consecutive`` in a row.

    With an ``accelerator``, a non-finite loss on any process makes every process skip (one small all-reduce
    per :meth:`check`, which every process must call at the same step). Register the guard with
    ``accelerator.register_for_checkpointing`` to keep its counters across a resume.
    """

    def __init__(self, max_consecutive: int, accelerator: Accelerator | None = None):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be at least 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.accelerator = accelerator
        self.skipped_total = 0
        self.consecutive = 0

    def check(self, loss: torch.Tensor, step: int) -> bool:
        """True when this step must be skipped (no backward, no optimizer step) because the loss is not finite.

        Raises ``RuntimeError`` when this makes ``max_consecutive`` non-finite steps in a row (with 1, the
        first non-finite loss stops the run, as MAE does).
        """
        bad = (~torch.isfinite(loss.detach())).any().float().reshape(1)
        if self.accelerator is not None:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if bad.item() == 0:
            self.consecutive = 0
            return False
        self.skipped_total += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            raise RuntimeError(
                f"non-finite loss at step {step}: {self.consecutive} consecutive steps had a NaN/Inf loss "
                f"(limit {self.max_consecutive}, {self.skipped_total} skipped in total); lower the learning "
                "rate, use bf16 instead of fp16, or resume from an earlier checkpoint")
        logger.warning("non-finite loss at step %d: skipping it (%d in a row, %d in total)",
                       step, self.consecutive, self.skipped_total)
        return True

    def state_dict(self) -> dict[str, int]:
        return {"skipped_total": self.skipped_total, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped_total = int(state["skipped_total"])
        self.consecutive = int(state["consecutive"])


class StopSignal:
    """Context manager that turns SIGTERM and SIGINT into a request to stop at the next step boundary.

    Inside the ``with`` block the signals only set :attr:`requested`; the trainer polls :meth:`should_stop`,
    saves a checkpoint and exits with :attr:`exit_status`. A second SIGINT raises ``KeyboardInterrupt`` at once,
    for when the clean exit hangs. The previous handlers are restored on exit. Signals can only be handled in the
    main thread.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @property
    def exit_status(self) -> int:
        """The status a stopped run exits with, 128 + the signal's number (143 for SIGTERM, 130 for SIGINT), as a shell
        reports a process the signal ended, so that job scripts and schedulers do not take the run for finished;
        SIGTERM's where the stop was asked on another process."""
        return 128 + (signal.Signals[self.received] if self.received else signal.SIGTERM)

    def should_stop(self, accelerator: Accelerator | None = None) -> bool:
        """True when a stop was requested on this process or, with an ``accelerator``, on any process.

        With an accelerator this is a collective (accelerate's ``set_trigger``/``check_trigger``): every process
        must call it at the same steps.
        """
        if accelerator is None:
            return self.requested
        if self.requested:
            accelerator.set_trigger()
        return accelerator.check_trigger()

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt(f"second {name} while stopping")
        self.requested = True
        self.received = name
        logger.warning("received %s: stopping after the current step", name)
