"""The per-worker pipeline: read shard pieces, drop incomplete samples, shuffle, decode, transform, batch.

DataLoader workers are separate processes, so every sample skipped here is recorded as a :class:`BadSample`
and travels to the main process inside the next :class:`Delivery`.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import random
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import webdataset as wds
from webdataset.utils import make_seed, pytorch_worker_info

from .layout import Piece, epoch_order, epoch_worker_pieces, resampled_pieces, skip_samples, worker_quotas
from .transforms import LABELLED_TASKS

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
REQUIRED_KEYS = {"mae": (), "clip": ("txt",), "classify": ("cls",), "eval": ("cls",)}
# In drop_last epochs a worker re-reads its range (at most this many more times) to replace bad samples, so
# that every rank still makes the same number of steps.
REFILL_PASSES = 2

_decode_rgb = wds.autodecode.imagehandler("pilrgb")  # gray and palette images become 3-channel RGB


class BadDataError(RuntimeError):
    """More samples were bad than ``max_bad_fraction`` allows, or an epoch could not be filled."""


@dataclass(frozen=True)
class BadSample:
    """A skipped sample (or, with ``key`` None, ``count`` unreadable samples of a shard) and why."""

    shard: str
    key: str | None
    reason: str
    count: int = 1

    def __str__(self) -> str:
        where = f"shard {self.shard}" + (f" key {self.key}" if self.key is not None else "")
        return f"{where}: {self.reason}"


class Delivery(NamedTuple):
    """What a worker sends to the main process: a batch (None at the end of its stream) and its bad samples.

    A named tuple, so that the DataLoader's pin-memory thread pins the tensors inside it.
    """

    payload: object
    size: int
    bad: list[BadSample]


@dataclass(frozen=True)
class StreamConfig:
    """Everything a worker needs to rebuild its part of an epoch (picklable)."""

    urls: tuple[str, ...]
    sizes: tuple[int, ...]
    task: str
    batch_size: int
    steps_per_epoch: int
    samples_per_epoch: int  # of this rank
    max_bad_fraction: float
    rank: int
    world_size: int
    resampled: bool
    shuffle: bool
    shuffle_buffer: int
    drop_last: bool
    seed: int
    transform: Callable
    tokenizer: Callable | None
    with_keys: bool

    @property
    def bad_sample_limit(self) -> float:
        """Bad samples a rank may meet in an epoch before training stops."""
        return self.max_bad_fraction * self.samples_per_epoch


class _BadLog:
    """A worker's bad samples, held until its next delivery.

    It stops the worker once the worker alone has met more bad samples in the epoch than its whole rank may:
    the main process would stop too, but could wait forever for a delivery from an endless (resampled) stream
    of bad data.
    """

    def __init__(self, config: StreamConfig):
        self.config, self.pending, self.met = config, [], 0

    def add(self, record: BadSample) -> None:
        self.pending.append(record)
        self.met += record.count
        if self.met > self.config.bad_sample_limit:
            raise BadDataError(
                f"a worker of rank {self.config.rank} met {self.met} bad samples in one epoch, more than "
                f"max_bad_fraction={self.config.max_bad_fraction} of {self.config.samples_per_epoch}; last: {record}"
            )

    def drain(self) -> list[BadSample]:
        drained, self.pending = self.pending, []
        return drained


class _Prepared(NamedTuple):
    key: str
    image: torch.Tensor
    label: int | None
    text: str | torch.Tensor | None


class WorkerStream(torch.utils.data.IterableDataset):
    """One epoch of one rank, from ``batches_done`` batches on; each DataLoader worker yields its own share."""

    def __init__(self, config: StreamConfig, epoch: int, batches_done: int):
        super().__init__()
        self.config, self.epoch, self.batches_done = config, epoch, batches_done

    def __iter__(self) -> Iterator[Delivery]:
        config, bad = self.config, _BadLog(self.config)
        _, _, worker, num_workers = pytorch_worker_info()
        # The DataLoader asks worker 0 first; after k batches the next batch is due from stream k % W, so
        # worker w plays stream (w + k) % W and delivery continues in the uninterrupted order.
        stream = (worker + self.batches_done) % num_workers
        already = worker_quotas(self.batches_done, num_workers)[stream]
        quota = worker_quotas(config.steps_per_epoch, num_workers)[stream]
        rng = random.Random(make_seed(config.seed, self.epoch, config.rank, stream, self.batches_done))
        passes = self._passes(stream, num_workers, skip=already * config.batch_size)
        shard_sizes = dict(zip(config.urls, config.sizes))
        # Each pass is shuffled on its own so that a refill pass starts only after the first one is used up.
        shuffled = itertools.chain.from_iterable(
            self._shuffle(_complete_samples(_read_pieces(pieces, bad, shard_sizes), self._required_keys(), bad), rng)
            for pieces in passes
        )
        if torch.utils.data.get_worker_info() is not None:
            shuffled = _seed_each_sample(shuffled, config.seed, self.epoch)
        yield from itertools.islice(self._deliveries(shuffled, bad), quota - already)
        if bad.pending:
            yield Delivery(None, 0, bad.drain())

    def _required_keys(self) -> tuple[str, ...]:
        """Keys every sample needs besides an image (other sample kinds override this and ``_deliveries``)."""
        return REQUIRED_KEYS[self.config.task]

    def _deliveries(self, samples: Iterable[dict], bad: _BadLog) -> Iterator[Delivery]:
        """Decoded, transformed and batched samples."""
        return _deliveries(_prepare(samples, self.config, bad), self.config, bad)

    def _passes(self, stream: int, num_workers: int, skip: int) -> list[Iterable[Piece]]:
        """The stream's reading passes, the first without its first ``skip`` samples (already delivered)."""
        config = self.config
        if config.resampled:
            endless = resampled_pieces(config.urls, config.sizes, seed=config.seed, epoch=self.epoch,
                                       rank=config.rank, worker=stream)
            return [skip_samples(endless, skip)]
        order = epoch_order(config.urls, config.sizes, seed=config.seed, epoch=self.epoch, shuffle=config.shuffle)
        pieces = epoch_worker_pieces(
            order, rank=config.rank, world_size=config.world_size, worker=stream, num_workers=num_workers,
            batch_size=config.batch_size, drop_last=config.drop_last,
        )
        refills = [pieces] * (REFILL_PASSES if config.drop_last else 0)
        return [skip_samples(pieces, skip), *refills]

    def _shuffle(self, samples: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        config = self.config
        if not config.shuffle or config.shuffle_buffer < 2:
            return samples
        return wds.shuffle(config.shuffle_buffer, config.shuffle_buffer, rng=rng)(samples)


def _seed_each_sample(samples: Iterable[dict], seed: int, epoch: int) -> Iterator[dict]:
    """Reseed the RNGs augmentations draw from (torch, ``random``, numpy) before each sample is transformed, from
    the sample's identity: its augmentation then depends on (seed, epoch, shard name, key) alone, not on the worker
    that reads it or on where a run resumed. Only in DataLoader workers, whose RNGs serve nothing else."""
    for sample in samples:
        identity = f"{os.path.basename(sample['__url__'])}/{sample['__key__']}".encode()
        # Ints only: make_seed hashes its arguments, and str hashes differ between processes.
        sample_seed = make_seed(seed, epoch, zlib.crc32(identity))
        # The CPU generator alone: torch.manual_seed also seeds every device backend, far slower per call.
        torch.default_generator.manual_seed(sample_seed)
        random.seed(sample_seed)
        np.random.seed(sample_seed)
        yield sample


def _read_pieces(pieces: Iterable[Piece], bad: _BadLog, shard_sizes: dict[str, int]) -> Iterator[dict]:
    for piece in pieces:
        errors: list[Exception] = []
        read = 0
        handler = functools.partial(_note_and_continue, errors)
        with contextlib.closing(wds.tarfile_samples([{"url": piece.url}], handler=handler)) as samples:
            for sample in itertools.islice(samples, piece.start, piece.stop):
                read += 1
                yield sample
            if piece.stop == shard_sizes.get(piece.url) and next(samples, None) is not None:
                logger.warning("%s holds more samples than its sizes.json entry (%d): the rest are never read; "
                               "write the shards again with python -m pretrain.data", piece.url, piece.stop)
        if read < piece.size:
            cause = f"{type(errors[-1]).__name__}: {errors[-1]}" if errors else "fewer samples than sizes.json says"
            lost = piece.size - read
            bad.add(BadSample(piece.url, None, f"{lost} samples unreadable ({cause})", count=lost))


def _note_and_continue(errors: list[Exception], exn: Exception) -> bool:
    errors.append(exn)
    return True


def _complete_samples(samples: Iterable[dict], required: tuple[str, ...], bad: _BadLog) -> Iterator[dict]:
    for sample in samples:
        missing = [key for key in required if key not in sample]
        if not any(key in sample for key in IMAGE_KEYS):
            missing.insert(0, "/".join(IMAGE_KEYS))
        if missing:
            reason = f"missing {', '.join(missing)}"
            if "cls" in missing:
                reason += " (an unlabelled sample: this task needs labelled shards)"
            bad.add(BadSample(sample["__url__"], sample["__key__"], reason))
            continue
        yield sample


def _prepare(samples: Iterable[dict], config: StreamConfig, bad: _BadLog) -> Iterator[_Prepared]:
    for sample in samples:
        extension = next(key for key in IMAGE_KEYS if key in sample)
        try:
            # Anything can go wrong decoding bytes from outside; transforms and tokenizer errors are ours and
            # propagate.
            image = _decode_rgb(extension, sample[extension])
            label = int(sample["cls"]) if config.task in LABELLED_TASKS else None
            text = sample["txt"].decode("utf-8") if config.task == "clip" else None
        except Exception as exn:
            bad.add(BadSample(sample["__url__"], sample["__key__"], f"{type(exn).__name__}: {exn}"))
            continue
        if text is not None and config.tokenizer is not None:
            text = _token_ids(config.tokenizer(text), sample["__key__"])
        yield _Prepared(sample["__key__"], config.transform(image), label, text)


def _token_ids(tokens: object, key: str) -> torch.Tensor:
    tokens = torch.as_tensor(tokens)
    if tokens.dim() == 2 and tokens.shape[0] == 1:  # open_clip tokenizers return [1, context] for one string
        tokens = tokens[0]
    if tokens.dim() != 1:
        raise ValueError(f"tokenizer returned shape {tuple(tokens.shape)} for sample {key}; expected [context]")
    return tokens


def _deliveries(prepared: Iterable[_Prepared], config: StreamConfig, bad: _BadLog) -> Iterator[Delivery]:
    # Not wds.batched: it emits a full batch only when the next sample arrives, which would start a refill pass
    # (reading a whole shuffle buffer) after a worker's last batch.
    batch = []
    for item in prepared:
        batch.append(item)
        if len(batch) == config.batch_size:
            yield Delivery(_collate(batch, config), len(batch), bad.drain())
            batch = []
    if batch and not config.drop_last:
        yield Delivery(_collate(batch, config), len(batch), bad.drain())


def _collate(batch: list[_Prepared], config: StreamConfig) -> object:
    parts: list[object] = [torch.stack([item.image for item in batch])]
    if config.task in LABELLED_TASKS:
        parts.append(torch.tensor([item.label for item in batch], dtype=torch.long))
    elif config.task == "clip":
        texts = [item.text for item in batch]
        parts.append(texts if config.tokenizer is None else _stack_tokens(texts, batch))
    if config.with_keys:
        parts.append([item.key for item in batch])
    return parts[0] if len(parts) == 1 else tuple(parts)


def _stack_tokens(tokens: list[torch.Tensor], batch: list[_Prepared]) -> torch.Tensor:
    for item, ids in zip(batch, tokens):
        if ids.shape != tokens[0].shape:
            raise ValueError(
                f"token ids of sample {item.key} have shape {tuple(ids.shape)}, of sample {batch[0].key} "
                f"{tuple(tokens[0].shape)}: the tokenizer must pad to a fixed context length"
            )
    return torch.stack(tokens)
