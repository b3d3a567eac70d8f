"""MAE pretraining end to end on digits shards: masking, training, resume, distributed, export, linear probe."""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from timm.models.vision_transformer import Block
from torch._dynamo.utils import counters
from two_processes import run_two_processes

import vig
from eval import linear_probe
from pretrain import mae
from pretrain.checkpoints import CheckpointError
from pretrain.compiling import compile_blocks
from pretrain.data import write_demo
from pretrain.export import export_timm, sub_state_dict
from pretrain.masked_autoencoder import MaskedAutoencoder, patchify, random_keep, unpatchify
from pretrain.recipe import RecipeError
from pretrain.tracking import Tracker

ROOT = Path(__file__).resolve().parents[1]
DEMO_RECIPE = ROOT / "recipes" / "demo_mae_vig_t.yaml"


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    write_demo(out, source="digits", train_size=192, val_size=96, progress=False)
    return out


def tiny_overrides(data: Path, run: Path, **extra) -> list[str]:
    values = {"model.img_size": 32, "model.decoder_dim": 32, "model.decoder_depth": 1, "model.decoder_heads": 2,
              "data.train_shards": str(data / "train"), "data.num_workers": 0, "data.shuffle_buffer": 0,
              "optim.batch_size": 16, "optim.epochs": 2, "optim.warmup_epochs": 1, "optim.base_lr": 1e-3,
              "train.output_dir": str(run), "train.log_every": 1, "train.image_every": 2,
              "train.checkpoint_every": 2, **extra}
    return [f"{key}={value}" for key, value in values.items()]


def test_masking_keeps_raster_order_and_hides_the_requested_share():
    keep, mask = random_keep(3, 196, 0.75, torch.device("cpu"))
    assert keep.shape == (3, 49) and (keep.diff(dim=1) > 0).all()
    assert mask.sum(dim=1).tolist() == [147] * 3
    assert not mask.gather(1, keep).any()
    images = torch.randn(2, 3, 32, 48)
    assert torch.equal(unpatchify(patchify(images, 16), 16, (2, 3), 3), images)


def test_sparse_depthwise_conv_ignores_hidden_tokens():
    torch.manual_seed(0)
    mixer = timm.create_model("vig_tiny").blocks[0].attn
    tokens = torch.randn(2, 16, 192)
    keep, mask = random_keep(2, 16, 0.5, torch.device("cpu"))
    visible = tokens.gather(1, keep.unsqueeze(-1).expand(-1, -1, 192))
    zeroed = tokens.masked_fill(mask.unsqueeze(-1), 0.0)
    expected = mixer.local_mix(zeroed, (4, 4)).gather(1, keep.unsqueeze(-1).expand(-1, -1, 192))
    torch.testing.assert_close(mixer.local_mix(visible, (4, 4), keep), expected)


@pytest.mark.parametrize("encoder, mode", [("vig_tiny", "visible"), ("vig_tiny", "mask_token"),
                                           ("vim_tiny", "visible"), ("vig_h_tiny", "mask_token")])
def test_masked_autoencoder_trains_every_parameter(encoder, mode):
    torch.manual_seed(0)
    model = MaskedAutoencoder(encoder, img_size=64, mask_mode=mode, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    loss, prediction, mask = model(torch.randn(2, 3, 64, 64))
    loss.backward()
    assert torch.isfinite(loss)
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    with pytest.raises(ValueError, match="mask_token"):
        MaskedAutoencoder("vig_h_tiny", img_size=64, mask_mode="visible")


def test_misspelled_recipe_key_fails_before_training(tmp_path):
    with pytest.raises(RecipeError, match=r"optim\.lrr.*optim\.lr"):
        mae.main([str(DEMO_RECIPE), "optim.lrr=1e-3", f"train.output_dir={tmp_path}"])
    assert not (tmp_path / "checkpoints").exists()
    with pytest.raises(ValueError, match="data.train_shards is empty"):
        mae.main([str(DEMO_RECIPE), "data.train_shards=''", f"train.output_dir={tmp_path}"])
    with pytest.raises(ValueError, match=r"model\.encoder='vig_tinyy' is not a registered architecture.*vig_tiny"):
        MaskedAutoencoder("vig_tinyy")
    # From the command line a recipe mistake is one line, like an argparse error, not a traceback.
    done = subprocess.run([sys.executable, "pretrain/mae.py", str(DEMO_RECIPE), "optim.lrr=1e-3",
                           f"train.output_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    last_line = done.stderr.strip().splitlines()[-1]
    assert last_line == "error: command line: unknown key 'optim.lrr' (did you mean 'optim.lr'?)", done.stderr


def test_warmup_steps_override_warmup_epochs(digits, tmp_path):
    mae.main([str(DEMO_RECIPE), *tiny_overrides(digits, tmp_path, **{"train.max_steps": 2, "optim.warmup_steps": 1})])
    events = EventAccumulator(str(tmp_path / "logs" / "mae"))
    events.Reload()
    lrs = [event.value for event in events.Scalars("lr")]
    # one warm-up update from 0, then the peak (warmup_epochs=1 would still be at 1/12 of it)
    assert lrs == pytest.approx([0.0, 1e-3 * 16 / 256])


def test_resume_after_a_layout_change_needs_resume_data_continue(digits, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint to export from: 'auto'"):  # nothing trained yet
        mae.main([str(DEMO_RECIPE), *tiny_overrides(digits, tmp_path), "--export-from", "auto"])
    mae.main([str(DEMO_RECIPE), *tiny_overrides(digits, tmp_path, **{"train.max_steps": 2})])
    more_workers = tiny_overrides(digits, tmp_path, **{"train.max_steps": 3, "data.num_workers": 2})
    with pytest.raises(ValueError, match=r"num_workers saved 1, now 2.*train\.resume_data=continue"):
        mae.main([str(DEMO_RECIPE), *more_workers])
    mae.main([str(DEMO_RECIPE), *more_workers, "train.resume_data=continue"])
    assert (tmp_path / "checkpoints" / "step_00000003").is_dir()


def final_encoder(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "encoder" / "model.safetensors"))


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_run_matches_an_uninterrupted_one(digits, tmp_path, workers):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # With workers, augmentations are seeded per sample (not from the resume point) and must come back too.
    options = {"data.num_workers": workers}
    mae.main([str(DEMO_RECIPE), *tiny_overrides(digits, straight, **{"train.max_steps": 4, **options})])
    mae.main([str(DEMO_RECIPE), *tiny_overrides(digits, resumed, **{"train.max_steps": 2, **options})])
    mae.main([str(DEMO_RECIPE), *tiny_overrides(digits, resumed, **{"train.max_steps": 4, **options})])
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    # Model, optimizer, scheduler, RNG and data position all came back: the weights are bit-identical.
    for key, value in final_encoder(straight).items():
        torch.testing.assert_close(final_encoder(resumed)[key], value, rtol=0, atol=0, msg=key)
    assert (resumed / "recipe.yaml").is_file() and list((resumed / "images").glob("reconstruction_*.png"))
    # Exporting a checkpoint needs neither the training data nor its loader layout.
    exported = tmp_path / "exported"
    mae.main([str(resumed / "recipe.yaml"), f"data.train_shards={tmp_path / 'moved'}", "data.num_workers=3",
              "--export-from", str(resumed / "checkpoints" / "step_00000004"), "--export-to", str(exported)])
    for key, value in final_encoder(straight).items():
        torch.testing.assert_close(load_file(str(exported / "model.safetensors"))[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("encoder, mode", [("vig_tiny", "visible"), ("vim_tiny", "visible"),
                                           ("vig_h_tiny", "mask_token")])
def test_compile_reaches_every_block_the_forward_calls(encoder, mode):
    model = MaskedAutoencoder(encoder, img_size=64, mask_mode=mode, decoder_dim=32, decoder_depth=2, decoder_heads=2)
    compile_blocks(model, True)
    block_types = (vig.vig.GLABlock, vig.vig.HierViGBlock, vig.vim.VimLayer, Block)
    blocks = [name for name, module in model.named_modules() if isinstance(module, block_types)]
    # ViG-H runs each stage's blocks itself, so a compiled stage would leave them eager.
    uncompiled = [name for name in blocks if model.get_submodule(name)._compiled_call_impl is None]
    assert len(blocks) >= 4 and uncompiled == []
    assert [name for name, _ in model.named_parameters()] == [name for name, _ in MaskedAutoencoder(
        encoder, img_size=64, mask_mode=mode, decoder_dim=32, decoder_depth=2, decoder_heads=2).named_parameters()]


def test_compiled_run_computes_what_the_eager_run_does_and_shares_its_checkpoints(digits, tmp_path):
    eager, mixed = tmp_path / "eager", tmp_path / "mixed"
    mae.main([str(DEMO_RECIPE), *tiny_overrides(digits, eager, **{"train.max_steps": 4})])
    torch._dynamo.reset()
    counters.clear()
    mae.main([str(DEMO_RECIPE), *tiny_overrides(digits, mixed, **{"train.max_steps": 2, "train.compile": True})])
    assert counters["stats"]["unique_graphs"] > 0  # the model really went through dynamo
    # An eager run resumes from the compiled run's checkpoint: parameter names did not change.
    mae.main([str(DEMO_RECIPE), *tiny_overrides(digits, mixed, **{"train.max_steps": 4})])
    for key, value in final_encoder(eager).items():
        torch.testing.assert_close(final_encoder(mixed)[key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["visible", "mask_token"])
def test_gpu_compiled_blocks_match_eager_in_bf16(mode):
    """train.compile on the GPU: the fused Triton mixer inside compiled blocks under bf16 autocast gives the eager
    loss and gradients, up to bf16 rounding."""
    torch.manual_seed(0)
    eager = MaskedAutoencoder("vig_small", img_size=224, mask_mode=mode).cuda()
    compiled = compile_blocks(copy.deepcopy(eager), True)
    images = torch.randn(32, 3, 224, 224, device="cuda")
    torch._dynamo.reset()
    counters.clear()
    results = []
    for model in (eager, compiled):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(images, generator=torch.Generator("cuda").manual_seed(0))[0]
        loss.backward()
        results.append((loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}))
    assert counters["stats"]["unique_graphs"] > 0
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    assert compiled_grads.keys() == eager_grads.keys()
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-2, atol=0)
    worst = max(((compiled_grads[name] - grad).norm() / grad.norm()).item()
                for name, grad in eager_grads.items() if grad.norm() > 0)
    print(f"{mode}: loss {eager_loss.item():.5f} eager, {compiled_loss.item():.5f} compiled; "
          f"largest relative gradient difference {worst:.2e}")
    assert worst < 5e-2


def test_nonfinite_losses_stop_the_run_naming_the_step(digits, tmp_path, monkeypatch):
    def nan_loss(self, images, generator=None):
        loss = self.decoder_pred.weight.sum() * float("nan")
        return loss, torch.zeros(images.shape[0], 4, 768), torch.ones(images.shape[0], 4, dtype=torch.bool)
    monkeypatch.setattr(MaskedAutoencoder, "forward", nan_loss)
    with pytest.raises(RuntimeError, match=r"step 2.*3"):
        mae.main([str(DEMO_RECIPE), *tiny_overrides(digits, tmp_path, **{"train.max_nonfinite": 3})])


def test_sigterm_saves_a_checkpoint_and_exits_unfinished(digits, tmp_path, monkeypatch):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    mae.main([str(DEMO_RECIPE), *tiny_overrides(digits, straight, **{"train.max_steps": 4})])
    log = Tracker.log

    def log_then_signal(self, scalars, step):
        log(self, scalars, step)
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # as Slurm or Kubernetes would, in the middle of an update

    monkeypatch.setattr(Tracker, "log", log_then_signal)
    with pytest.raises(SystemExit) as exited:
        mae.main([str(DEMO_RECIPE), *tiny_overrides(digits, stopped, **{"train.max_steps": 4})])
    assert exited.value.code == 128 + signal.SIGTERM
    assert [p.name for p in (stopped / "checkpoints").iterdir()] == ["step_00000001"]
    assert not (stopped / "encoder").exists()
    monkeypatch.undo()
    mae.main([str(DEMO_RECIPE), *tiny_overrides(digits, stopped, **{"train.max_steps": 4})])
    for key, value in final_encoder(straight).items():
        torch.testing.assert_close(final_encoder(stopped)[key], value, rtol=0, atol=0, msg=key)


def test_exported_encoder_loads_into_timm_with_the_same_features(tmp_path):
    torch.manual_seed(0)
    model = MaskedAutoencoder("vim_tiny", img_size=64, decoder_dim=32, decoder_depth=1, decoder_heads=2).eval()
    folder = export_timm(sub_state_dict(model.state_dict(), "encoder."), "vim_tiny", tmp_path / "encoder", img_size=64)
    loaded = timm.create_model("vim_tiny", num_classes=0, img_size=64,
                               checkpoint_path=str(folder / "model.safetensors")).eval()
    images = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded(images), model.encoder(images), rtol=0, atol=0)
    assert "tag" not in json.loads((folder / "config.json").read_text())["pretrained_cfg"]
    local = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    torch.testing.assert_close(local(images), model.encoder(images), rtol=0, atol=0)
    finetune = timm.create_model("vim_tiny", pretrained=True, num_classes=10, img_size=64,
                                 pretrained_cfg_overlay=dict(file=str(folder / "model.safetensors")))
    torch.testing.assert_close(finetune.pos_embed, model.encoder.pos_embed)
    assert finetune(images).shape == (2, 10)


def test_linear_probe_separates_digits(digits, tmp_path):
    torch.manual_seed(0)
    encoder = timm.create_model("vig_tiny", num_classes=0, img_size=32)
    folder = export_timm(encoder.state_dict(), "vig_tiny", tmp_path / "encoder", img_size=32)
    result = linear_probe.main(["--encoder", str(folder), "--train-shards", str(digits / "train"),
                                "--val-shards", str(digits / "val"), "--epochs", "20", "--warmup-epochs", "2",
                                "--batch-size", "64", "--num-workers", "0", "--output", str(tmp_path / "probe.json")])
    assert result["val_samples"] == 96 and result["train_samples"] == 192
    assert result["top1"] > 40.0  # ten classes: chance is 10 %
    assert result["top5"] >= result["top1"]
    assert json.loads((tmp_path / "probe.json").read_text())["top1"] == result["top1"]


def test_linear_probe_takes_any_training_set_size():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(65) % 2
    features = torch.randn(65, 8, generator=generator) + 3 * labels[:, None]  # 65 = one batch of 64 and one of 1
    head = linear_probe.train_head(features, labels, 2, epochs=5, batch_size=64, base_lr=0.1, warmup_epochs=1, seed=0)
    assert (head(features).argmax(1) == labels).float().mean() > 0.9
    with pytest.raises(ValueError, match="at least 2 training samples"):
        linear_probe.train_head(features[:1], labels[:1], 2, epochs=1, batch_size=64, base_lr=0.1, warmup_epochs=0,
                                seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_two_process_gloo_run(digits, tmp_path, compiled):
    run = tmp_path / "ddp"
    overrides = {"train.max_steps": 3, "optim.batch_size": 8, "train.compile": compiled}
    arguments = [str(DEMO_RECIPE), *tiny_overrides(digits, run, **overrides)]
    result = run_two_processes(ROOT / "pretrain" / "mae.py", arguments, port=29535 if compiled else 29533, cwd=ROOT,
                               ACCELERATE_USE_CPU="1")  # gloo on CPU under torchrun
    assert "2 processes" in result.stdout + result.stderr
    assert (run / "checkpoints" / "step_00000003").is_dir()
    assert vig.load_official_state_dict(timm.create_model("vig_tiny", num_classes=0, img_size=32),
                                        final_encoder(run)) == {"dropped": []}
