"""Streaming loader for one rank: epochs, resumable position, bad-sample accounting and throughput."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from webdataset.utils import make_seed

from .layout import rank_span, rank_steps
from .shards import expand_shards, shard_sizes
from .stream import BadDataError, BadSample, StreamConfig, WorkerStream
from .transforms import IMAGENET_MEAN, IMAGENET_STD, TASKS, image_transform

logger = logging.getLogger(__name__)

KEPT_BAD_SAMPLES = 1000  # records kept for inspection; all are counted
LOGGED_BAD_SAMPLES = 20
THROUGHPUT_WINDOW = 50  # batches


def _leave_termination_to_the_main_process(worker_id: int) -> None:
    """Slurm and Kubernetes send SIGTERM to the whole process group: a worker that died of it would crash the
    main process's DataLoader before the trainer could save its stop checkpoint. The main process handles the
    signal and shuts its workers down; a worker whose parent dies exits by itself (PyTorch's watchdog)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class ShardLoader:
    """Batches of one rank, epoch after epoch; built by :func:`build_loader`.

    Iterating yields the rest of the current epoch and then moves to the next one; leaving a loop early keeps
    the position, so the next iteration (or a loader restored from :meth:`state_dict`) continues from it.
    """

    stream_class: type[WorkerStream] = WorkerStream
    """What each epoch's workers run; a subclass for other sample kinds (image + mask: ``data/segmentation.py``)."""

    def __init__(self, config: StreamConfig, *, num_workers: int, pin_memory: bool, start_next_epoch_early: bool):
        self.config = config
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        # Workers of a new epoch take seconds to start and fill their pipelines; starting them while the last
        # batches of the current epoch are consumed hides that at the epoch boundary.
        self.start_next_epoch_early = start_next_epoch_early and num_workers > 0
        self._started_ahead: tuple[int, Iterator] | None = None  # (epoch, its deliveries), started ahead
        # What load_state_dict does when the layout differs from the saved one (accelerate calls it without
        # arguments): trainers set it from train.resume_data.
        self.strict_resume = True
        self.epoch = 0
        self.batches_done = 0  # in the current epoch
        self.samples_seen = 0
        self.bad_sample_count = 0
        self.bad_samples: list[BadSample] = []  # the first KEPT_BAD_SAMPLES records
        self._epoch_bad = 0
        # (time of delivery, batch size, seconds the caller waited for it) of the last batches
        self._recent: deque[tuple[float, int, float]] = deque(maxlen=THROUGHPUT_WINDOW)
        self._waited = 0.0  # seconds, since the loader was built

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch on this rank (the same on every rank when ``drop_last``)."""
        return self.config.steps_per_epoch

    @property
    def samples_per_epoch(self) -> int:
        """Samples this rank is meant to deliver per epoch."""
        return self.config.samples_per_epoch

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[object]:
        config = self.config
        if self.batches_done == 0:
            self._epoch_bad = 0
        started_epoch = self._started_ahead[0] if self._started_ahead is not None else None
        if started_epoch == self.epoch and self.batches_done == 0:
            deliveries, self._started_ahead = self._started_ahead[1], None
        else:
            if started_epoch != self.epoch + 1:  # kept when the current epoch is re-entered part-way
                self._started_ahead = None
            deliveries = self._deliveries(self.epoch, self.batches_done)
        # When about one batch per old worker is left to make, so the new workers hardly compete with them.
        start_next_after = max(1, self.steps_per_epoch - self.num_workers)
        waited = 0.0  # for the next batch, including deliveries that carried none
        while True:
            asked = time.perf_counter()
            delivery = next(deliveries, None)
            delivered = time.perf_counter()
            waited += delivered - asked
            self._waited += delivered - asked
            if delivery is None:
                break
            self._account(delivery.bad)
            if delivery.payload is None:
                continue
            self.batches_done += 1
            self.samples_seen += delivery.size
            self._recent.append((delivered, delivery.size, waited))
            waited = 0.0
            yield delivery.payload
            if self.start_next_epoch_early and self._started_ahead is None and self.batches_done >= start_next_after:
                self._started_ahead = (self.epoch + 1, self._deliveries(self.epoch + 1, 0))
        if config.drop_last and self.batches_done < self.steps_per_epoch:
            raise BadDataError(
                f"rank {config.rank} delivered {self.batches_done} of {self.steps_per_epoch} batches in epoch "
                f"{self.epoch}: {self._epoch_bad} bad samples could not be replaced; {self._describe_bad()}"
            )
        self.epoch += 1
        self.batches_done = 0

    def _deliveries(self, epoch: int, batches_done: int) -> Iterator:
        """Starts the workers of ``epoch`` from batch ``batches_done`` on; they deliver in turn."""
        config = self.config
        generator = torch.Generator().manual_seed(make_seed(config.seed, epoch, config.rank, batches_done))
        # A plain DataLoader: its iterator starts the workers when created, while the iterator of webdataset's
        # WebLoader is a generator that creates the DataLoader's only at its first batch.
        return iter(torch.utils.data.DataLoader(
            self.stream_class(config, epoch, batches_done),
            batch_size=None,  # workers deliver whole batches
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=generator,  # seeds the workers' RNGs; augmentations reseed per sample (_seed_each_sample)
            in_order=True,  # the resume position assumes round-robin delivery (see layout)
            worker_init_fn=_leave_termination_to_the_main_process,
        ))

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning; the current epoch keeps its position (safe after a resume)."""
        if epoch != self.epoch:
            self.epoch, self.batches_done = epoch, 0
        if self._started_ahead is not None and self._started_ahead[0] != epoch:
            self._started_ahead = None

    def state_dict(self) -> dict:
        """The loader's position: identical on every rank, so saving it from the main process suffices."""
        return {"epoch": self.epoch, "batches_done": self.batches_done, "samples_seen": self.samples_seen,
                "layout": self._layout()}

    def load_state_dict(self, state: Mapping, strict: bool | None = None) -> None:
        """Continue from a saved position.

        With ``strict`` (default: ``self.strict_resume``) the data, world size, workers, batch size and seed must
        match the saved run (the resume guarantee depends on them); with ``strict=False`` a mismatch only loosens
        it: the epoch and step count continue, but which samples repeat or are skipped in the resumed epoch is no
        longer bounded.
        """
        saved = state["layout"]
        changed = [f"{key} saved {saved.get(key)!r}, now {value!r}" for key, value in self._layout().items()
                   if saved.get(key) != value]
        if changed and (self.strict_resume if strict is None else strict):
            raise ValueError(f"loader state does not match this loader ({'; '.join(changed)}): resume with the "
                             "saved settings, or set train.resume_data=continue (load_state_dict(state, "
                             "strict=False)) to continue anyway, without the guarantee on the resumed epoch's samples")
        if changed:
            logger.warning("resuming a loader whose layout changed (%s): the resumed epoch may repeat or skip "
                           "samples", "; ".join(changed))
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])
        self.samples_seen = int(state["samples_seen"])
        self._started_ahead = None
        if self.batches_done > self.steps_per_epoch:
            self.epoch, self.batches_done = self.epoch + 1, 0

    def stats(self) -> dict[str, float]:
        """Figures for logging: position; samples/s and the share of time spent waiting for data, both over the
        last ``THROUGHPUT_WINDOW`` batches; seconds spent waiting since the loader was built."""
        rate = wait_fraction = 0.0
        if len(self._recent) > 1:
            recent = list(self._recent)
            elapsed = max(recent[-1][0] - recent[0][0], 1e-9)
            # every wait but the first batch's lies between the first and the last delivery
            rate = sum(size for _, size, _ in recent[1:]) / elapsed
            wait_fraction = sum(waited for _, _, waited in recent[1:]) / elapsed
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.batches_done,
            "samples_seen": self.samples_seen,
            "samples_per_second": rate,
            "data_wait_fraction": wait_fraction,
            "data_wait_seconds": self._waited,
            "bad_samples": self.bad_sample_count,
        }

    def _account(self, bad: list[BadSample]) -> None:
        for record in bad:
            if len(self.bad_samples) < KEPT_BAD_SAMPLES:
                self.bad_samples.append(record)
            if len(self.bad_samples) <= LOGGED_BAD_SAMPLES:
                logger.warning("skipped bad sample on rank %d: %s", self.config.rank, record)
            self.bad_sample_count += record.count
            self._epoch_bad += record.count
        if self._epoch_bad > self.config.bad_sample_limit:
            raise BadDataError(
                f"{self._epoch_bad} bad samples in epoch {self.epoch} on rank {self.config.rank} exceed "
                f"max_bad_fraction={self.config.max_bad_fraction} of {self.samples_per_epoch} samples; "
                f"{self._describe_bad()}"
            )

    def _describe_bad(self) -> str:
        shown = "; ".join(map(str, self.bad_samples[:5]))
        return f"first bad samples: {shown}" if shown else "no bad sample recorded"

    def _layout(self) -> dict:
        """What the per-worker resume positions depend on."""
        config = self.config
        return {"num_samples": sum(config.sizes), "num_shards": len(config.urls), "world_size": config.world_size,
                "num_workers": max(1, self.num_workers), "batch_size": config.batch_size,
                "steps_per_epoch": config.steps_per_epoch, "resampled": config.resampled,
                "drop_last": config.drop_last, "seed": config.seed}


def build_loader(
    shards: str | os.PathLike | Sequence[str | os.PathLike],
    task: str,
    batch_size: int,
    image_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 4,
    resampled: bool = False,
    samples_per_epoch: int | None = None,
    seed: int = 0,
    shuffle: bool | None = None,
    shuffle_buffer: int = 1000,
    drop_last: bool | None = None,
    tokenizer: Callable[[str], torch.Tensor] | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    crop_pct: float = 0.875,
    max_bad_fraction: float = 0.01,
    sizes: Mapping[str, int] | None = None,
    augment: Mapping[str, Any] | None = None,
    with_keys: bool = False,
    normalize: bool = True,
    pin_memory: bool = False,
    start_next_epoch_early: bool | None = None,
) -> ShardLoader:
    """A loader of CPU batches for one rank; never pass it through ``accelerator.prepare``.

    Args:
        shards: shard directory, brace or glob pattern, ``::``-joined patterns, or a list of them.
        task: ``"mae"`` yields images ``[B, 3, S, S]``; ``"clip"`` yields ``(images, token ids [B, L])``, or
            ``(images, list of captions)`` without a tokenizer; ``"classify"`` (augmented, for fine-tuning) and
            ``"eval"`` (resize and center crop) yield ``(images, labels [B])``.
            ``with_keys`` appends the list of sample keys.
        rank, world_size: this process's place (accelerate's ``process_index`` / ``num_processes``).
        resampled: draw shards with replacement (endless stream cut into epochs of ``samples_per_epoch``,
            default one pass's worth) instead of reading every sample once per epoch.
        shuffle, drop_last: default True for mae/clip, False for eval. ``drop_last`` gives every rank the same
            number of full batches, ``len(loader)``; without it every sample is delivered exactly once.
        shuffle_buffer: per-worker sample shuffle buffer (also the resume bound; < 2 disables it).
        max_bad_fraction: raise :class:`BadDataError` once more than this fraction of a rank's epoch was bad.
        sizes: shard file name -> sample count, where no ``sizes.json`` sits next to the shards.
        augment: keyword arguments of timm's training transform for task ``classify`` (see ``image_transform``).
        normalize: with False, images come as uint8 ``[B, 3, S, S]``, a quarter of the bytes to collate, pass
            between processes and copy to the accelerator; :class:`DeviceNormalize` scales and normalises them
            there. Not for ``classify``.
        pin_memory: deliver batches in page-locked memory, so that copies to a GPU can run asynchronously.
        start_next_epoch_early: start the next epoch's workers when the current epoch's last ``num_workers``
            batches are asked for (after its first batch if it has no more), so that training does not wait for
            them at the boundary; the next epoch's batches are the same as without. Default True for
            mae/clip/classify (and the training loaders of segmentation and detection), False for eval (usually
            read once); off with ``num_workers=0``. Changes to the loader or its config (transform included)
            after that point do not reach the started epoch.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, not {task!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if batch_size < 1 or num_workers < 0 or shuffle_buffer < 0:
        raise ValueError("batch_size must be positive, num_workers and shuffle_buffer non-negative")
    if tokenizer is not None and task != "clip":
        raise ValueError(f"a tokenizer is only used by task 'clip', not {task!r}")
    training = task != "eval"
    shuffle = training if shuffle is None else shuffle
    drop_last = training if drop_last is None else drop_last
    if resampled and not drop_last:
        raise ValueError("resampled mode always drops partial batches; do not pass drop_last=False")
    if samples_per_epoch is not None and not resampled:
        raise ValueError("samples_per_epoch applies to resampled mode; an epoch otherwise reads every sample")

    urls = expand_shards(shards)
    counts = shard_sizes(urls, sizes)
    total = sum(counts)
    if total == 0:
        raise ValueError(f"the {len(urls)} shards hold no samples according to their counts (first {urls[0]!r})")
    steps, rank_samples = _rank_epoch(total, samples_per_epoch, rank, world_size, batch_size, drop_last, resampled)
    transform = image_transform(task, image_size, mean=mean, std=std, crop_pct=crop_pct, augment=augment,
                                normalize=normalize)
    config = StreamConfig(
        urls=tuple(urls), sizes=tuple(counts), task=task, batch_size=batch_size, steps_per_epoch=steps,
        samples_per_epoch=rank_samples, max_bad_fraction=max_bad_fraction, rank=rank, world_size=world_size,
        resampled=resampled, shuffle=shuffle, shuffle_buffer=shuffle_buffer, drop_last=drop_last, seed=seed,
        transform=transform, tokenizer=tokenizer, with_keys=with_keys,
    )
    return ShardLoader(config, num_workers=num_workers, pin_memory=pin_memory,
                       start_next_epoch_early=training if start_next_epoch_early is None else start_next_epoch_early)


def _rank_epoch(
    total: int, samples_per_epoch: int | None, rank: int, world_size: int, batch_size: int, drop_last: bool,
    resampled: bool,
) -> tuple[int, int]:
    """Batches and samples per epoch on ``rank``."""
    if resampled:
        steps = (samples_per_epoch or total) // world_size // batch_size
    else:
        steps = rank_steps(total, rank, world_size, batch_size, drop_last)
    if drop_last and steps == 0:
        raise ValueError(f"{samples_per_epoch or total} samples per epoch give no full batch of {batch_size} "
                         f"on each of {world_size} ranks")
    if drop_last:
        return steps, steps * batch_size
    start, stop = rank_span(total, rank, world_size)
    return steps, stop - start
