"""Tests of zero-shot classification (eval/zeroshot.py) on real images (scikit-learn digits shards), CPU only."""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import vig  # noqa: F401  (registers vig_tiny with timm)
from eval.zeroshot import (
    PROMPTS_DIR,
    build_classifier,
    evaluate,
    load_class_names,
    load_templates,
    main,
    warn_if_other_than_recorded,
    zero_shot,
)
from pretrain.data import (
    ArrayImage,
    ShardSample,
    build_loader,
    write_demo,
    write_shards,
)
from pretrain.data.demo import DIGITS_CLASSES, DIGITS_TEMPLATES, FASHION_MNIST_TEMPLATES

pytest.importorskip("sklearn.datasets")

ROOT = Path(__file__).resolve().parents[1]
VAL_SIZE = 45  # two ranks get 22 and 23 samples: with batches of 11, 2 and 3 batches
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"timm_model_name": "vig_tiny", "timm_model_pretrained": False, "timm_pool": "avg",
                   "timm_proj": "linear", "image_size": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors on a shared 2-core machine: a second intra-op thread only adds contention (10-1000x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """Digits demo shards: train (200) and val (45), several shards each, with dataset.json."""
    root = tmp_path_factory.mktemp("digits")
    write_demo(root, source="digits", train_size=200, val_size=VAL_SIZE, max_samples_per_shard=20, progress=False)
    return root


def tiny_clip(seed: int = 0) -> open_clip.CLIP:
    torch.manual_seed(seed)
    return open_clip.CLIP(**TINY_CFG)


def all_images(shards, image_size: int, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image and label of ``shards`` in one batch (the evaluation transform, no shuffling)."""
    loader = build_loader(shards, "eval", 10_000, image_size, num_workers=0, **options)
    (images, labels), = list(loader)
    return images, labels


# ------------------------------------------------------------------------------------------------ an oracle model

class OracleCLIP(nn.Module):
    """Image feature: the centred 8x8 gray image. Text feature of a prompt: the centred mean training image of the
    digit whose token the prompt contains. Zero-shot classification is then nearest-class-mean classification,
    correct for ~78 % of these digits (chance: 10 %), but only if class names, templates and labels line up."""

    def __init__(self, prototypes: torch.Tensor, centre: torch.Tensor, tokenizer: open_clip.SimpleTokenizer):
        super().__init__()
        self.register_buffer("prototypes", prototypes - centre)
        self.register_buffer("centre", centre)
        (ids,) = zip(*(tokenizer.encode(str(digit)) for digit in range(10)))  # one BPE token per digit
        self.register_buffer("digit_ids", torch.tensor(ids))
        self.preprocess_cfg = {"size": 8, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
        self.image_calls = 0

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        self.image_calls += 1
        features = images[:, 0].flatten(1) - self.centre
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        present = (tokens[:, :, None] == self.digit_ids).any(dim=1)
        assert (present.sum(dim=1) == 1).all(), "every prompt names exactly one digit"
        features = present.float() @ self.prototypes
        return F.normalize(features, dim=-1) if normalize else features


def oracle(train_shards) -> OracleCLIP:
    images, labels = all_images(train_shards, 8, crop_pct=1.0, mean=(0, 0, 0), std=(1, 1, 1))
    gray = images[:, 0].flatten(1)
    prototypes = torch.stack([gray[labels == digit].mean(dim=0) for digit in range(10)])
    return OracleCLIP(prototypes, gray.mean(dim=0), open_clip.SimpleTokenizer())


def nearest_class_mean_top1(model: OracleCLIP, val_shards) -> float:
    """The oracle's accuracy computed directly, without any zero-shot machinery."""
    images, labels = all_images(val_shards, 8, crop_pct=1.0, mean=(0, 0, 0), std=(1, 1, 1))
    features = F.normalize(images[:, 0].flatten(1) - model.centre, dim=-1)
    predictions = (features @ F.normalize(model.prototypes, dim=-1).T).argmax(dim=1)
    return 100 * (predictions == labels).float().mean().item()


def test_oracle_is_accurate_and_shuffled_class_names_are_not(demo, caplog):
    model = oracle(demo / "train")
    tokenizer = open_clip.SimpleTokenizer()
    expected = nearest_class_mean_top1(model, demo / "val")
    with caplog.at_level(logging.WARNING, logger="eval.zeroshot"):
        result = zero_shot(model, tokenizer, demo / "val", templates="digits_heldout", batch_size=16, num_workers=0)
    assert result["samples"] == VAL_SIZE and result["classes"] == 10 and result["templates"] == 6
    assert result["top1"] == pytest.approx(expected)
    assert result["top1"] > 70 and result["top5"] >= result["top1"]
    assert result["overlapping_templates"] == [] and caplog.text == ""

    rolled = [DIGITS_CLASSES[(index + 1) % 10] for index in range(10)]  # every name on the wrong label
    with caplog.at_level(logging.WARNING, logger="eval.zeroshot"):
        shuffled = zero_shot(model, tokenizer, demo / "val", class_names=rolled, templates="digits_heldout",
                             batch_size=16, num_workers=0)
    assert shuffled["top1"] < 20
    assert "10 of the 10 class names differ" in caplog.text
    assert f"label 0 is {DIGITS_CLASSES[0]!r} there, {DIGITS_CLASSES[1]!r} here" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="eval.zeroshot"):
        warn_if_other_than_recorded([*DIGITS_CLASSES, "ten"], demo / "val")
    assert "11 class names for shards whose dataset.json" in caplog.text and "records 10 classes" in caplog.text


def test_dataset_templates_are_flagged_as_overlapping(demo, caplog):
    model = oracle(demo / "train")
    with caplog.at_level(logging.WARNING, logger="eval.zeroshot"):
        result = zero_shot(model, open_clip.SimpleTokenizer(), demo / "val", templates="dataset", batch_size=64,
                           num_workers=0)
    assert result["overlapping_templates"] == list(DIGITS_TEMPLATES)
    assert "memorisation" in caplog.text and all(template in caplog.text for template in DIGITS_TEMPLATES)
    caplog.clear()
    mixed = ["a picture of the number {}.", DIGITS_TEMPLATES[2]]
    with caplog.at_level(logging.WARNING, logger="eval.zeroshot"):
        result = zero_shot(model, open_clip.SimpleTokenizer(), demo / "val", templates=mixed, batch_size=64,
                           num_workers=0)
    assert result["overlapping_templates"] == [DIGITS_TEMPLATES[2]]
    assert DIGITS_TEMPLATES[2] in caplog.text and "a picture of the number" not in caplog.text


# ------------------------------------------------------------------------------------------------ a real open_clip model

def test_classifier_equals_manual_computation_and_modes_are_restored():
    model = tiny_clip()
    tokenizer = open_clip.SimpleTokenizer(context_length=16)
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven"]
    templates = ["a picture of the number {}.", "an image of a handwritten {}.", "the numeral {} drawn with a pen."]
    model.train()
    model.visual.eval()  # a locked tower kept in eval mode must stay so
    classifier = build_classifier(model, tokenizer, names, templates, "cpu")
    assert model.training and not model.visual.training
    assert all(module.training for module in model.transformer.modules())
    assert classifier.shape == (32, 12) and not classifier.requires_grad

    model.eval()
    with torch.no_grad():
        expected = []
        for name in names:
            embeddings = F.normalize(model.encode_text(tokenizer([t.format(name) for t in templates])), dim=-1)
            expected.append(F.normalize(embeddings.mean(dim=0), dim=0))
    torch.testing.assert_close(classifier, torch.stack(expected, dim=1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(classifier.norm(dim=0), torch.ones(12))


def test_evaluate_equals_manual_top1_top5_with_a_partial_last_batch(demo):
    model = tiny_clip(seed=1)
    tokenizer = open_clip.SimpleTokenizer(context_length=16)
    classifier = build_classifier(model, tokenizer, list(DIGITS_CLASSES), load_templates("simple"), "cpu")
    options = {"crop_pct": 1.0, "mean": open_clip.OPENAI_DATASET_MEAN, "std": open_clip.OPENAI_DATASET_STD}
    model.train()
    loader = build_loader(demo / "val", "eval", 16, 32, num_workers=0, **options)  # 16 + 16 + 13
    result = evaluate(model, classifier, loader, "cpu")
    assert model.training

    images, labels = all_images(demo / "val", 32, **options)
    model.eval()
    with torch.no_grad():
        logits = 100 * F.normalize(model.encode_image(images), dim=-1) @ classifier
    top5 = logits.topk(5, dim=1).indices
    assert result["samples"] == VAL_SIZE == len(labels)
    assert result["top1"] == pytest.approx(100 * (top5[:, 0] == labels).sum().item() / VAL_SIZE)
    assert result["top5"] == pytest.approx(100 * (top5 == labels[:, None]).any(1).sum().item() / VAL_SIZE)


class FlatModel(nn.Module):
    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return F.normalize(images, dim=-1) if normalize else images


def test_fewer_than_five_classes_and_labels_outside_the_classes():
    torch.manual_seed(0)
    features = torch.randn(20, 3)
    labels = torch.randint(0, 3, (20,))
    batches = [(features[:7], labels[:7]), (features[7:], labels[7:])]
    result = evaluate(FlatModel(), torch.eye(3), batches, "cpu")
    assert result["top5"] == 100.0  # top-min(5, C) = top-3 of 3 classes
    assert result["top1"] == pytest.approx(100 * (features.argmax(1) == labels).float().mean().item())
    with pytest.raises(ValueError, match="label 3 is outside the 3 classes"):
        evaluate(FlatModel(), torch.eye(3), [(features[:2], torch.tensor([0, 3]))], "cpu")


# ------------------------------------------------------------------------------------------------ class names and templates

def test_builtin_class_names_and_templates(demo):
    assert len(load_class_names("imagenet")) == 1000 and load_class_names("imagenet")[0] == "tench"
    assert load_class_names(None, demo / "val") == list(DIGITS_CLASSES)
    openai = load_templates("openai")
    assert len(openai) == 80 and "a photo of a {}." in openai and all(t.count("{}") == 1 for t in openai)
    assert load_templates("simple")[0] == "itap of a {}." and len(load_templates("simple")) == 7
    assert load_templates("dataset", demo / "val") == list(DIGITS_TEMPLATES)


def test_class_name_files_and_their_errors(tmp_path, demo):
    names = tmp_path / "names.txt"
    names.write_text("\ufeffT-shirt/top\n\n  Ankle boot  \nBag\n")  # with the BOM spreadsheet programs write
    assert load_class_names(names) == ["T-shirt/top", "Ankle boot", "Bag"]
    names.write_text("cat\ndog\n\ncat\n")
    with pytest.raises(ValueError, match=rf"{names} line 4: 'cat' repeats line 1"):
        load_class_names(names)
    names.write_text("\n \n")
    with pytest.raises(ValueError, match=rf"{names} holds no class names"):
        load_class_names(names)
    with pytest.raises(FileNotFoundError, match="missing.txt not found"):
        load_class_names(tmp_path / "missing.txt")

    unnamed = tmp_path / "unnamed"
    samples = [ShardSample(ArrayImage(np.zeros((8, 8), np.uint8)), label=0) for _ in range(3)]
    write_shards(samples, unnamed, dataset_info={"source": "test"}, progress=False)
    with pytest.raises(ValueError, match=rf"shards in {unnamed} records no class_names"):
        load_class_names(None, unnamed)
    repeated = tmp_path / "repeated"  # ImageNet's synset names repeat "crane"
    write_shards(samples, repeated, dataset_info={"class_names": ["crane", "crane"]}, progress=False)
    with pytest.raises(ValueError, match=r"'crane' at index 1 repeats index 0, .*--class-names imagenet"):
        load_class_names(None, repeated)


def test_template_files_and_their_errors(tmp_path):
    templates = tmp_path / "templates.txt"
    templates.write_text("a picture of a {c}.\n\nan image of the {}.\n")
    assert load_templates(templates) == ["a picture of a {}.", "an image of the {}."]
    for text, line in [("a {}.\na photo.\n", 2), ("ok {}\n\n{} and {}\n", 3), ("a {x} thing {}\n", 1),
                       ("a {} }\n", 1)]:
        templates.write_text(text)
        with pytest.raises(ValueError, match=rf"template file {templates} line {line}: a template needs exactly one"):
            load_templates(templates)
    templates.write_text("a {}.\nb {}.\na {c}.\n")
    with pytest.raises(ValueError, match=rf"{templates} line 3: 'a {{}}.' repeats line 1"):
        load_templates(templates)
    templates.write_text("\n")
    with pytest.raises(ValueError, match="holds no templates"):
        load_templates(templates)
    with pytest.raises(FileNotFoundError, match="nope.txt not found; built-in template sets: openai, simple"):
        load_templates(tmp_path / "nope.txt")


def test_bundled_heldout_prompts_avoid_the_training_templates():
    fashion = load_templates("fashion_mnist_heldout")
    assert 6 <= len(fashion) <= 8 and not set(fashion) & set(FASHION_MNIST_TEMPLATES)
    assert load_templates(PROMPTS_DIR / "fashion_mnist_heldout.txt") == fashion
    digits = load_templates("digits_heldout")
    assert 6 <= len(digits) <= 8 and not set(digits) & set(DIGITS_TEMPLATES)
    assert not any(character.isdigit() for template in digits for character in template)  # the oracle needs this


def test_bundled_prompts_are_package_data():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["eval"]
    for path in PROMPTS_DIR.glob("*.txt"):
        assert any(fnmatch.fnmatch(path.relative_to(ROOT / "eval").as_posix(), pattern) for pattern in patterns)


# ------------------------------------------------------------------------------------------------ command line

@pytest.fixture
def registered_config(tmp_path):
    """A tiny ViG-T CLIP config registered with open_clip under a test name, removed again afterwards."""
    name = "ZeroShotTest-vig_tiny-32"
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(path)
    yield name
    open_clip.factory._MODEL_CONFIG_PATHS.remove(path)
    open_clip.factory._MODEL_CONFIGS.pop(name, None)


def test_cli_end_to_end_with_a_config_name_and_a_local_dir(tmp_path, demo, registered_config, capsys):
    model = open_clip.create_model(registered_config)
    weights = tmp_path / "weights.safetensors"
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, weights)
    expected = zero_shot(model, open_clip.get_tokenizer(registered_config), demo / "val", templates="simple",
                         batch_size=64, num_workers=0)

    output = tmp_path / "out" / "zeroshot.json"
    result = main(["--model", registered_config, "--pretrained", str(weights), "--shards", str(demo / "val"),
                   "--templates", "simple", "--batch-size", "20", "--workers", "1", "--device", "cpu",
                   "--output", str(output)])
    assert json.loads(output.read_text()) == result
    assert result["top1"] == pytest.approx(expected["top1"]) and result["top5"] == pytest.approx(expected["top5"])
    assert result["image_size"] == 32 and result["samples"] == VAL_SIZE and result["templates"] == 7
    assert "zero-shot top-1" in capsys.readouterr().out

    exported = tmp_path / "exported"
    exported.mkdir()
    preprocess = {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}
    (exported / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG, "preprocess_cfg": preprocess}))
    os.link(weights, exported / "open_clip_model.safetensors")
    local = main(["--model", f"local-dir:{exported}", "--shards", str(demo / "val"), "--templates", "simple",
                  "--batch-size", "64", "--workers", "0", "--device", "cpu"])
    assert local["top1"] == pytest.approx(expected["top1"]) and local["top5"] == pytest.approx(expected["top5"])


def test_cli_errors_name_the_problem(tmp_path, demo, registered_config):
    val = str(demo / "val")
    with pytest.raises(ValueError, match=rf"unknown open_clip model 'ViG-Q-99'; ViG/Vim configs: .*{registered_config}"):
        main(["--model", "ViG-Q-99", "--shards", val, "--device", "cpu"])
    with pytest.raises(FileNotFoundError, match="matches no files"):
        main(["--model", registered_config, "--shards", str(tmp_path / "val-{000000..000003}.tar"), "--device", "cpu"])
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a {}.\na photo\n")
    with pytest.raises(ValueError, match=rf"{bad} line 2"):
        main(["--model", registered_config, "--shards", val, "--templates", str(bad), "--device", "cpu"])
    with pytest.raises(FileNotFoundError, match="neither a file nor a pretrained tag"):
        main(["--model", registered_config, "--pretrained", str(tmp_path / "none.safetensors"), "--shards", val,
              "--device", "cpu"])
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG}))
        main(["--model", f"local-dir:{tmp_path / 'empty'}", "--shards", val, "--device", "cpu"])


def test_tools_end_bad_input_with_an_error_line_instead_of_a_traceback(tmp_path):
    cases = [("eval.zeroshot", ["--model", "ViG-T-16", "--shards", str(tmp_path / "val-{000000..000003}.tar")],
              "matches no files"),
             ("eval.linear_probe", ["--encoder", str(tmp_path), "--train-shards", "a", "--val-shards", "b"],
              f"{tmp_path / 'config.json'} not found")]
    for module, arguments, message in cases:
        done = subprocess.run([sys.executable, "-m", module, *arguments], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 1 and "Traceback" not in done.stderr, (module, done.stderr)
        assert done.stderr.startswith("error: ") and message in done.stderr, (module, done.stderr)


# ------------------------------------------------------------------------------------------------ two ranks

def _rank_worker(rank: int, world_size: int, init_file: str, model: OracleCLIP, val: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model.image_calls = 0
        with pytest.raises(ValueError, match="world_size=1 but 2 process"):  # every rank reading everything
            zero_shot(model, open_clip.SimpleTokenizer(), val, templates="digits_heldout", num_workers=0)
        result = zero_shot(model, open_clip.SimpleTokenizer(), val, templates="digits_heldout", batch_size=11,
                           num_workers=0, rank=rank, world_size=world_size)
        result["image_calls"] = model.image_calls
        Path(out_dir, f"{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_two_ranks_return_the_global_figures_and_make_equal_forwards(tmp_path, demo, monkeypatch):
    model = oracle(demo / "train")
    single = zero_shot(model, open_clip.SimpleTokenizer(), demo / "val", templates="digits_heldout",
                       batch_size=11, num_workers=0)
    assert model.image_calls == 5
    with pytest.raises(ValueError, match="world_size=2 but 1 process"):  # the other half would be missing
        zero_shot(model, open_clip.SimpleTokenizer(), demo / "val", templates="digits_heldout", world_size=2)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the spawned ranks start with one intra-op thread
    torch.multiprocessing.spawn(_rank_worker, nprocs=2,
                                args=(2, str(tmp_path / "init"), model, str(demo / "val"), str(tmp_path)))
    results = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    for result in results:
        assert result["samples"] == VAL_SIZE
        assert result["top1"] == pytest.approx(single["top1"]) and result["top5"] == pytest.approx(single["top5"])
        assert result["image_calls"] == 3  # 22 samples are 2 batches of 11: one dummy forward evens them out
