"""Command line: ``python -m pretrain.data {folder,captions,demo} ... --out DIR`` (see docs/data.md)."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Sequence

from ..recipe import at_least
from .demo import FASHION_MNIST_DIR, write_demo
from .shards import SIZES_FILE
from .sources import Source, caption_file_source, image_folder_source
from .writer import DEFAULT_MAX_SAMPLES_PER_SHARD, DEFAULT_MAX_SHARD_BYTES, WriteSummary, write_shards

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str) -> int:
    """Bytes from ``"500MB"``, ``"1GiB"``, ``"2e8"`` or ``"1000000"``."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kmgtKMGT]i?)?[bB]?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 500MB, 1GiB, 200000000)")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summaries = args.command(args)
    except (FileNotFoundError, ValueError, ImportError) as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 1
    for summary in summaries:
        skipped = f", {len(summary.skipped_files)} unreadable files left out" if summary.skipped_files else ""
        print(f"{summary.out_dir}: {summary.num_samples} samples in {len(summary.shards)} shards "
              f"({len(summary.written)} written, {len(summary.reused)} already complete{skipped}); "
              f"counts in {os.path.join(summary.out_dir, SIZES_FILE)}")
    return 0


def _folder(args: argparse.Namespace) -> list[WriteSummary]:
    source = image_folder_source(args.root, class_names_file=args.class_names,
                                 caption_templates=args.caption_template, caption_seed=args.seed)
    return [_write(source, args)]


def _captions(args: argparse.Namespace) -> list[WriteSummary]:
    source = caption_file_source(args.file, image_column=args.image_column, caption_column=args.caption_column,
                                 label_column=args.label_column, image_root=args.image_root,
                                 class_names_file=args.class_names)
    return [_write(source, args)]


def _write(source: Source, args: argparse.Namespace) -> WriteSummary:
    return write_shards(
        source.samples, args.out, dataset_info=source.info, prefix=args.prefix,
        max_samples_per_shard=args.max_samples_per_shard or DEFAULT_MAX_SAMPLES_PER_SHARD,
        max_shard_bytes=args.max_shard_size, workers=args.workers,
        shuffle_seed=None if args.keep_order else args.seed, progress=not args.no_progress,
    )


def _demo(args: argparse.Namespace) -> list[WriteSummary]:
    summaries = write_demo(
        args.out, source=args.source, train_size=args.train_size, val_size=args.val_size,
        max_samples_per_shard=args.max_samples_per_shard or 1000, workers=args.workers, seed=args.seed,
        fashion_mnist_dir=args.fashion_mnist_dir, progress=not args.no_progress,
    )
    return list(summaries.values())


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="output directory")
    common.add_argument("--workers", type=at_least(1), default=min(8, os.cpu_count() or 1), help="writer processes")
    common.add_argument("--seed", type=int, default=0, help="seed of the write order and caption templates")
    common.add_argument("--max-samples-per-shard", type=at_least(1), help="samples per shard at most")
    common.add_argument("--no-progress", action="store_true", help="no progress bar")
    sharding = argparse.ArgumentParser(add_help=False)
    sharding.add_argument("--max-shard-size", type=parse_size, default=DEFAULT_MAX_SHARD_BYTES,
                          help="bytes per shard at most, e.g. 500MB or 1GiB (default 1GB)")
    sharding.add_argument("--prefix", default="shard", help="shard file names are PREFIX-NNNNNN.tar")
    sharding.add_argument("--keep-order", action="store_true", help="write samples in source order, unshuffled")

    parser = argparse.ArgumentParser(prog="python -m pretrain.data", description="Write WebDataset shards.")
    commands = parser.add_subparsers(required=True, metavar="{folder,captions,demo}")

    folder = commands.add_parser("folder", parents=[common, sharding],
                                 help="an image folder with one subfolder per class (ImageNet layout)")
    folder.add_argument("root", help="folder whose subfolders are the classes")
    folder.add_argument("--class-names", help="lines '<folder> <class name>' (ImageNet LOC_synset_mapping.txt)")
    folder.add_argument("--caption-template", action="append", default=[],
                        help="generate captions from class names, e.g. 'a photo of a {}.' (repeatable)")
    folder.set_defaults(command=_folder)

    captions = commands.add_parser("captions", parents=[common, sharding],
                                   help="a .csv, .tsv or .jsonl file of image path, caption and optional label")
    captions.add_argument("file", help="caption file; its suffix gives the format")
    captions.add_argument("--image-column", default="image")
    captions.add_argument("--caption-column", default="caption")
    captions.add_argument("--label-column", help="integer labels (default: a label column if the file has one)")
    captions.add_argument("--image-root", help="base of relative image paths (default: the file's folder)")
    captions.add_argument("--class-names", help="one class name per line, line i naming label i")
    captions.set_defaults(command=_captions)

    demo = commands.add_parser("demo", parents=[common],
                               help="train/val demo shards: Fashion-MNIST if installed, else scikit-learn digits")
    demo.add_argument("--source", choices=("auto", "fashion-mnist", "digits"), default="auto")
    demo.add_argument("--train-size", type=int, help="default 10000 (Fashion-MNIST) or 1397 (digits)")
    demo.add_argument("--val-size", type=int, help="default 2000 (Fashion-MNIST) or 400 (digits)")
    demo.add_argument("--fashion-mnist-dir", default=FASHION_MNIST_DIR)
    demo.set_defaults(command=_demo)
    return parser


if __name__ == "__main__":
    sys.exit(main())
