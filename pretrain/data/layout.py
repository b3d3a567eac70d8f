"""Which samples each (rank, worker) reads in an epoch, how many batches it makes, and where a resume restarts.

Epoch mode splits samples, not whole shards: the epoch's shard order (reshuffled every epoch) lays all N
samples out in one sequence; rank r owns positions ``[r*N//R, (r+1)*N//R)`` and hands them to its workers in
contiguous runs of whole batches. A shard straddling a boundary is read by both sides, each keeping its own
part, so any number of shards serves any number of ranks and workers, and every sample has exactly one owner.

Workers of a rank emit batches in turn (worker 0, 1, ..., 0, 1, ...), which is the order a PyTorch DataLoader
with ``in_order=True`` delivers them; after ``k`` batches worker ``w`` has therefore emitted
``worker_quotas(k, num_workers)[w]`` of them, the same on every rank. ("Worker" here is a stream of the epoch;
on a resume the stream module hands the streams to the DataLoader's workers rotated, so that delivery goes on
in the same order.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import webdataset as wds
from webdataset.utils import make_seed


@dataclass(frozen=True)
class Piece:
    """Samples ``start`` to ``stop`` (in tar order) of one shard."""

    url: str
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def rank_span(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """The epoch positions owned by ``rank``; spans of different ranks differ in length by at most one."""
    return rank * num_samples // world_size, (rank + 1) * num_samples // world_size


def rank_steps(num_samples: int, rank: int, world_size: int, batch_size: int, drop_last: bool) -> int:
    """Batches per epoch on ``rank``: with ``drop_last`` full batches only, equal on all ranks."""
    if drop_last:
        return num_samples // world_size // batch_size
    start, stop = rank_span(num_samples, rank, world_size)
    return math.ceil((stop - start) / batch_size)


def worker_quotas(batches: int, num_workers: int) -> list[int]:
    """How ``batches`` round-robin batches fall on ``num_workers`` workers."""
    return [batches // num_workers + (worker < batches % num_workers) for worker in range(num_workers)]


def epoch_order(
    urls: Sequence[str], sizes: Sequence[int], *, seed: int, epoch: int, shuffle: bool
) -> list[tuple[str, int]]:
    """``(url, sample count)`` of every shard in the epoch's reading order."""
    size_of = dict(zip(urls, sizes))
    shard_list = wds.SimpleShardList(list(urls), seed=make_seed(seed, epoch) if shuffle else None)
    ordered = [entry["url"] for entry in shard_list]
    return [(url, size_of[url]) for url in ordered]


def epoch_worker_pieces(
    order: Sequence[tuple[str, int]],
    *,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    batch_size: int,
    drop_last: bool,
) -> list[Piece]:
    """The pieces one worker reads in an epoch: its run of whole batches (the last one partial without drop_last)."""
    num_samples = sum(size for _, size in order)
    start, stop = rank_span(num_samples, rank, world_size)
    quotas = worker_quotas(rank_steps(num_samples, rank, world_size, batch_size, drop_last), num_workers)
    first = start + sum(quotas[:worker]) * batch_size
    last = min(first + quotas[worker] * batch_size, stop)
    return _cut(order, first, last)


def resampled_pieces(
    urls: Sequence[str], sizes: Sequence[int], *, seed: int, epoch: int, rank: int, worker: int
) -> Iterator[Piece]:
    """An endless, seeded draw of whole shards with replacement, different for every (epoch, rank, worker)."""
    size_of = dict(zip(urls, sizes))
    draws = wds.ResampledShards(
        list(urls), seed=make_seed(seed, epoch), deterministic=True, worker_seed=lambda: make_seed(rank, worker)
    )
    for entry in draws:
        yield Piece(entry["url"], 0, size_of[entry["url"]])


def skip_samples(pieces: Iterable[Piece], count: int) -> Iterator[Piece]:
    """``pieces`` without their first ``count`` samples (whole pieces are skipped without being read)."""
    for piece in pieces:
        if count >= piece.size:
            count -= piece.size
            continue
        yield Piece(piece.url, piece.start + count, piece.stop)
        count = 0


def _cut(order: Sequence[tuple[str, int]], first: int, last: int) -> list[Piece]:
    pieces, position = [], 0
    for url, size in order:
        start, stop = max(first, position), min(last, position + size)
        if start < stop:
            pieces.append(Piece(url, start - position, stop - position))
        position += size
    return pieces
