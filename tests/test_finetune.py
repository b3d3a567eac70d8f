"""Fine-tuning for classification end to end on digits shards: layer decay, training, evaluation, resume, export."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from two_processes import run_two_processes

import vig  # noqa: F401  (registers the architectures with timm)
from eval import finetune
from eval.accuracy import eval_mode, topk_accuracy
from pretrain.data import build_loader, write_demo
from pretrain.export import export_timm
from pretrain.optim import param_groups
from pretrain.tracking import Tracker

ROOT = Path(__file__).resolve().parents[1]
DEMO_RECIPE = ROOT / "recipes" / "demo_finetune_vig_t.yaml"


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    write_demo(out, source="digits", train_size=384, val_size=192, progress=False)
    return out


def overrides(data: Path, run: Path, **extra) -> list[str]:
    values = {"model.encoder": "vig_tiny", "model.img_size": 32, "data.train_shards": str(data / "train"),
              "data.val_shards": str(data / "val"), "data.num_workers": 0, "data.shuffle_buffer": 0,
              "optim.batch_size": 32, "optim.lr": 1e-3, "optim.epochs": 6, "optim.warmup_epochs": 1,
              "train.output_dir": str(run), "train.log_every": 4, "train.checkpoint_every": 4, **extra}
    return [f"{key}={value}" for key, value in values.items()]


def evaluate_export(run: Path, val_shards: Path, batch_size: int) -> dict:
    """Top-k accuracy of the exported classifier of ``run``, loaded through timm, in one process."""
    exported = timm.create_model("vig_tiny", num_classes=10, img_size=32,
                                 checkpoint_path=str(run / "model" / "model.safetensors"))
    cfg = exported.pretrained_cfg
    loader = build_loader(val_shards, "eval", batch_size, 32, num_workers=0, mean=cfg["mean"], std=cfg["std"],
                          crop_pct=cfg["crop_pct"])
    with eval_mode(exported):
        return topk_accuracy(exported, loader, 10, "cpu")


def test_layer_decay_scales_each_block_below_the_head():
    model = timm.create_model("vig_tiny", num_classes=10)
    groups = param_groups(model, 0.05, layer_decay=0.5)
    scale_of = {name: group["lr_scale"] for group in groups for name, parameter in model.named_parameters()
                if any(parameter is member for member in group["params"])}
    decay_of = {name: group["weight_decay"] for group in groups for name, parameter in model.named_parameters()
                if any(parameter is member for member in group["params"])}
    depth = len(model.blocks)
    assert scale_of["head.weight"] == 1.0
    assert scale_of["patch_embed.proj.0.weight"] == 0.5 ** (depth + 1)
    for index in range(depth):
        block = {scale for name, scale in scale_of.items() if name.startswith(f"blocks.{index}.")}
        assert block == {0.5 ** (depth - index)}, index
    assert decay_of["head.weight"] == 0.05 and decay_of["head.bias"] == 0.0 and decay_of["pos_embed"] == 0.0
    assert len(scale_of) == sum(1 for _ in model.parameters())


def test_exported_tower_initialises_the_classifier_under_a_new_head(tmp_path):
    torch.manual_seed(0)
    tower = timm.create_model("vig_tiny", num_classes=0, img_size=32)
    folder = export_timm(tower.state_dict(), "vig_tiny", tmp_path / "encoder", img_size=32)
    model = finetune.create_classifier(str(folder), 7, None, drop_path_rate=0.1)
    assert finetune.input_size(model) == 32 and model.head.weight.shape == (7, 192)
    for name, value in tower.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0, msg=name)
    assert finetune.input_size(finetune.create_classifier(str(folder), 7, 48, 0.0)) == 48
    with pytest.raises(FileNotFoundError, match="neither an exported tower folder nor a registered"):
        finetune.create_classifier(str(tmp_path / "missing"), 7, None, 0.0)


def test_finetuning_learns_digits_and_exports_a_timm_classifier(digits, tmp_path):
    result = finetune.main([str(DEMO_RECIPE), *overrides(digits, tmp_path, **{"train.eval_every": 3})])
    assert result["samples"] == 192 and result["top1"] > 50.0  # ten classes: chance is 10 %
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [36, 72] and metrics[-1] == result

    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["num_classes"] == 10 and config["label_names"] == [str(digit) for digit in range(10)]
    again = evaluate_export(tmp_path, digits / "val", 64)
    assert again["top1"] == pytest.approx(result["top1"]) and again["samples"] == 192


def test_resumed_finetuning_matches_an_uninterrupted_one(digits, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    finetune.main([str(DEMO_RECIPE), *overrides(digits, straight, **{"train.max_steps": 8})])
    finetune.main([str(DEMO_RECIPE), *overrides(digits, resumed, **{"train.max_steps": 4})])
    finetune.main([str(DEMO_RECIPE), *overrides(digits, resumed, **{"train.max_steps": 8})])
    # Model, optimizer, scheduler, RNG (augmentation included) and data position came back: identical weights.
    expected = load_file(str(straight / "model" / "model.safetensors"))
    for key, value in load_file(str(resumed / "model" / "model.safetensors")).items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)
    # Exporting the last checkpoint later gives the same classifier as the export at the end of the run, from the
    # run's saved recipe (which records the class count), with the shards gone and another loader layout.
    finetune.main([str(straight / "recipe.yaml"), f"data.train_shards={tmp_path / 'moved'}", "data.num_workers=3",
                   "--export-from", str(straight / "checkpoints" / "step_00000008"), "--export-to",
                   str(tmp_path / "later")])
    for key, value in load_file(str(tmp_path / "later" / "model.safetensors")).items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)
    later = json.loads((tmp_path / "later" / "config.json").read_text())
    assert later["num_classes"] == 10 and "label_names" not in later  # the names were in the moved shards' folder


def test_sigterm_saves_a_checkpoint_and_exits_unfinished(digits, tmp_path, monkeypatch):
    log = Tracker.log

    def log_then_signal(self, scalars, step):
        log(self, scalars, step)
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Tracker, "log", log_then_signal)
    with pytest.raises(SystemExit) as exited:
        finetune.main([str(DEMO_RECIPE), *overrides(digits, tmp_path, **{"train.max_steps": 8,
                                                                          "train.checkpoint_every": 3})])
    assert exited.value.code == 128 + signal.SIGTERM
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000003", "step_00000004"]
    assert not (tmp_path / "model").exists()


def test_mixup_with_timm_augmentation_trains(digits, tmp_path):
    augment = {"augment.auto_augment": "rand-m9-mstd0.5-inc1", "augment.re_prob": 0.25, "augment.mixup": 0.8,
               "augment.cutmix": 1.0, "train.max_steps": 3}
    assert finetune.main([str(DEMO_RECIPE), *overrides(digits, tmp_path, **augment)])["samples"] == 192


def test_bad_settings_fail_before_training_naming_the_problem(digits, tmp_path):
    with pytest.raises(ValueError, match=r"label \d+ in .*train is outside the model's 5 classes"):
        finetune.main([str(DEMO_RECIPE), *overrides(digits, tmp_path / "labels", **{"model.num_classes": 5})])
    with pytest.raises(ValueError, match="optim.batch_size must be even, not 31"):
        finetune.main([str(DEMO_RECIPE), *overrides(digits, tmp_path / "odd", **{"augment.mixup": 0.8,
                                                                               "optim.batch_size": 31})])
    assert not (tmp_path / "odd" / "checkpoints").exists()


@pytest.mark.slow
def test_two_process_run_evaluates_every_validation_image_once(tmp_path):
    data = tmp_path / "digits"
    write_demo(data, source="digits", train_size=128, val_size=97, progress=False)  # ranks get 49 and 48 images
    run = tmp_path / "ddp"
    run_two_processes(ROOT / "eval" / "finetune.py",
                      [str(DEMO_RECIPE),
                       *overrides(data, run, **{"optim.batch_size": 16, "optim.epochs": 2, "train.eval_every": 0})],
                      port=29541, cwd=ROOT, ACCELERATE_USE_CPU="1")  # gloo on CPU under torchrun
    final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["samples"] == 97 and final["step"] == 8  # 128 images / (16 x 2 ranks) x 2 epochs
    # The ranks' summed counts equal one process evaluating the exported classifier on all 97 images.
    single = evaluate_export(run, data / "val", 16)
    assert single["top1"] == pytest.approx(final["top1"]) and single["loss"] == pytest.approx(final["loss"], rel=1e-4)
