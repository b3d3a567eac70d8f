"""Shard writer: plans shards under count and byte limits, writes them in parallel, atomically and reproducibly."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from ..atomic import atomic_file, sync_directory
from .shards import INFO_FILE, SIZES_FILE

logger = logging.getLogger(__name__)

JOURNAL_FILE = ".complete-shards.json"
DEFAULT_MAX_SAMPLES_PER_SHARD = 5000
DEFAULT_MAX_SHARD_BYTES = 10**9

_TEMP_SUFFIX = ".partial"
_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK  # tarfile pads archives to whole records
_TAR_END = 2 * _TAR_BLOCK
_STORED_AS_IS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}
# Part of every shard fingerprint: bump it when the bytes written for a sample change, so re-runs rewrite.
_ENCODING_VERSION = 1


@dataclass(frozen=True)
class FileImage:
    """An image file; JPEG, PNG and WebP are stored byte for byte, other formats re-encoded as PNG."""

    path: str


@dataclass(frozen=True, eq=False)
class ArrayImage:
    """Pixels (uint8, ``HxW`` gray or ``HxWx3`` RGB), stored as a lossless PNG."""

    pixels: np.ndarray

    def __post_init__(self) -> None:
        shape, dtype = self.pixels.shape, self.pixels.dtype
        if dtype != np.uint8 or not (len(shape) == 2 or (len(shape) == 3 and shape[2] == 3)):
            raise ValueError(f"ArrayImage needs uint8 HxW or HxWx3 pixels, got {dtype} with shape {shape}")


@dataclass(frozen=True)
class ShardSample:
    """One sample to write: an image plus optional integer label, caption and JSON metadata."""

    image: FileImage | ArrayImage
    label: int | None = None
    caption: str | None = None
    metadata: Mapping = field(default_factory=dict)


@dataclass
class WriteSummary:
    """What :func:`write_shards` left in ``out_dir``."""

    out_dir: str
    shards: dict[str, int]  # shard file name -> sample count, as in sizes.json
    written: list[str]  # shards written by this call
    reused: list[str]  # shards already complete from an earlier run
    skipped_files: list[tuple[str, str]]  # (image source, reason) of samples left out

    @property
    def num_samples(self) -> int:
        return sum(self.shards.values())


def write_shards(
    samples: Sequence[ShardSample],
    out_dir: str | os.PathLike,
    *,
    dataset_info: Mapping | None = None,
    prefix: str = "shard",
    max_samples_per_shard: int = DEFAULT_MAX_SAMPLES_PER_SHARD,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    workers: int = 1,
    shuffle_seed: int | None = 0,
    progress: bool = True,
) -> WriteSummary:
    """Write ``samples`` as WebDataset shards ``out_dir/{prefix}-NNNNNN.tar``.

    Each sample becomes ``KEY.{jpg|png|webp}``, ``KEY.cls`` (label), ``KEY.txt`` (caption) and ``KEY.json``
    (metadata), where ``KEY`` is the sample's zero-padded position in write order. Samples are written in a
    fixed pseudo-random order (``shuffle_seed``; ``None`` keeps the given order) so that a shard mixes classes.
    A shard holds at most ``max_samples_per_shard`` samples and at most ``max_shard_bytes`` bytes (exact for
    images stored as they are, estimated for encoded arrays; a single larger sample gets a shard of its own).

    Output is byte-identical for identical input and settings whatever ``workers`` is. Shards are written to a
    temporary name, synced and renamed, and recorded as complete in a journal; a re-run reuses shards whose
    file exists and whose recorded content fingerprint matches, and rewrites the rest. ``dataset.json`` and
    then ``sizes.json`` (shard name -> sample count) are written last. Images that cannot be read are left out
    and listed in the summary and in ``dataset.json``.
    """
    if max_samples_per_shard < 1 or max_shard_bytes < 1 or workers < 1:
        raise ValueError("max_samples_per_shard, max_shard_bytes and workers must be positive")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    _remove_temporaries(out_dir)

    readable, planned_bytes, identities, skipped = _survey(samples)
    if not readable:
        raise ValueError(f"no readable samples to write to {out_dir!r} ({len(skipped)} unreadable)")
    order = np.arange(len(readable))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(readable))
    spans = _plan_shards([planned_bytes[i] for i in order], max_samples_per_shard, max_shard_bytes)
    tasks = _shard_tasks(out_dir, prefix, spans, [readable[i] for i in order], [identities[i] for i in order])
    _warn_about_other_shards(out_dir, {task.name for task in tasks})

    journal = _read_journal(out_dir)
    todo = [task for task in tasks if not _is_complete(task, journal)]
    sizes_path = os.path.join(out_dir, SIZES_FILE)
    if todo and os.path.exists(sizes_path):
        # sizes.json marks a complete directory: it must go before any shard of it is rewritten.
        os.remove(sizes_path)
        sync_directory(out_dir)
    with tqdm(total=len(readable), unit="img", desc=out_dir, disable=not progress) as bar:
        bar.update(len(readable) - sum(len(task.samples) for task in todo))

        def record(result: _ShardResult) -> None:
            journal[result.name] = {"count": result.count, "fingerprint": result.fingerprint, "skipped": result.skipped}
            _atomic_write_json(os.path.join(out_dir, JOURNAL_FILE), journal)
            bar.update(result.planned)

        _run_tasks(todo, workers, record)

    sizes = {task.name: journal[task.name]["count"] for task in tasks}
    skipped += [tuple(entry) for task in tasks for entry in journal[task.name]["skipped"]]
    if not sum(sizes.values()):
        raise ValueError(f"no readable samples to write to {out_dir!r}: none of the {len(skipped)} images decodes "
                         f"(first: {skipped[0][0]}: {skipped[0][1]})")
    info = {
        **(dataset_info or {}),
        "format": "webdataset",
        "num_samples": sum(sizes.values()),
        "num_shards": len(tasks),
        "shard_pattern": f"{prefix}-{{000000..{len(tasks) - 1:06d}}}.tar",
        "skipped_files": [list(entry) for entry in skipped],
        "writer": {
            "max_samples_per_shard": max_samples_per_shard,
            "max_shard_bytes": max_shard_bytes,
            "shuffle_seed": shuffle_seed,
        },
    }
    _atomic_write_json(os.path.join(out_dir, INFO_FILE), info)
    _atomic_write_json(os.path.join(out_dir, SIZES_FILE), sizes)
    written = {task.name for task in todo}
    return WriteSummary(
        out_dir=out_dir,
        shards=sizes,
        written=[task.name for task in tasks if task.name in written],
        reused=[task.name for task in tasks if task.name not in written],
        skipped_files=skipped,
    )


def _shard_tasks(
    out_dir: str, prefix: str, spans: list[range], samples: list[ShardSample], identities: list[bytes]
) -> list[_ShardTask]:
    """One task per planned shard; ``samples`` are in write order, and a sample's key is its position."""
    width = max(6, len(str(len(samples) - 1)))
    tasks = []
    for number, span in enumerate(spans):
        keys = [f"{position:0{width}d}" for position in span]
        chosen = samples[span.start : span.stop]
        fingerprint = _fingerprint(keys, identities[span.start : span.stop], chosen)
        tasks.append(_ShardTask(out_dir, f"{prefix}-{number:06d}.tar", keys, chosen, fingerprint))
    return tasks


def _plan_shards(sample_bytes: Sequence[int], max_samples: int, max_bytes: int) -> list[range]:
    """Cut samples (sizes in tar bytes, in write order) into consecutive shards under both limits."""
    shards, start, used = [], 0, _TAR_END
    for index, size in enumerate(sample_bytes):
        too_big = _round_up(used + size, _TAR_RECORD) > max_bytes
        if index > start and (index - start >= max_samples or too_big):
            shards.append(range(start, index))
            start, used = index, _TAR_END
        used += size
    shards.append(range(start, len(sample_bytes)))
    return shards


def _encode_image(image: FileImage | ArrayImage) -> tuple[str, bytes]:
    """The WebDataset extension and bytes stored for an image."""
    if isinstance(image, ArrayImage):
        return "png", _png_bytes(Image.fromarray(image.pixels))
    with open(image.path, "rb") as stream:
        data = stream.read()
    with Image.open(io.BytesIO(data)) as decoded:  # reads the header only, unless re-encoding
        extension = _STORED_AS_IS.get(decoded.format)
        if extension is not None:
            return extension, data
        return "png", _png_bytes(decoded if decoded.mode in _PNG_MODES else decoded.convert("RGB"))


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _text_members(sample: ShardSample) -> dict[str, bytes]:
    members = {"json": json.dumps(dict(sample.metadata), sort_keys=True, ensure_ascii=False).encode("utf-8")}
    if sample.label is not None:
        members["cls"] = str(int(sample.label)).encode("ascii")
    if sample.caption is not None:
        members["txt"] = sample.caption.encode("utf-8")
    return members


def _member_bytes(size: int) -> int:
    return _TAR_BLOCK + _round_up(size, _TAR_BLOCK)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _survey(samples: Sequence[ShardSample]) -> tuple[list[ShardSample], list[int], list[bytes], list[tuple[str, str]]]:
    """Planned tar bytes and a content identity of every sample whose image exists; the others are skipped."""
    readable, planned, identities, skipped = [], [], [], []
    for sample in samples:
        if isinstance(sample.image, FileImage):
            try:
                status = os.stat(sample.image.path)
            except OSError as exn:
                skipped.append((sample.image.path, f"{type(exn).__name__}: {exn.strerror}"))
                continue
            image_bytes = status.st_size
            identity = f"{os.path.abspath(sample.image.path)}\0{status.st_size}\0{status.st_mtime_ns}".encode()
        else:
            pixels = sample.image.pixels
            image_bytes = pixels.nbytes + _TAR_BLOCK  # PNG of small images: about raw size plus headers
            identity = f"{pixels.shape}".encode() + hashlib.sha256(pixels.tobytes()).digest()
        text_bytes = sum(_member_bytes(len(data)) for data in _text_members(sample).values())
        readable.append(sample)
        planned.append(_member_bytes(image_bytes) + text_bytes)
        identities.append(identity)
    return readable, planned, identities, skipped


def _fingerprint(keys: Sequence[str], identities: Sequence[bytes], samples: Sequence[ShardSample]) -> str:
    digest = hashlib.sha256(f"encoding {_ENCODING_VERSION}".encode())
    for key, identity, sample in zip(keys, identities, samples):
        digest.update(key.encode() + b"\0" + identity)
        for extension, data in sorted(_text_members(sample).items()):
            digest.update(extension.encode() + b"\0" + data)
    return digest.hexdigest()


@dataclass(frozen=True)
class _ShardTask:
    out_dir: str
    name: str
    keys: list[str]
    samples: list[ShardSample]
    fingerprint: str


@dataclass(frozen=True)
class _ShardResult:
    name: str
    count: int
    planned: int
    fingerprint: str
    skipped: list[tuple[str, str]]


def _write_shard(task: _ShardTask) -> _ShardResult:
    count, skipped = 0, []
    with atomic_file(os.path.join(task.out_dir, task.name), _TEMP_SUFFIX) as stream:
        # Fixed mtime (and TarWriter's fixed owner and mode) make the archive a function of its content.
        tar = wds.TarWriter(stream, encoder=False, mtime=0)
        for key, sample in zip(task.keys, task.samples):
            try:
                extension, data = _encode_image(sample.image)
            except (OSError, ValueError, Image.DecompressionBombError) as exn:
                # PIL names the in-memory file by its address, which would make dataset.json differ between runs.
                reason = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the file", str(exn))
                skipped.append((_describe(sample.image), f"{type(exn).__name__}: {reason}"))
                continue
            tar.write({"__key__": key, extension: data, **_text_members(sample)})
            count += 1
        tar.close()
    return _ShardResult(task.name, count, len(task.samples), task.fingerprint, skipped)


def _describe(image: FileImage | ArrayImage) -> str:
    return image.path if isinstance(image, FileImage) else f"array {image.pixels.shape}"


def _run_tasks(tasks: list[_ShardTask], workers: int, record: Callable[[_ShardResult], None]) -> None:
    if workers == 1 or len(tasks) <= 1:
        for task in tasks:
            record(_write_shard(task))
        return
    queue = iter(tasks)
    with futures.ProcessPoolExecutor(max_workers=workers) as pool:
        # A bounded window keeps only a few shards' sample lists pickled in flight at a time.
        pending = {pool.submit(_write_shard, task) for task in itertools.islice(queue, 2 * workers)}
        while pending:
            done, pending = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
            for future in done:
                record(future.result())
                following = next(queue, None)
                if following is not None:
                    pending.add(pool.submit(_write_shard, following))


def _is_complete(task: _ShardTask, journal: Mapping) -> bool:
    entry = journal.get(task.name)
    exists = os.path.isfile(os.path.join(task.out_dir, task.name))
    return exists and entry is not None and entry.get("fingerprint") == task.fingerprint


def _read_journal(out_dir: str) -> dict:
    path = os.path.join(out_dir, JOURNAL_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as stream:
        return json.load(stream)


def _remove_temporaries(out_dir: str) -> None:
    """Delete leftovers of killed runs (they never carry a final shard name)."""
    for name in os.listdir(out_dir):
        if name.startswith(".") and name.endswith(_TEMP_SUFFIX):
            os.unlink(os.path.join(out_dir, name))


def _warn_about_other_shards(out_dir: str, planned: set[str]) -> None:
    """Shards this write leaves in place: an earlier, larger plan's, or another ``--prefix``'s. Reading the directory
    goes by ``sizes.json``, which lists this write's alone, but a glob would mix the others in."""
    pattern = re.compile(r".+-\d{6}\.tar")
    others = sorted(name for name in os.listdir(out_dir) if pattern.fullmatch(name) and name not in planned)
    if others:
        logger.warning(
            "%s already holds %d shards that this write does not replace (first %s): the directory reads only the "
            "%d listed in sizes.json, but a glob such as %s would mix them in; delete them or write elsewhere",
            out_dir, len(others), others[0], len(planned), os.path.join(out_dir, "*.tar"),
        )


def _atomic_write_json(path: str, value: object) -> None:
    with atomic_file(path, _TEMP_SUFFIX) as stream:
        stream.write((json.dumps(value, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
