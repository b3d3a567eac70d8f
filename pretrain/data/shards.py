"""Shard lists: expanding patterns, per-shard sample counts and the metadata the writer leaves next to shards."""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Mapping, Sequence

import webdataset as wds

SIZES_FILE = "sizes.json"
INFO_FILE = "dataset.json"

# "http://", "pipe:", "s3://", ... but not a Windows drive letter such as "C:".
_URL_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]+:")


def is_local(url: str) -> bool:
    """True for a plain filesystem path, False for anything webdataset opens through a URL scheme."""
    return not _URL_SCHEME.match(url)


def expand_shards(shards: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand shard specifications into a list of shard URLs.

    Each specification may be a brace pattern (``data/train-{000000..000009}.tar``), a glob of local files
    (``data/train-*.tar``), several of those joined with ``::``, a directory written by the shard writer (its
    ``sizes.json`` lists the shards), or a URL webdataset can open (``pipe:``, ``http://``, ...).

    Raises:
        FileNotFoundError: a specification matches no file, or names local files that do not exist.
    """
    specs = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
    if not specs:
        raise FileNotFoundError("no shards given (empty list)")
    urls: list[str] = []
    for spec in map(os.fspath, specs):
        urls.extend(_expand_spec(spec))
    return urls


def _expand_spec(spec: str) -> list[str]:
    if is_local(spec) and os.path.isdir(spec):
        return [os.path.join(spec, name) for name in read_sizes_file(spec)]
    urls, missing = [], []
    for url in wds.shardlists.expand_urls(spec):
        if not is_local(url):
            urls.append(url)
        elif glob.has_magic(url):
            urls.extend(sorted(glob.glob(url)))
        elif os.path.isfile(url):
            urls.append(url)
        else:
            missing.append(url)
    if not urls:
        raise FileNotFoundError(f"shard pattern {spec!r} matches no files")
    if missing:
        raise FileNotFoundError(
            f"shard pattern {spec!r}: {len(missing)} of {len(urls) + len(missing)} shards do not exist, "
            f"first {missing[0]!r}"
        )
    return urls


def read_sizes_file(directory: str) -> dict[str, int]:
    """Read ``directory/sizes.json`` (shard file name -> sample count, in shard order)."""
    path = os.path.join(directory, SIZES_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} does not exist: {directory!r} is not a finished shard directory "
            "(the writer writes sizes.json last)"
        )
    with open(path, encoding="utf-8") as stream:
        return json.load(stream)


def shard_sizes(urls: Sequence[str], sizes: Mapping[str, int] | None = None) -> list[int]:
    """Sample count of every shard, from ``sizes`` (shard file name -> count) or the ``sizes.json`` next to it.

    Raises:
        FileNotFoundError: a shard's directory has no readable ``sizes.json``.
        KeyError: a shard is not listed in the counts.
    """
    by_directory: dict[str, Mapping[str, int]] = {}
    counts = []
    for url in urls:
        directory, name = _split_url(url)
        if sizes is not None:
            table, where = sizes, "the sizes argument"
        else:
            if directory not in by_directory:
                by_directory[directory] = _sizes_in(directory)
            table, where = by_directory[directory], _join_url(directory, SIZES_FILE)
        if name not in table:
            raise KeyError(f"shard {url!r} is not listed in {where}")
        counts.append(int(table[name]))
    return counts


def read_dataset_info(shards: str | os.PathLike | Sequence[str | os.PathLike]) -> dict:
    """Read the ``dataset.json`` written next to the shards (class names, caption templates, source, counts).

    ``shards`` is a shard directory or anything :func:`expand_shards` accepts; the file is looked up in the
    directory of the first shard.
    """
    spec = os.fspath(shards) if isinstance(shards, (str, os.PathLike)) else None
    if spec is not None and is_local(spec) and os.path.isdir(spec):
        directory = spec
    else:
        directory = _split_url(expand_shards(shards)[0])[0]
    path = os.path.join(directory, INFO_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: shards in {directory!r} were not written by pretrain.data")
    with open(path, encoding="utf-8") as stream:
        return json.load(stream)


def _split_url(url: str) -> tuple[str, str]:
    if is_local(url):
        return os.path.dirname(url) or ".", os.path.basename(url)
    head, _, name = url.rpartition("/")
    return head, name


def _join_url(directory: str, name: str) -> str:
    return os.path.join(directory, name) if is_local(directory) else f"{directory}/{name}"


def _sizes_in(directory: str) -> dict[str, int]:
    if is_local(directory):
        return read_sizes_file(directory)
    url = _join_url(directory, SIZES_FILE)
    try:
        with wds.gopen(url) as stream:
            return json.load(stream)
    except Exception as exn:  # any opener failure (curl, pipe, cloud CLI) means the counts are unknown
        raise FileNotFoundError(f"cannot read {url} ({exn}); pass sizes={{shard name: count}}") from exn
