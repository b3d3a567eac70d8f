"""Tests of the pretraining data layer on real images (scikit-learn digits), CPU only."""

from __future__ import annotations

import dataclasses
import io
import json
import multiprocessing
import os
import signal
import tarfile
import time
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.data import (
    ArrayImage,
    BadDataError,
    DeviceNormalize,
    FileImage,
    ShardSample,
    build_loader,
    caption_file_source,
    expand_shards,
    image_folder_source,
    read_dataset_info,
    template_captions,
    write_demo,
    write_shards,
)
from pretrain.data.__main__ import main as cli_main
from pretrain.data.demo import DIGITS_CLASSES, DIGITS_TEMPLATES, FASHION_MNIST_CLASSES, FASHION_MNIST_DIR

sklearn_datasets = pytest.importorskip("sklearn.datasets")

HAS_FASHION_MNIST = os.path.isfile(os.path.join(FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz"))


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as uint8 8x8 images (0..16 scaled to 0..255) and their labels."""
    data = sklearn_datasets.load_digits()
    return np.rint(data.images * (255 / 16)).astype(np.uint8), data.target


def read_shards(directory: str) -> dict[str, dict[str, bytes]]:
    """Every sample of the shards listed in sizes.json, read with the tarfile module: key -> {ext: bytes}."""
    samples: dict[str, dict[str, bytes]] = {}
    for name in load_json(os.path.join(directory, "sizes.json")):
        with tarfile.open(os.path.join(directory, name)) as tar:
            for member in tar.getmembers():
                key, extension = member.name.split(".", 1)
                samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return samples


def load_json(path) -> object:
    with open(path) as stream:
        return json.load(stream)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def write_digit_shards(directory, digits, count: int, per_shard: int, **options) -> list[str]:
    """``count`` digits with labels and template captions as shards; returns the sample keys."""
    images, labels = digits
    samples = [
        ShardSample(ArrayImage(images[i]), label=int(labels[i]), caption=f"a handwritten digit {labels[i]}.",
                    metadata={"index": i})
        for i in range(count)
    ]
    summary = write_shards(samples, directory, max_samples_per_shard=per_shard, progress=False, **options)
    return sorted(read_shards(summary.out_dir))


def collect(loader) -> list[list[str]]:
    """The sample keys of each batch of one pass over a loader built with ``with_keys=True``."""
    return [list(batch[-1]) for batch in loader]


def flat(batches: list[list[str]]) -> list[str]:
    return [key for batch in batches for key in batch]


# --- writer ---------------------------------------------------------------------------------------------------


def make_image_folder(root, digits, per_class: int = 6) -> dict[str, tuple[int, np.ndarray]]:
    """Class folders 'd3', 'd5', 'd7' of PNG digits; returns relative path -> (digit, pixels)."""
    images, labels = digits
    written = {}
    for digit in (3, 5, 7):
        os.makedirs(os.path.join(root, f"d{digit}"))
        for number, index in enumerate(np.flatnonzero(labels == digit)[:per_class]):
            path = os.path.join(f"d{digit}", f"{number}.png")
            Image.fromarray(images[index]).save(os.path.join(root, path))
            written[path] = (digit, images[index])
    return written


def test_image_folder_shards_round_trip(tmp_path, digits):
    written = make_image_folder(tmp_path / "images", digits)
    names = tmp_path / "names.txt"
    names.write_text("d3 three\nd5 five\nd7 seven\n")
    source = image_folder_source(tmp_path / "images", class_names_file=names, caption_templates=["a {} digit."])
    summary = write_shards(source.samples, tmp_path / "shards", dataset_info=source.info,
                           max_samples_per_shard=5, progress=False)

    sizes = load_json(tmp_path / "shards" / "sizes.json")
    assert sizes == summary.shards and len(sizes) == 4 and sum(sizes.values()) == len(written) == 18
    info = read_dataset_info(tmp_path / "shards")
    assert info["class_names"] == ["three", "five", "seven"]
    assert info["caption_source"] == "template" and info["caption_templates"] == ["a {} digit."]
    samples = read_shards(str(tmp_path / "shards"))
    assert len(samples) == 18
    for sample in samples.values():
        metadata = json.loads(sample["json"])
        digit, expected = written[metadata["path"]]
        label = int(sample["cls"])
        assert label == [3, 5, 7].index(digit) == metadata["label"]
        assert sample["txt"].decode() == f"a {info['class_names'][label]} digit."
        assert metadata["caption_source"] == "template"
        np.testing.assert_array_equal(pixels(sample["png"]), expected)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_caption_file_shards_round_trip(tmp_path, digits, suffix):
    images, labels = digits
    rows = []
    for i in range(7):
        Image.fromarray(images[i]).save(tmp_path / f"{i}.png")
        label = "" if i == 3 else labels[i]
        rows.append({"image": f"{i}.png", "caption": f"digit, number {labels[i]}", "label": label})
    path = tmp_path / f"captions{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps({k: (int(v) if k == "label" and v != "" else v) for k, v in row.items()})
                                + "\n" for row in rows))
    else:
        separator = "\t" if suffix == ".tsv" else ","
        lines = ["image" + separator + "caption" + separator + "label"]
        lines += [separator.join([row["image"], f'"{row["caption"]}"', str(row["label"])]) for row in rows]
        path.write_text("\n".join(lines) + "\n")
    source = caption_file_source(path)
    write_shards(source.samples, tmp_path / "shards", dataset_info=source.info, progress=False)

    samples = read_shards(str(tmp_path / "shards"))
    assert len(samples) == 7
    for sample in samples.values():
        metadata = json.loads(sample["json"])
        index = int(metadata["path"].split(".")[0])
        assert sample["txt"].decode() == f"digit, number {labels[index]}"
        assert metadata["caption_source"] == "file"
        if index == 3:
            assert "cls" not in sample
        else:
            assert int(sample["cls"]) == labels[index]
        np.testing.assert_array_equal(pixels(sample["png"]), images[index])


@pytest.mark.parametrize("content, message", [
    ('{"image": "0.png", "caption": "a", "label": 1}\n{"image": "1.png",\n', r"captions\.jsonl:2: not a JSON object"),
    ('[1, 2]\n', r"captions\.jsonl:1: expected a JSON object per line, got list"),
    ('{"image": "0.png", "caption": "a", "label": 2.7}\n', r"captions\.jsonl:1: label 2\.7 is not an integer"),
    ('{"image": "0.png", "caption": "a", "label": true}\n', r"captions\.jsonl:1: label True is not an integer"),
    ('{"image": "0.png", "caption": "a", "label": [1]}\n', r"captions\.jsonl:1: label \[1\] is not an integer"),
    ('{"image": "0.png", "caption": "a", "label": "-1"}\n', r"captions\.jsonl:1: label -1 is negative"),
    ('{"image": "0.png", "caption": "a", "label": "--3"}\n', r"captions\.jsonl:1: label '--3' is not an integer"),
])
def test_caption_file_rows_that_cannot_be_read_are_named(tmp_path, content, message):
    (tmp_path / "captions.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message):
        caption_file_source(tmp_path / "captions.jsonl")


def test_a_folder_named_twice_in_the_class_names_is_an_error(tmp_path, digits):
    make_image_folder(tmp_path / "images", digits, per_class=1)
    (tmp_path / "names.txt").write_text("d3 three\nd5 five\nd7 seven\nd5 fünf\n")
    with pytest.raises(ValueError, match=r"names\.txt names folder 'd5' twice"):
        image_folder_source(tmp_path / "images", class_names_file=tmp_path / "names.txt")


@pytest.mark.parametrize("name, content, message", [
    ("captions.csv", "image,caption,label\n0.png,a,1,extra\n", r"captions\.csv:2: 3 fields expected, got 4"),
    ("captions.csv", "image,caption,label\n0.png\n", r"captions\.csv:2: 3 fields expected, got 1"),
    ("captions.jsonl", '{"image": "0.png", "caption": ["a", "b"]}\n', r"'caption' must be a string, got list"),
    ("captions.jsonl", '{"image": 7, "caption": "a"}\n', r"'image' must be a string, got int 7"),
])
def test_caption_file_fields_are_checked(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=message):
        caption_file_source(tmp_path / name)


def test_a_named_label_column_must_exist_and_templates_take_one_field(tmp_path):
    (tmp_path / "captions.csv").write_text("image,caption,label\n0.png,a,1\n")
    with pytest.raises(ValueError, match=r"captions\.csv:1: no column 'lable'"):
        caption_file_source(tmp_path / "captions.csv", label_column="lable")
    (tmp_path / "names.txt").write_text("zero\none\n")
    (tmp_path / "unlabelled.csv").write_text("image,caption\n0.png,a\n")
    with pytest.raises(ValueError, match=r"unlabelled\.csv:1: no column 'label'"):
        caption_file_source(tmp_path / "unlabelled.csv", class_names_file=tmp_path / "names.txt")
    assert caption_file_source(tmp_path / "captions.csv").samples[0].label == 1
    with pytest.raises(ValueError, match=r"exactly one '\{\}' for the class name and no other fields"):
        template_captions([0], ["zero"], ["a {} in {style}"])
    assert template_captions([0], ["zero"], ["a {{literal}} {}"])[0][0] == "a {literal} zero"


def test_writer_output_is_identical_whatever_the_worker_count(tmp_path, digits):
    write_digit_shards(tmp_path / "one", digits, 60, per_shard=8, workers=1)
    write_digit_shards(tmp_path / "two", digits, 60, per_shard=8, workers=2)
    names = load_json(tmp_path / "one" / "sizes.json")
    assert len(names) == 8
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
        with tarfile.open(tmp_path / "one" / name) as tar:
            assert {member.mtime for member in tar.getmembers()} == {0}


def test_rerun_rewrites_only_incomplete_shards(tmp_path, digits):
    images, labels = digits
    samples = [ShardSample(ArrayImage(images[i]), label=int(labels[i])) for i in range(40)]
    first = write_shards(samples, tmp_path, max_samples_per_shard=10, progress=False)
    assert first.written == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar", "shard-000003.tar"]
    original = (tmp_path / "shard-000002.tar").read_bytes()
    # A killed run: one shard never renamed into place, a temporary left behind, no sizes.json yet.
    (tmp_path / "shard-000002.tar").unlink()
    (tmp_path / "sizes.json").unlink()
    (tmp_path / ".shard-000002.tar.abc123.partial").write_bytes(original[:1000])

    second = write_shards(samples, tmp_path, max_samples_per_shard=10, progress=False)
    assert second.written == ["shard-000002.tar"] and len(second.reused) == 3
    assert (tmp_path / "shard-000002.tar").read_bytes() == original
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".partial")]
    assert load_json(tmp_path / "sizes.json") == first.shards

    relabelled = [ShardSample(sample.image, label=sample.label, caption="new") for sample in samples]
    third = write_shards(relabelled, tmp_path, max_samples_per_shard=10, progress=False)
    assert len(third.written) == 4, "changed content must not reuse old shards"


def test_shards_left_by_an_earlier_write_are_named(tmp_path, digits, caplog):
    images, labels = digits
    samples = [ShardSample(ArrayImage(images[i]), label=int(labels[i])) for i in range(30)]
    write_shards(samples, tmp_path, max_samples_per_shard=10, progress=False)
    with caplog.at_level("WARNING", logger="pretrain.data.writer"):
        write_shards(samples[:20], tmp_path, max_samples_per_shard=10, progress=False)  # a smaller plan
    assert "already holds 1 shards that this write does not replace (first shard-000002.tar)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="pretrain.data.writer"):
        summary = write_shards(samples, tmp_path, prefix="train", max_samples_per_shard=10, progress=False)
    assert "already holds 3 shards that this write does not replace (first shard-000000.tar)" in caplog.text
    assert expand_shards(str(tmp_path)) == [str(tmp_path / name) for name in summary.shards]


def test_shards_respect_the_byte_limit_and_unreadable_files_are_left_out(tmp_path, digits):
    images, _ = digits
    paths = []
    for i in range(30):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(np.kron(images[i], np.ones((8, 8), np.uint8))).save(paths[-1])  # 64x64, about 1 KB
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    samples = [ShardSample(FileImage(path), label=0) for path in [*paths, str(tmp_path / "broken.png"),
                                                                  str(tmp_path / "missing.png")]]
    summary = write_shards(samples, tmp_path / "shards", max_shard_bytes=30_000, progress=False)

    assert len(summary.shards) > 1 and summary.num_samples == 30
    for name in summary.shards:
        assert os.path.getsize(tmp_path / "shards" / name) <= 30_000
    assert sorted(os.path.basename(path) for path, _ in summary.skipped_files) == ["broken.png", "missing.png"]
    assert len(read_dataset_info(tmp_path / "shards")["skipped_files"]) == 2
    assert "0x" not in json.dumps(read_dataset_info(tmp_path / "shards")["skipped_files"])  # no object addresses
    with pytest.raises(ValueError, match=r"no readable samples .*none of the 1 images decodes \(first: .*broken"):
        write_shards(samples[30:31], tmp_path / "unreadable", progress=False)
    assert not (tmp_path / "unreadable" / "sizes.json").exists()


def test_a_rewrite_removes_sizes_json_before_touching_a_shard(tmp_path, digits, monkeypatch):
    write_digit_shards(tmp_path, digits, 20, per_shard=5)
    assert (tmp_path / "sizes.json").exists()

    def killed(task):
        raise KeyboardInterrupt  # the rewrite dies at its first shard
    monkeypatch.setattr("pretrain.data.writer._write_shard", killed)
    with pytest.raises(KeyboardInterrupt):
        write_digit_shards(tmp_path, digits, 20, per_shard=5, shuffle_seed=1)
    assert not (tmp_path / "sizes.json").exists()  # the directory no longer claims to be complete


# --- demo -----------------------------------------------------------------------------------------------------


def test_demo_from_digits(tmp_path, digits):
    images, labels = digits
    summaries = write_demo(tmp_path, source="digits", progress=False)

    assert {split: summary.num_samples for split, summary in summaries.items()} == {"train": 1397, "val": 400}
    seen = []
    for split in ("train", "val"):
        info = read_dataset_info(tmp_path / split)
        assert info["source"] == "digits" and info["class_names"] == list(DIGITS_CLASSES)
        assert info["caption_templates"] == list(DIGITS_TEMPLATES) and info["caption_source"] == "template"
        assert "generated" in info["captions_note"]
        samples = read_shards(str(tmp_path / split))
        split_labels = []
        for sample in samples.values():
            metadata = json.loads(sample["json"])
            index, label = metadata["index"], int(sample["cls"])
            assert label == labels[index] == metadata["label"]
            assert metadata["caption_source"] == "template"
            assert sample["txt"].decode() == DIGITS_TEMPLATES[metadata["template"]].format(DIGITS_CLASSES[label])
            np.testing.assert_array_equal(pixels(sample["png"]), images[index])
            split_labels.append(label)
            seen.append(index)
        if split == "val":
            assert all(abs(count - 40) <= 1 for count in Counter(split_labels).values())
    assert sorted(seen) == list(range(1797)), "train and val must partition the digits"


@pytest.mark.skipif(not HAS_FASHION_MNIST, reason="Debian package dataset-fashion-mnist is not installed")
def test_demo_from_fashion_mnist(tmp_path):
    summaries = write_demo(tmp_path, train_size=200, val_size=50, max_samples_per_shard=64, progress=False)

    assert summaries["train"].num_samples == 200 and len(summaries["train"].shards) == 4
    info = read_dataset_info(tmp_path / "val")
    assert info["source"] == "fashion-mnist" and info["class_names"] == list(FASHION_MNIST_CLASSES)
    sample = next(iter(read_shards(str(tmp_path / "val")).values()))
    assert pixels(sample["png"]).shape == (28, 28)
    assert FASHION_MNIST_CLASSES[int(sample["cls"])] in sample["txt"].decode()


def test_cli_writes_demo_and_rerun_reuses_it(tmp_path, capsys):
    arguments = ["demo", "--out", str(tmp_path), "--source", "digits", "--train-size", "100", "--val-size", "30",
                 "--max-samples-per-shard", "40", "--workers", "2", "--no-progress"]
    assert cli_main(arguments) == 0
    assert load_json(tmp_path / "train" / "sizes.json") == {
        "train-000000.tar": 40, "train-000001.tar": 40, "train-000002.tar": 20}
    assert cli_main(arguments) == 0
    assert "3 already complete" in capsys.readouterr().out
    assert cli_main(["folder", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 1
    capsys.readouterr()
    not_a_folder = tmp_path / "train" / "sizes.json"
    assert cli_main(["folder", str(not_a_folder), "--out", str(tmp_path / "x")]) == 1
    assert f"{not_a_folder}' is not a folder" in capsys.readouterr().err
    (tmp_path / "latin1.txt").write_bytes("n01 caf\xe9\n".encode("latin-1"))
    assert cli_main(["folder", str(tmp_path), "--class-names", str(tmp_path / "latin1.txt"), "--out",
                     str(tmp_path / "x")]) == 1
    assert "latin1.txt is not UTF-8 text" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main([*arguments[:-1], "--max-samples-per-shard", "0"])  # was taken as the default of 1000
    assert "--max-samples-per-shard: must be at least 1, got 0" in capsys.readouterr().err


# --- loader ---------------------------------------------------------------------------------------------------


def test_batches_have_the_shapes_each_task_needs(tmp_path, digits):
    write_digit_shards(tmp_path, digits, 20, per_shard=10)

    def tokenizer(text: str) -> torch.Tensor:
        ids = torch.zeros(1, 12, dtype=torch.long)  # open_clip-style [1, context]
        ids[0, : len(text.split())] = torch.tensor([len(word) for word in text.split()])
        return ids

    images = next(iter(build_loader(tmp_path, "mae", 4, 16, num_workers=0)))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32
    images, tokens = next(iter(build_loader(tmp_path, "clip", 4, 16, num_workers=0, tokenizer=tokenizer)))
    assert tokens.shape == (4, 12) and tokens.dtype == torch.long
    images, captions = next(iter(build_loader(tmp_path, "clip", 4, 16, num_workers=0)))
    assert all(caption.startswith("a handwritten digit") for caption in captions)
    images, labels = next(iter(build_loader(tmp_path, "eval", 4, 16, num_workers=0)))
    assert labels.dtype == torch.long and labels.shape == (4,)


def test_eval_pixels_reach_the_batch_unchanged(tmp_path, digits):
    images, labels = digits
    write_digit_shards(tmp_path, digits, 12, per_shard=5)
    loader = build_loader(tmp_path, "eval", 12, 8, num_workers=0, crop_pct=1.0, mean=(0, 0, 0), std=(1, 1, 1),
                          with_keys=True)
    batch, batch_labels, keys = next(iter(loader))
    samples = read_shards(str(tmp_path))
    for image, label, key in zip(batch, batch_labels, keys):
        index = json.loads(samples[key]["json"])["index"]
        assert label == labels[index]
        for channel in image:  # gray replicated to RGB
            torch.testing.assert_close(channel, torch.from_numpy(images[index]).float() / 255)


@pytest.mark.parametrize("task", ["mae", "clip", "eval"])
def test_uint8_batches_normalised_on_the_device_match_normalised_batches(tmp_path, digits, task):
    write_digit_shards(tmp_path, digits, 16, per_shard=8)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # open_clip's
    batches = {}
    for normalize in (True, False):
        torch.manual_seed(0)  # the same random crops and flips in the main process
        batch = next(iter(build_loader(tmp_path, task, 16, 24, num_workers=0, mean=mean, std=std, with_keys=True,
                                       normalize=normalize)))
        batches[normalize] = batch
    (reference, *_, reference_keys), (raw, *_, raw_keys) = batches[True], batches[False]
    assert raw.dtype == torch.uint8 and raw.shape == reference.shape == (16, 3, 24, 24) and raw_keys == reference_keys
    assert raw.float().std() > 10  # real digit strokes, not a constant image
    torch.testing.assert_close(DeviceNormalize(mean, std)(raw, "cpu"), reference, rtol=0, atol=1e-6)
    assert DeviceNormalize(mean, std)(raw, "cpu", torch.bfloat16).dtype == torch.bfloat16


def test_device_normalize_and_classify_reject_what_they_cannot_take(tmp_path, digits):
    write_digit_shards(tmp_path, digits, 8, per_shard=8)
    with pytest.raises(ValueError, match=r"uint8 images \[B, 3, H, W\].*float32 of shape \(2, 3, 8, 8\)"):
        DeviceNormalize()(torch.zeros(2, 3, 8, 8), "cpu")
    with pytest.raises(ValueError, match="task 'classify' always normalises"):
        build_loader(tmp_path, "classify", 8, 16, normalize=False)


def test_classify_batches_are_augmented_and_keep_their_labels(tmp_path, digits):
    images, labels = digits
    write_digit_shards(tmp_path, digits, 24, per_shard=10)
    samples = read_shards(str(tmp_path))
    loader = build_loader(tmp_path, "classify", 8, 16, num_workers=0, with_keys=True,
                          augment=dict(auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25))
    seen: dict[str, list[torch.Tensor]] = {}
    for epoch in range(2):
        loader.set_epoch(epoch)
        for batch, batch_labels, keys in loader:
            assert batch.shape == (8, 3, 16, 16) and batch_labels.dtype == torch.long
            for image, label, key in zip(batch, batch_labels, keys):
                assert label == labels[json.loads(samples[key]["json"])["index"]]
                seen.setdefault(key, []).append(image)
    assert len(seen) == 24 and all(len(views) == 2 for views in seen.values())
    # random crops, RandAugment and erasing: the two epochs' views of a digit differ (eval's are identical)
    assert sum(not torch.equal(*views) for views in seen.values()) == 24
    with pytest.raises(ValueError, match="augment options apply to task 'classify', not 'eval'"):
        build_loader(tmp_path, "eval", 8, 16, augment=dict(re_prob=0.25))


def test_two_ranks_two_workers_see_each_sample_exactly_once(tmp_path, digits):
    keys = write_digit_shards(tmp_path, digits, 103, per_shard=9)  # 12 shards, the last one short
    seen = []
    for rank in range(2):
        loader = build_loader(tmp_path, "eval", 8, 8, rank=rank, world_size=2, num_workers=2, with_keys=True)
        batches = collect(loader)
        assert len(batches) == len(loader)
        seen.append(flat(batches))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == keys


def test_training_ranks_make_equal_steps_from_disjoint_samples(tmp_path, digits):
    keys = write_digit_shards(tmp_path, digits, 103, per_shard=9)
    seen, steps = [], []
    for rank in range(2):
        loader = build_loader(tmp_path, "mae", 8, 8, rank=rank, world_size=2, num_workers=2, with_keys=True)
        batches = collect(loader)
        assert all(len(batch) == 8 for batch in batches)
        steps.append((len(batches), len(loader)))
        seen.append(flat(batches))
    assert steps == [(6, 6), (6, 6)]  # 103 // 2 // 8
    union = seen[0] + seen[1]
    assert len(set(union)) == len(union) == 96 and set(union) <= set(keys)


def test_fewer_shards_than_workers_and_ranks(tmp_path, digits):
    keys = write_digit_shards(tmp_path, digits, 30, per_shard=100)
    seen = []
    for rank in range(2):
        seen += flat(collect(build_loader(tmp_path / "shard-000000.tar", "eval", 4, 8, rank=rank, world_size=2,
                                          num_workers=2, with_keys=True)))
    assert sorted(seen) == keys


def test_empty_or_missing_shard_patterns_fail_fast(tmp_path, digits):
    pattern = str(tmp_path / "train-{000000..000003}.tar")
    with pytest.raises(FileNotFoundError, match="matches no files") as error:
        build_loader(pattern, "mae", 4, 8)
    assert pattern in str(error.value)
    with pytest.raises(FileNotFoundError, match=r"\*\.tar"):
        build_loader(str(tmp_path / "*.tar"), "mae", 4, 8)
    with pytest.raises(FileNotFoundError, match=r"sizes\.json"):
        build_loader(str(tmp_path), "mae", 4, 8)
    write_digit_shards(tmp_path, digits, 20, per_shard=10)
    with pytest.raises(FileNotFoundError, match="1 of 3 shards do not exist"):
        build_loader(str(tmp_path / "shard-{000000..000002}.tar"), "mae", 4, 8)


def write_flawed_caption_shards(tmp_path, digits) -> list[str]:
    """20 captioned PNG samples plus a truncated JPEG and a sample without caption; returns their sources."""
    images, labels = digits
    rows = ["image,caption,label"]
    for i in range(20):
        Image.fromarray(images[i]).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,a handwritten digit {labels[i]}.,{labels[i]}")
    jpeg = io.BytesIO()
    Image.fromarray(np.kron(images[20], np.ones((32, 32), np.uint8))).save(jpeg, format="JPEG", quality=95)
    (tmp_path / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    rows += [f"truncated.jpg,a handwritten digit {labels[20]}.,{labels[20]}", f"21.png,,{labels[21]}"]
    Image.fromarray(images[21]).save(tmp_path / "21.png")
    (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n")
    source = caption_file_source(tmp_path / "captions.csv")
    write_shards(source.samples, tmp_path / "shards", max_samples_per_shard=8, progress=False)
    return [json.loads(sample["json"])["path"] for sample in read_shards(str(tmp_path / "shards")).values()]


def test_corrupt_jpeg_and_missing_caption_are_skipped_and_counted(tmp_path, digits):
    assert len(write_flawed_caption_shards(tmp_path, digits)) == 22, "the writer only reads image headers"
    loader = build_loader(tmp_path / "shards", "clip", 4, 8, num_workers=2, max_bad_fraction=0.2, with_keys=True,
                          drop_last=False)
    delivered = flat(collect(loader))

    assert len(delivered) == 20 and loader.bad_sample_count == 2 and loader.stats()["bad_samples"] == 2
    reasons = {record.key: record.reason for record in loader.bad_samples}
    samples = read_shards(str(tmp_path / "shards"))
    by_path = {json.loads(sample["json"])["path"]: key for key, sample in samples.items()}
    assert "truncated" in reasons[by_path["truncated.jpg"]]
    assert reasons[by_path["21.png"]] == "missing txt"
    assert all(record.shard.endswith(".tar") and os.path.exists(record.shard) for record in loader.bad_samples)
    assert not {by_path["truncated.jpg"], by_path["21.png"]} & set(delivered)

    strict = build_loader(tmp_path / "shards", "clip", 4, 8, num_workers=0, max_bad_fraction=0.0)
    with pytest.raises(BadDataError, match=r"shard .*shard-00000\d\.tar key \d{6}"):
        list(strict)


def test_training_replaces_bad_samples_to_keep_the_step_count(tmp_path, digits):
    write_flawed_caption_shards(tmp_path, digits)
    loader = build_loader(tmp_path / "shards", "clip", 2, 8, num_workers=2, max_bad_fraction=0.3, with_keys=True)
    batches = collect(loader)
    assert len(batches) == len(loader) == 11 and all(len(batch) == 2 for batch in batches)
    assert loader.bad_sample_count >= 2 and len(set(flat(batches))) == 20


def test_endless_stream_of_bad_samples_stops_instead_of_hanging(tmp_path, digits):
    images, labels = digits
    uncaptioned = [ShardSample(ArrayImage(images[i]), label=int(labels[i])) for i in range(20)]
    write_shards(uncaptioned, tmp_path, max_samples_per_shard=5, progress=False)
    # In-process: a DataLoader takes seconds to shut its workers down after an error.
    loader = build_loader(tmp_path, "clip", 4, 8, num_workers=0, resampled=True, max_bad_fraction=0.5)
    with pytest.raises(BadDataError, match=r"a worker of rank 0 met 11 bad samples.*missing txt"):
        next(iter(loader))


def test_unlabelled_shards_say_so_when_a_task_needs_labels(tmp_path, digits):
    images, _ = digits
    write_shards([ShardSample(ArrayImage(images[i])) for i in range(8)], tmp_path, progress=False)
    loader = build_loader(tmp_path, "eval", 4, 8, num_workers=0)
    with pytest.raises(BadDataError, match=r"missing cls \(an unlabelled sample: this task needs labelled shards\)"):
        next(iter(loader))


def test_truncated_shard_counts_its_lost_samples(tmp_path, digits):
    write_digit_shards(tmp_path, digits, 30, per_shard=10)
    shard = tmp_path / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:12_000])
    loader = build_loader(tmp_path, "eval", 5, 8, num_workers=0, max_bad_fraction=0.5, with_keys=True)
    delivered = flat(collect(loader))
    lost = [record for record in loader.bad_samples if record.key is None]
    assert len(lost) == 1 and lost[0].shard == str(shard)
    assert len(delivered) + loader.bad_sample_count == 30 and loader.bad_sample_count >= 7


# --- resume ---------------------------------------------------------------------------------------------------


def interrupted_epoch(make_loader, stop_after: int) -> tuple[list[list[str]], list[list[str]], dict]:
    """Batches before a checkpoint at ``stop_after`` batches, and those of a fresh loader resumed from it."""
    first = make_loader()
    before = []
    for batch in first:
        before.append(list(batch[-1]))
        if len(before) == stop_after:
            state = json.loads(json.dumps(first.state_dict()))  # must survive any checkpoint format
            break
    resumed = make_loader()
    resumed.load_state_dict(state)
    return before, collect(resumed), state


def test_resume_without_shuffle_buffer_continues_exactly(tmp_path, digits):
    write_digit_shards(tmp_path, digits, 120, per_shard=10)

    def make_loader():
        return build_loader(tmp_path, "mae", 4, 8, num_workers=2, shuffle_buffer=0, seed=3, with_keys=True)

    reference = collect(make_loader())
    before, after, state = interrupted_epoch(make_loader, stop_after=7)
    assert state["epoch"] == 0 and state["batches_done"] == 7
    assert before + after == reference


def test_resume_repeats_and_skips_at_most_one_shuffle_buffer_per_worker(tmp_path, digits):
    keys = write_digit_shards(tmp_path, digits, 120, per_shard=10)
    buffer, workers = 8, 2

    def make_loader():
        return build_loader(tmp_path, "mae", 4, 8, num_workers=workers, shuffle_buffer=buffer, with_keys=True)

    for stop_after in (1, 7, 20):
        before, after, _ = interrupted_epoch(make_loader, stop_after)
        assert len(before) + len(after) == len(make_loader()) == 30
        repeated = set(flat(before)) & set(flat(after))
        missed = set(keys) - set(flat(before)) - set(flat(after))
        assert len(repeated) == len(missed) <= workers * buffer
        assert len(set(flat(after))) == len(flat(after))


def test_resampled_resume_continues_the_same_stream(tmp_path, digits):
    write_digit_shards(tmp_path, digits, 60, per_shard=10)

    def make_loader():
        return build_loader(tmp_path, "mae", 4, 8, num_workers=2, resampled=True, samples_per_epoch=48,
                            shuffle_buffer=0, with_keys=True)

    reference = collect(make_loader())
    assert len(reference) == 12
    before, after, _ = interrupted_epoch(make_loader, stop_after=5)
    assert before + after == reference


def test_wait_fraction_follows_the_recent_batches_and_wait_seconds_add_up(tmp_path, digits):
    write_digit_shards(tmp_path, digits, 120, per_shard=40)
    loader = build_loader(tmp_path, "eval", 2, 8, num_workers=0)
    fast_transform = loader.config.transform

    def slow_transform(image):
        time.sleep(0.01)
        return fast_transform(image)

    # Epoch 0: a slow input pipeline and a training loop that takes no time, so the loop only waits.
    loader.config = dataclasses.replace(loader.config, transform=slow_transform)
    collect(loader)
    slow = loader.stats()
    assert slow["data_wait_fraction"] > 0.9 and slow["data_wait_seconds"] >= 120 * 0.01
    # Epoch 1: a fast pipeline and a loop that takes 30 ms per batch. A share taken since the start would still be
    # about half (about 1.6 s of waiting in 3.4 s); over the last 50 batches it is small (about 0.1; with 10 ms per
    # batch it once reached 0.30 on a 2-core CI machine, hence the longer step).
    loader.config = dataclasses.replace(loader.config, transform=fast_transform)
    for _ in loader:
        time.sleep(0.03)
    fast = loader.stats()
    assert fast["data_wait_fraction"] < 0.3
    assert fast["data_wait_seconds"] > slow["data_wait_seconds"]


def test_the_next_epochs_workers_start_early_and_deliver_the_same_batches(tmp_path, digits):
    write_digit_shards(tmp_path, digits, 60, per_shard=10)

    def make_loader(early: bool):
        return build_loader(tmp_path, "mae", 4, 8, num_workers=2, shuffle_buffer=8, seed=1, with_keys=True,
                            start_next_epoch_early=early)

    def images_and_keys(loader):
        return [(images, list(keys)) for images, keys in loader]

    def same(epoch, reference):  # augmented pixels too: they depend on the workers' seeds
        return len(epoch) == len(reference) and all(
            torch.equal(images, ref_images) and keys == ref_keys
            for (images, keys), (ref_images, ref_keys) in zip(epoch, reference))

    plain = make_loader(False)
    reference = [images_and_keys(plain), images_and_keys(plain)]
    loader = make_loader(True)
    steps = len(loader)
    started_ahead = []  # after each batch of epoch 0: which epoch's workers run ahead
    epoch_0 = []
    for images, keys in loader:
        epoch_0.append((images, list(keys)))
        started_ahead.append(loader._started_ahead and loader._started_ahead[0])
    # started when batch steps - num_workers + 1 is asked for, while the workers deliver their last batches
    assert started_ahead == [None] * (steps - 2) + [1, 1]
    workers = getattr(loader._started_ahead[1], "_workers", [])  # running before the epoch's first batch is asked for
    assert len(workers) == 2 and all(worker.is_alive() for worker in workers)
    assert same(epoch_0, reference[0]) and same(images_and_keys(loader), reference[1])

    part = []  # leaving epoch 2 after its early start of epoch 3 and coming back keeps the started epoch
    for batch in loader:
        part.append(batch)
        if len(part) == steps - 1:
            break
    started = loader._started_ahead
    assert started[0] == 3 and len(part) + len(collect(loader)) == steps and loader._started_ahead is started

    loader.set_epoch(5)  # a jump discards the epoch started ahead
    assert loader._started_ahead is None
    plain.set_epoch(5)
    assert same(images_and_keys(loader), images_and_keys(plain))


def test_epochs_advance_and_reshuffle_and_state_checks_the_layout(tmp_path, digits):
    write_digit_shards(tmp_path, digits, 40, per_shard=10)
    loader = build_loader(tmp_path, "mae", 4, 8, num_workers=0, with_keys=True)
    first, second = flat(collect(loader)), flat(collect(loader))
    assert loader.epoch == 2 and sorted(first) == sorted(second) and first != second
    assert loader.stats()["samples_per_second"] > 0

    other = build_loader(tmp_path, "mae", 8, 8, num_workers=0)
    with pytest.raises(ValueError, match="batch_size saved 4, now 8"):
        other.load_state_dict(loader.state_dict())
    other.load_state_dict(loader.state_dict(), strict=False)
    assert other.epoch == 2
    other.strict_resume = False  # what train.resume_data=continue sets; accelerate passes no strict argument
    other.load_state_dict(loader.state_dict())


def test_a_samples_augmentation_depends_on_the_sample_not_the_worker(tmp_path, digits):
    write_digit_shards(tmp_path, digits, 48, per_shard=8)

    def augmented(workers: int) -> list[dict[str, torch.Tensor]]:
        loader = build_loader(tmp_path, "mae", 4, 8, num_workers=workers, shuffle_buffer=0, seed=3, with_keys=True)
        return [{key: image for images, keys in loader for key, image in zip(keys, images)} for _ in range(2)]

    one, two = augmented(1), augmented(2)
    assert len(one[0]) == 48 and one[0].keys() == two[0].keys()
    for epoch in range(2):
        assert all(torch.equal(one[epoch][key], two[epoch][key]) for key in one[0])
    # the crops are random: another epoch crops the same sample differently
    assert sum(not torch.equal(one[0][key], one[1][key]) for key in one[0]) > 40


def test_sigterm_to_the_process_group_leaves_the_workers_running(tmp_path, digits):
    # Slurm signals every process of the job; the trainer's main process must outlive its workers' share of it.
    write_digit_shards(tmp_path, digits, 48, per_shard=8)
    loader = build_loader(tmp_path, "mae", 4, 8, num_workers=2, shuffle_buffer=0, start_next_epoch_early=False)
    batches = iter(loader)
    next(batches)
    workers = multiprocessing.active_children()
    assert len(workers) == 2
    for worker in workers:
        os.kill(worker.pid, signal.SIGTERM)
    time.sleep(0.5)
    assert all(worker.is_alive() for worker in workers)
    assert sum(1 for _ in batches) == len(loader) - 1


def test_a_shard_longer_than_its_sizes_entry_is_named(tmp_path, digits, caplog):
    write_digit_shards(tmp_path, digits, 20, per_shard=10)
    sizes = load_json(tmp_path / "sizes.json")
    first = sorted(sizes)[0]
    (tmp_path / "sizes.json").write_text(json.dumps({**sizes, first: 6}))
    loader = build_loader(tmp_path, "eval", 4, 8, num_workers=0, resampled=False)
    with caplog.at_level("WARNING", logger="pretrain.data.stream"):
        assert sum(len(labels) for _, labels in loader) == 16
    assert f"{first} holds more samples than its sizes.json entry (6)" in caplog.text
