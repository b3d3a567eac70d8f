"""Atomic writes of files and folders: readers see the old version or the new one, never a partial one, even
after a crash."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, temp_suffix: str = ".partial") -> Iterator[BinaryIO]:
    """A binary stream whose content replaces ``path`` only if the block completes; the temporary file
    (``.<name>.<random><temp_suffix>`` next to ``path``) is removed on failure."""
    directory, name = os.path.split(os.fspath(path))
    descriptor, temporary = tempfile.mkstemp(dir=directory or ".", prefix=f".{name}.", suffix=temp_suffix)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            yield stream
            stream.flush()
            os.fchmod(stream.fileno(), 0o644)  # mkstemp makes files private; these files are meant to be read
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    sync_directory(directory or ".")


def write_atomically(path: str | os.PathLike, data: bytes, temp_suffix: str = ".partial") -> None:
    """Replace ``path`` (creating its directory) with ``data`` atomically."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, temp_suffix) as stream:
        stream.write(data)


def sync_directory(directory: str | os.PathLike) -> None:
    """Make renames in ``directory`` durable: the directory entry itself has to reach the disk."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh staging folder next to ``path`` that replaces ``path`` only if the block completes: readers see
    the previous folder (or none) or the whole new one; a failure removes the staging folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield staging
        previous = path.with_name(path.name + ".old")
        if path.exists():
            os.replace(path, previous)
        os.replace(staging, path)
        shutil.rmtree(previous, ignore_errors=True)
        sync_directory(path.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
