"""Sample sources for the writer: an image folder with one subfolder per class, and caption files."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .writer import FileImage, ShardSample

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
GENERATED_CAPTIONS_NOTE = (
    "Captions are generated from the class labels through the caption templates; no person wrote them, so "
    "zero-shot accuracy on this data measures label-template alignment, not open-vocabulary recognition."
)


@dataclass
class Source:
    """Samples to write, plus the dataset-level facts recorded in ``dataset.json``."""

    samples: list[ShardSample]
    info: dict


def template_captions(
    labels: Sequence[int], class_names: Sequence[str], templates: Sequence[str], seed: int = 0
) -> list[tuple[str, int]]:
    """One ``(caption, template index)`` per label: a template drawn with a fixed seed, filled with the class name."""
    for template in templates:
        try:
            fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
        except ValueError as error:
            raise ValueError(f"caption template {template!r}: {error}") from None
        if fields != [""]:
            raise ValueError(f"caption template {template!r} must contain exactly one '{{}}' for the class name and "
                             "no other fields (write a literal brace as {{ or }})")
    choices = np.random.default_rng(seed).integers(len(templates), size=len(labels))
    return [(templates[choice].format(class_names[label]), int(choice)) for label, choice in zip(labels, choices)]


def image_folder_source(
    root: str | os.PathLike,
    *,
    class_names_file: str | os.PathLike | None = None,
    caption_templates: Sequence[str] = (),
    caption_seed: int = 0,
) -> Source:
    """Images under ``root/<class folder>/...`` (ImageNet layout); labels are the sorted folder order.

    ``class_names_file`` has lines ``<folder> <class name>`` (the format of ImageNet's
    ``LOC_synset_mapping.txt``); without it the folder names are the class names. With ``caption_templates``
    (each containing ``{}``), every sample gets a caption generated from its class name, recorded as such.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root!r} is not a folder (expected one subfolder of images per class)")
    folders = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    class_names = _folder_class_names(folders, class_names_file) if class_names_file else folders
    paths, labels = [], []
    for label, folder in enumerate(folders):
        for path in _image_files(os.path.join(root, folder)):
            paths.append(path)
            labels.append(label)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in class subfolders of {root!r}")
    captions = template_captions(labels, class_names, caption_templates, caption_seed) if caption_templates else None
    samples = []
    for index, (path, label) in enumerate(zip(paths, labels)):
        metadata = {"source": "image-folder", "path": os.path.relpath(path, root), "label": label,
                    "class_name": class_names[label]}
        caption = None
        if captions is not None:
            caption, template = captions[index]
            metadata.update(caption_source="template", template=template)
        samples.append(ShardSample(FileImage(path), label=label, caption=caption, metadata=metadata))
    info = {"source": "image-folder", "root": os.path.abspath(root), "class_names": class_names,
            "class_folders": folders}
    if caption_templates:
        info.update(caption_source="template", caption_templates=list(caption_templates),
                    captions_note=GENERATED_CAPTIONS_NOTE)
    return Source(samples, info)


def caption_file_source(
    path: str | os.PathLike,
    *,
    image_column: str = "image",
    caption_column: str = "caption",
    label_column: str | None = None,
    image_root: str | os.PathLike | None = None,
    class_names_file: str | os.PathLike | None = None,
) -> Source:
    """Image path, caption and optional integer label per row of a ``.csv``, ``.tsv`` or ``.jsonl`` file.

    Relative image paths are resolved against ``image_root`` (default: the file's directory). An empty label
    (or, when no label column is required, a missing one) leaves the sample unlabeled; an empty caption leaves it
    without ``txt``. Labels come from ``label_column``, which must then exist, or else from a ``label`` column if
    there is one; with ``class_names_file`` (one class name per line, line *i* naming label *i*) the label column
    must exist.
    """
    path = os.fspath(path)
    base = os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(path))
    class_names = _read_lines(class_names_file) if class_names_file else None
    labels_required = label_column is not None or class_names is not None
    label_column = label_column or "label"
    required = (image_column, caption_column, *((label_column,) if labels_required else ()))
    samples = []
    for line, row in _read_rows(path, required=required):
        image, caption = row.get(image_column), row.get(caption_column)
        for column, value in ((image_column, image), (caption_column, caption)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{path}:{line}: {column!r} must be a string, got {type(value).__name__} {value!r}")
        if not image:
            raise ValueError(f"{path}:{line}: empty {image_column!r}")
        caption = caption or None
        label = _parse_label(row.get(label_column), f"{path}:{line}")
        metadata = {"source": "caption-file", "path": image, "line": line, "caption_source": "file"}
        if label is not None:
            metadata["label"] = label
            if class_names is not None:
                if not 0 <= label < len(class_names):
                    raise ValueError(f"{path}:{line}: label {label} has no name in {class_names_file} "
                                     f"({len(class_names)} names)")
                metadata["class_name"] = class_names[label]
        samples.append(ShardSample(FileImage(os.path.join(base, image)), label, caption, metadata))
    if not samples:
        raise ValueError(f"{path} has no rows")
    info = {"source": "caption-file", "file": os.path.abspath(path), "caption_source": "file",
            "class_names": class_names}
    return Source(samples, info)


def _image_files(directory: str) -> Iterator[str]:
    for folder, subfolders, files in os.walk(directory):
        subfolders.sort()  # os.walk order is filesystem order; sorting makes the sample list reproducible
        for name in sorted(files):
            if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                yield os.path.join(folder, name)


def _folder_class_names(folders: Sequence[str], class_names_file: str | os.PathLike) -> list[str]:
    names = {}
    for line in _read_lines(class_names_file):
        folder, *name = line.split(maxsplit=1)
        if folder in names:
            raise ValueError(f"{class_names_file} names folder {folder!r} twice")
        names[folder] = name[0] if name else folder
    missing = [folder for folder in folders if folder not in names]
    if missing:
        raise ValueError(f"{class_names_file} names no class for folder {missing[0]!r} ({len(missing)} unnamed)")
    return [names[folder] for folder in folders]


def _read_lines(path: str | os.PathLike) -> list[str]:
    # -sig: files saved by spreadsheet programs start with a BOM
    with open(path, encoding="utf-8-sig") as stream, _naming_undecodable(path):
        return [line.strip() for line in stream if line.strip()]


def _read_rows(path: str, required: Sequence[str]) -> Iterator[tuple[int, dict]]:
    """``(line number, row)`` pairs; the format follows the file suffix."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".csv", ".tsv", ".jsonl"):
        raise ValueError(f"{path}: caption files must end in .csv, .tsv or .jsonl")
    with open(path, encoding="utf-8-sig", newline="") as stream, _naming_undecodable(path):
        if suffix == ".jsonl":
            for number, line in enumerate(stream, start=1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as error:
                        raise ValueError(f"{path}:{number}: not a JSON object ({error.msg} at column {error.colno})") \
                            from None
                    if not isinstance(row, dict):
                        raise ValueError(f"{path}:{number}: expected a JSON object per line, got {type(row).__name__}")
                    _check_columns(path, number, row, required)
                    yield number, row
            return
        reader = csv.DictReader(stream, delimiter="\t" if suffix == ".tsv" else ",")
        _check_columns(path, 1, dict.fromkeys(reader.fieldnames or ()), required)
        for row in reader:
            # DictReader files extra fields under None and fills missing ones with None
            if None in row or None in row.values():
                present = sum(value is not None for key, value in row.items() if key is not None)
                raise ValueError(f"{path}:{reader.line_num}: {len(reader.fieldnames)} fields expected, got "
                                 f"{present + len(row.get(None) or [])}")
            yield reader.line_num, row


@contextlib.contextmanager
def _naming_undecodable(path: str) -> Iterator[None]:
    try:
        yield
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start})") from None


def _check_columns(path: str, line: int, row: dict, required: Sequence[str]) -> None:
    missing = [column for column in required if column not in row]
    if missing:
        raise ValueError(f"{path}:{line}: no column {missing[0]!r} (columns: {', '.join(map(str, row))})")


def _parse_label(value: object, where: str) -> int | None:
    if value is None or value == "":
        return None
    # bool is an int subclass, and int() would truncate 2.7: accept integers and their decimal strings only.
    if isinstance(value, int) and not isinstance(value, bool):
        label = value
    elif isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        label = int(value)
    else:
        raise ValueError(f"{where}: label {value!r} is not an integer")
    if label < 0:
        raise ValueError(f"{where}: label {label} is negative")
    return label
