"""Shared training machinery: recipes, checkpoints, optimizer and schedule, guards, tracking (CPU only)."""

import copy
import math
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import numpy as np
import pytest
import timm
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedType, ProjectConfiguration, is_wandb_available
from PIL import Image
from two_processes import run_two_processes

import vig  # noqa: F401  (registers the towers with timm)
from pretrain.checkpoints import CheckpointError, CheckpointManager, TrainState
from pretrain.guards import NonFiniteGuard, StopSignal, check_batch_settings, check_clip_setting
from pretrain.optim import (
    build_optimizer,
    build_scheduler,
    param_groups,
    parameter_names,
    scaled_lr,
    warmup_updates,
)
from pretrain.recipe import RecipeError, load_recipe, recipe_to_dict, save_recipe
from pretrain.schema import MAERecipe
from pretrain.tracking import Throughput, Tracker, accelerator_kwargs, wandb_wanted

# --- recipes ---------------------------------------------------------------------------------------------------

@dataclass
class ModelSection:
    name: str
    drop_path: float = 0.0


@dataclass
class DataSection:
    train_shards: list[str] = field(default_factory=list)
    batch_size: int = 64
    cache_dir: Path | None = None


@dataclass
class OptimSection:
    lr: float = 1.5e-4
    betas: tuple[float, float] = (0.9, 0.95)


@dataclass
class TrainSection:
    resume: str | None = None
    use_wandb: bool | Literal["auto"] = "auto"


@dataclass
class DemoRecipe:
    model: ModelSection
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_unknown_key_names_file_key_and_closest_valid_key(tmp_path):
    recipe = write(tmp_path / "recipes" / "vig_b.yaml", "model: {name: vig_base}\noptim: {lrr: 1.0e-3}\n")
    expected = r"recipes/vig_b\.yaml: unknown key 'optim\.lrr' \(did you mean 'optim\.lr'\?\)"
    with pytest.raises(RecipeError, match=expected):
        load_recipe(recipe, DemoRecipe)
    misplaced = write(tmp_path / "misplaced.yaml", "model: {name: vig_base}\noptim: {batch_size: 8}\n")
    with pytest.raises(RecipeError, match=r"did you mean 'data\.batch_size'"):
        load_recipe(misplaced, DemoRecipe)
    with pytest.raises(RecipeError, match=r"^command line: unknown key 'train\.resme' \(did you mean 'train\.resume'"):
        load_recipe(write(tmp_path / "good.yaml", "model: {name: vig_base}\n"), DemoRecipe, ["train.resme=auto"])


@pytest.mark.parametrize(("text", "message"), [
    ("data: {batch_size: '64'}", r"'data\.batch_size' expects int, got str '64'"),
    ("data: {batch_size: 6.5}", r"'data\.batch_size' expects int, got float 6\.5"),
    ("optim: {lr: fast}", r"'optim\.lr' expects float, got str 'fast'"),
    ("optim: {betas: [0.9]}", r"'optim\.betas' expects a list of 2 items, got 1"),
    ("data: {train_shards: a.tar}", r"'data\.train_shards' expects a list, got str 'a\.tar'"),
    ("train: {use_wandb: maybe}", r"'train\.use_wandb' expects .*bool.*'auto'.*got str 'maybe'"),
    ("optim: 3", r"optim must be a mapping of keys \(OptimSection\), got int 3"),
    ("model: {name: 12}", r"'model\.name' expects str .*got int 12"),
])
def test_wrong_types_name_the_key_and_both_types(tmp_path, text, message):
    recipe = write(tmp_path / "bad.yaml", "model: {name: vig_base}\n" + text + "\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml: " + message):
        load_recipe(recipe, DemoRecipe)


def test_values_convert_to_the_declared_types(tmp_path):
    recipe = write(tmp_path / "ok.yaml", "model: {name: vig_base, drop_path: 0}\noptim: {lr: 1e-3, betas: [0.9, 1]}\n"
                                         "data: {cache_dir: /tmp/c}\ntrain: {resume: auto, use_wandb: false}\n")
    loaded = load_recipe(recipe, DemoRecipe)
    assert loaded.optim.lr == 1e-3 and isinstance(loaded.optim.lr, float)  # YAML 1.1 reads 1e-3 as a string
    assert loaded.optim.betas == (0.9, 1.0) and isinstance(loaded.optim.betas[1], float)
    assert isinstance(loaded.model.drop_path, float)
    assert loaded.data.cache_dir == Path("/tmp/c") and loaded.data.batch_size == 64
    assert loaded.train == TrainSection(resume="auto", use_wandb=False)


def test_trainer_recipes_reject_zero_counts_and_read_yaml_no_as_a_precision(tmp_path):
    recipe = write(tmp_path / "mae.yaml", "model: {encoder: vig_tiny}\n")
    with pytest.raises(RecipeError, match=r"command line: 'optim\.accum_steps' must be at least 1, got 0"):
        load_recipe(recipe, MAERecipe, ["optim.accum_steps=0"])
    with pytest.raises(RecipeError, match=r"'data\.num_workers' must be at least 0, got -1"):
        load_recipe(recipe, MAERecipe, ["data.num_workers=-1"])
    with pytest.raises(RecipeError, match=r"'train\.max_steps' expects int >= 1 \| None, got int 0|must be at least 1"):
        load_recipe(recipe, MAERecipe, ["train.max_steps=0"])
    assert load_recipe(recipe, MAERecipe, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(RecipeError, match=r"'train\.mixed_precision' expects one of 'no', 'fp16', 'bf16'"):
        load_recipe(recipe, MAERecipe, ["train.mixed_precision=fp12"])


def test_missing_required_key_is_named(tmp_path):
    with pytest.raises(RecipeError, match=r"empty\.yaml: missing required key 'model'"):
        load_recipe(write(tmp_path / "empty.yaml", ""), DemoRecipe)
    with pytest.raises(RecipeError, match=r"missing required key 'model\.name' \(str\)"):
        load_recipe(write(tmp_path / "noname.yaml", "model: {drop_path: 0.1}"), DemoRecipe)


def test_base_chain_is_deep_merged_and_errors_name_the_file_that_set_the_key(tmp_path):
    write(tmp_path / "full.yaml", "model: {name: vig_base, drop_path: 0.1}\noptim: {lr: 1.0e-3, betas: [0.9, 0.98]}\n")
    write(tmp_path / "mid.yaml", "base: full.yaml\ndata: {batch_size: 32, train_shards: [x]}\n")
    demo = write(tmp_path / "demo" / "demo.yaml", "base: ../mid.yaml\noptim: {lr: 2.0e-3}\ndata: {train_shards: [y]}\n")
    loaded = load_recipe(demo, DemoRecipe)
    assert loaded.model == ModelSection("vig_base", 0.1)
    assert loaded.optim == OptimSection(lr=2e-3, betas=(0.9, 0.98))  # merged key by key, not section by section
    assert loaded.data.batch_size == 32 and loaded.data.train_shards == ["y"]  # lists replace
    write(tmp_path / "full.yaml", "model: {name: vig_base, drop_pth: 0.1}\n")
    with pytest.raises(RecipeError, match=r"full\.yaml: unknown key 'model\.drop_pth'"):
        load_recipe(demo, DemoRecipe)
    write(tmp_path / "full.yaml", "base: demo/demo.yaml\n")
    with pytest.raises(RecipeError, match="loops back"):
        load_recipe(demo, DemoRecipe)
    with pytest.raises(RecipeError, match=r"orphan\.yaml: base recipe 'nowhere\.yaml' not found"):
        load_recipe(write(tmp_path / "orphan.yaml", "base: nowhere.yaml\n"), DemoRecipe)
    with pytest.raises(RecipeError, match=r"cannot read recipe .*absent\.yaml: No such file"):
        load_recipe(tmp_path / "absent.yaml", DemoRecipe)
    with pytest.raises(RecipeError, match=r"broken\.yaml: invalid YAML"):
        load_recipe(write(tmp_path / "broken.yaml", "model: {name: [\n"), DemoRecipe)


def test_command_line_overrides(tmp_path):
    recipe = write(tmp_path / "r.yaml", "model: {name: vig_base}\ntrain: {resume: auto}\n")
    loaded = load_recipe(recipe, DemoRecipe, ["optim.lr=1e-3", "data.train_shards=[a,b]", "train.resume=null",
                                              "model={name: vim_tiny}", "optim.betas=[0.8, 0.9]"])
    assert loaded.optim.lr == 1e-3
    assert loaded.data.train_shards == ["a", "b"]
    assert loaded.train.resume is None
    assert loaded.model.name == "vim_tiny"
    assert loaded.optim.betas == (0.8, 0.9)
    assert load_recipe(recipe, DemoRecipe, ["train.resume=auto"]).train.resume == "auto"
    with pytest.raises(RecipeError, match=r"command line: 'data\.batch_size' expects int"):
        load_recipe(recipe, DemoRecipe, ["data.batch_size=big"])
    with pytest.raises(RecipeError, match="expected an override like 'section.key=value', got 'optim.lr'"):
        load_recipe(recipe, DemoRecipe, ["optim.lr"])


def test_saved_recipe_loads_back_equal(tmp_path):
    original = load_recipe(write(tmp_path / "r.yaml", "model: {name: vig_base}\ndata: {cache_dir: /c}\n"), DemoRecipe,
                           ["optim.lr=3e-4"])
    saved = tmp_path / "run" / "recipe.yaml"
    save_recipe(original, saved)
    assert load_recipe(saved, DemoRecipe) == original
    assert recipe_to_dict(original)["optim"] == {"lr": 3e-4, "betas": [0.9, 0.95]}
    assert [path.name for path in saved.parent.iterdir()] == ["recipe.yaml"]  # no temporary file left behind


# --- checkpoints -----------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each test builds its own Accelerator from scratch."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


class Run:
    """A tiny training setup wired the way the trainers wire theirs."""

    def __init__(self, run_dir: Path, seed: int, keep_last: int = 3):
        torch.manual_seed(seed)
        self.accelerator = Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=str(run_dir)))
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
        optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.05, betas=(0.9, 0.95), eps=1e-8)
        self.scheduler = build_scheduler(optimizer, total_steps=20, warmup_steps=2)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.state = TrainState()
        self.guard = NonFiniteGuard(max_consecutive=3)
        self.accelerator.register_for_checkpointing(self.scheduler, self.state, self.guard)
        self.manager = CheckpointManager(self.accelerator, run_dir / "checkpoints", keep_last=keep_last)

    def train(self, steps: int) -> None:
        for _ in range(steps):
            self.scheduler.step_update(self.state.step)
            loss = self.model(torch.randn(5, 4)).square().mean()
            self.accelerator.backward(loss)
            self.optimizer.step()
            self.optimizer.zero_grad()
            self.state.step += 1
            self.state.samples_seen += 5

    def snapshot(self) -> dict:
        # Deep copies: state dicts hold the live tensors that training keeps updating in place.
        return copy.deepcopy({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                              "scheduler": self.scheduler.state_dict(), "state": self.state.state_dict(),
                              "guard": self.guard.state_dict()})


def assert_same(saved, restored, where="state"):
    if isinstance(saved, torch.Tensor):
        assert torch.equal(saved, restored), where
    elif isinstance(saved, dict):
        assert saved.keys() == restored.keys(), where
        for key in saved:
            assert_same(saved[key], restored[key], f"{where}.{key}")
    elif isinstance(saved, (list, tuple)):
        assert len(saved) == len(restored), where
        for index, (a, b) in enumerate(zip(saved, restored)):
            assert_same(a, b, f"{where}[{index}]")
    else:
        assert saved == restored, where


def test_resume_restores_model_optimizer_scheduler_and_counters(tmp_path):
    run = Run(tmp_path, seed=0)
    assert run.manager.resume("auto") is None  # nothing to resume yet
    run.train(3)
    run.guard.skipped_total = 2
    path = run.manager.save(run.state.step)
    expected, expected_draw = run.snapshot(), torch.rand(3)
    run.train(2)  # progress after the checkpoint is lost on a crash
    AcceleratorState._reset_state(reset_partial_state=True)

    resumed = Run(tmp_path, seed=1)
    assert not torch.equal(resumed.model[0].weight, expected["model"]["0.weight"])
    assert resumed.manager.resume("auto") == 3
    assert_same(expected, resumed.snapshot())
    assert torch.equal(torch.rand(3), expected_draw)  # RNG states are part of the checkpoint
    assert resumed.state == TrainState(step=3, epoch=0, samples_seen=15)
    assert path == resumed.manager.latest() == tmp_path / "checkpoints" / "step_00000003"


def test_interrupted_save_is_ignored_then_cleaned_up(tmp_path, monkeypatch):
    run = Run(tmp_path, seed=0)
    first = run.manager.save(1)
    real_save_state = run.accelerator.save_state

    def crash_midway(output_dir, **kwargs):
        real_save_state(output_dir, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(run.accelerator, "save_state", crash_midway)
    with pytest.raises(OSError):
        run.manager.save(2)
    monkeypatch.undo()
    assert (tmp_path / "checkpoints" / "step_00000002.tmp" / "model.safetensors").is_file()
    unmarked = tmp_path / "checkpoints" / "step_00000003"
    unmarked.mkdir()  # e.g. a partial copy: a checkpoint name without the completion marker
    assert run.manager.latest() == first
    with pytest.raises(CheckpointError, match="step_00000003 is incomplete"):
        run.manager.resume(unmarked)
    run.manager.save(4)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001", "step_00000003",
                                                                            "step_00000004"]


def test_keep_last_prunes_older_checkpoints_and_same_step_is_replaced(tmp_path):
    run = Run(tmp_path, seed=0, keep_last=2)
    for step in (1, 2, 3, 4):
        run.state.step = step
        run.manager.save(step)
    assert [p.name for p in run.manager.checkpoints()] == ["step_00000003", "step_00000004"]
    run.state.samples_seen = 99
    run.manager.save(4)
    assert [p.name for p in run.manager.checkpoints()] == ["step_00000003", "step_00000004"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000003", "step_00000004"]
    run.state.samples_seen = 0
    assert run.manager.resume("auto") == 4 and run.state.samples_seen == 99


def test_resume_errors(tmp_path):
    run = Run(tmp_path, seed=0)
    assert run.manager.resume(None) is None and run.manager.resume("none") is None
    with pytest.raises(CheckpointError, match=r"checkpoint .*step_00000009 does not exist"):
        run.manager.resume(tmp_path / "checkpoints" / "step_00000009")
    saved = run.manager.save(1)
    with pytest.raises(CheckpointError, match=r"no checkpoint to export from: 'none' names none"):
        run.manager.restore("none")
    assert run.manager.restore("auto") == 1
    for folder in (tmp_path, tmp_path / "checkpoints"):  # a run or its checkpoints folder, not one checkpoint
        with pytest.raises(CheckpointError, match=r"is not a checkpoint but holds them: name one, e\.g\. .*step_0+1"):
            run.manager.resume(folder)
    AcceleratorState._reset_state(reset_partial_state=True)
    unprepared = Accelerator(cpu=True)
    with pytest.raises(CheckpointError, match="after accelerator.prepare"):
        CheckpointManager(unprepared, tmp_path / "checkpoints").resume(saved)
    naming = Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=str(tmp_path),
                                                                       automatic_checkpoint_naming=True))
    with pytest.raises(ValueError, match="automatic_checkpoint_naming=False"):
        CheckpointManager(naming, tmp_path / "checkpoints")


def test_latest_means_saved_last_so_a_resumed_older_line_wins(tmp_path, caplog):
    run = Run(tmp_path, seed=0, keep_last=2)
    branch_point = run.manager.save(1)
    run.manager.save(3)
    assert run.manager.resume(branch_point) == 1  # e.g. back off from a divergence
    run.manager.save(2)
    assert run.manager.latest().name == "step_00000002"
    assert [p.name for p in run.manager.checkpoints()] == ["step_00000003", "step_00000002"]
    assert run.manager.resume("auto") == 2
    with caplog.at_level("WARNING"):
        assert run.manager.resume(None) is None
    assert "starting fresh although" in caplog.text
    run.manager.save(1)
    assert run.manager.latest().name == "step_00000001"


# --- optimizer and schedule ------------------------------------------------------------------------------------

def split_by_decay(model: torch.nn.Module, weight_decay: float = 0.05) -> tuple[set[str], set[str]]:
    groups = param_groups(model, weight_decay)
    assert {group["weight_decay"] for group in groups} == {0.0, weight_decay}
    no_decay, decay = ({name for group in groups if (group["weight_decay"] == 0) == skip
                        for name in parameter_names(model, group)} for skip in (True, False))
    return no_decay, decay


@pytest.mark.parametrize("name", ["vig_tiny", "vim_tiny"])
def test_param_groups_exclude_norms_biases_tokens_and_declared_names(name):
    model = timm.create_model(name)
    no_decay, decay = split_by_decay(model)
    params = dict(model.named_parameters())
    assert no_decay | decay == set(params) and not no_decay & decay
    assert {n for n, p in params.items() if p.ndim <= 1} <= no_decay
    assert model.no_weight_decay() <= no_decay
    assert "pos_embed" in no_decay and all(params[n].ndim >= 2 for n in decay)
    if name == "vim_tiny":  # 2-D state matrices that only no_weight_decay() protects
        assert "layers.0.mixer.A_log" in no_decay and params["layers.0.mixer.A_log"].ndim == 2
        assert "cls_token" in no_decay
    assert "head.weight" in decay


class MaskedAutoencoder(torch.nn.Module):
    """Shaped like the trainers' single wrapper module: a tower plus the pretraining-only parts."""

    def __init__(self):
        super().__init__()
        self.encoder = timm.create_model("vim_tiny", num_classes=0)
        self.mask_token = torch.nn.Parameter(torch.zeros(1, 1, 8))
        self.decoder_pos_embed = torch.nn.Parameter(torch.zeros(1, 4, 8), requires_grad=False)
        self.decoder = torch.nn.Linear(8, 8)
        self.logit_scale = torch.nn.Parameter(torch.ones([]))


def test_param_groups_prefix_submodule_names_and_skip_frozen():
    model = MaskedAutoencoder()
    no_decay, decay = split_by_decay(model)
    assert {"encoder.pos_embed", "encoder.layers.0.mixer.A_log", "mask_token", "logit_scale",
            "decoder.bias"} <= no_decay
    assert "decoder.weight" in decay and "encoder.layers.0.mixer.in_proj.weight" in decay
    assert "decoder_pos_embed" not in no_decay | decay


def test_build_optimizer_settings():
    optimizer = build_optimizer(MaskedAutoencoder(), lr=2e-3, weight_decay=0.05, betas=(0.9, 0.95), eps=1e-6)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert {(g["lr"], g["betas"], g["eps"]) for g in optimizer.param_groups} == {(2e-3, (0.9, 0.95), 1e-6)}


def test_schedule_warms_up_linearly_then_follows_a_half_cosine():
    optimizer = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(2))]},
                                   {"params": [torch.nn.Parameter(torch.zeros(2))], "lr_scale": 0.5}], lr=1.0)
    scheduler = build_scheduler(optimizer, total_steps=110, warmup_steps=10, min_lr=0.1)

    def lr_at(update):
        scheduler.step_update(update)
        return [group["lr"] for group in optimizer.param_groups]

    assert lr_at(0) == [0.0, 0.0]
    assert lr_at(5) == pytest.approx([0.5, 0.25])
    assert lr_at(10) == pytest.approx([1.0, 0.5])
    assert lr_at(60)[0] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(85)[0] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.75)))
    assert lr_at(110)[0] == pytest.approx(0.1) and lr_at(500)[0] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="warmup_steps < total_steps"):
        build_scheduler(optimizer, total_steps=10, warmup_steps=10)


def test_warmup_is_counted_in_updates_and_cut_to_the_schedule(caplog):
    epochs = SimpleNamespace(warmup_steps=None, warmup_epochs=2)
    assert warmup_updates(epochs, updates_per_epoch=12, total_updates=120) == 24
    assert warmup_updates(SimpleNamespace(warmup_steps=5, warmup_epochs=2), 12, 120) == 5  # steps win
    with caplog.at_level("WARNING", logger="pretrain.optim"):
        assert warmup_updates(epochs, updates_per_epoch=12, total_updates=12) == 11
    assert "is not shorter than the schedule (optim.epochs: 12 updates)" in caplog.text


def test_scaled_lr_follows_mae():
    assert scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)
    assert scaled_lr(1e-3, 64, reference=128) == pytest.approx(5e-4)


# --- guards ----------------------------------------------------------------------------------------------------

def test_non_finite_guard_skips_counts_and_gives_up_naming_the_step():
    guard = NonFiniteGuard(max_consecutive=3)
    assert guard.check(torch.tensor(1.0), step=0) is False
    assert guard.check(torch.tensor(float("nan")), step=1) is True
    assert guard.check(torch.tensor([1.0, float("inf")]), step=2) is True
    assert guard.state_dict() == {"skipped_total": 2, "consecutive": 2}
    assert guard.check(torch.tensor(0.5), step=3) is False
    assert guard.state_dict() == {"skipped_total": 2, "consecutive": 0}
    assert guard.check(torch.tensor(float("nan")), step=4) and guard.check(torch.tensor(float("-inf")), step=5)
    with pytest.raises(RuntimeError, match=r"non-finite loss at step 6: 3 consecutive .*5 skipped in total"):
        guard.check(torch.tensor(float("nan")), step=6)
    restored = NonFiniteGuard(max_consecutive=3)
    restored.load_state_dict(guard.state_dict())
    assert restored.state_dict() == guard.state_dict()
    with pytest.raises(RuntimeError, match="step 0"):
        NonFiniteGuard(max_consecutive=1).check(torch.tensor(float("nan")), step=0)


def test_batch_settings_have_one_source():
    check_batch_settings(Accelerator(cpu=True, gradient_accumulation_steps=2), micro_batch=8, accumulation_steps=2)
    with pytest.raises(ValueError, match="accumulates 2 micro-batches but the recipe says 4"):
        check_batch_settings(Accelerator(cpu=True, gradient_accumulation_steps=2), micro_batch=8, accumulation_steps=4)

    def deepspeed(**config):  # the attributes check_batch_settings reads off an Accelerator under DeepSpeed
        plugin = SimpleNamespace(deepspeed_config=config)
        return SimpleNamespace(gradient_accumulation_steps=2, distributed_type=DistributedType.DEEPSPEED,
                               num_processes=4, state=SimpleNamespace(deepspeed_plugin=plugin))

    filled = deepspeed(train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps=2)
    check_batch_settings(filled, micro_batch=8, accumulation_steps=2)
    assert filled.state.deepspeed_plugin.deepspeed_config == {
        "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2, "train_batch_size": 64}
    with pytest.raises(ValueError, match="DeepSpeed config sets gradient_accumulation_steps=4 but the recipe gives 2"):
        check_batch_settings(deepspeed(gradient_accumulation_steps=4), micro_batch=8, accumulation_steps=2)
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=16 but the recipe gives 8"):
        check_batch_settings(deepspeed(train_micro_batch_size_per_gpu=16), micro_batch=8, accumulation_steps=2)


def test_deepspeed_clipping_follows_the_recipe():
    def deepspeed(**config):
        plugin = SimpleNamespace(deepspeed_config=config)
        return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(deepspeed_plugin=plugin))

    check_clip_setting(Accelerator(cpu=True), None)  # not DeepSpeed: nothing to do
    unclipped = deepspeed(gradient_clipping="auto")  # accelerate would fill "auto" with 1.0
    check_clip_setting(unclipped, None)
    assert unclipped.state.deepspeed_plugin.deepspeed_config == {"gradient_clipping": 0.0}
    clipped = deepspeed()
    check_clip_setting(clipped, 3.0)
    assert clipped.state.deepspeed_plugin.deepspeed_config == {"gradient_clipping": 3.0}
    check_clip_setting(deepspeed(gradient_clipping=3.0), 3.0)
    with pytest.raises(ValueError, match="gradient_clipping=1.0 but the recipe's optim.clip_grad is None"):
        check_clip_setting(deepspeed(gradient_clipping=1.0), None)


def test_stop_signal_catches_sigterm_and_restores_handlers():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopSignal() as stop:
        assert not stop.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.should_stop() and stop.received == "SIGTERM" and stop.exit_status == 143
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # a second signal while stopping: interrupt at once
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    with StopSignal() as interrupted:
        os.kill(os.getpid(), signal.SIGINT)
        assert interrupted.should_stop() and interrupted.exit_status == 130
    assert StopSignal().exit_status == 143  # stopped because another process was signalled


# --- tracking --------------------------------------------------------------------------------------------------

def test_tracker_writes_png_and_tensorboard_events(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accelerator = Accelerator(cpu=True, **accelerator_kwargs(tmp_path, use_wandb=False))
    tracker = Tracker(accelerator, tmp_path, "demo", config={"optim": {"lr": 1e-3, "betas": [0.9, 0.95]}})
    tracker.log({"train/loss": torch.tensor(0.25), "train/lr": 1e-3}, step=7)
    image = torch.rand(3, 6, 5)
    path = tracker.log_image("val/reconstruction", image, step=7)
    tracker.close()

    assert path == tmp_path / "images" / "val_reconstruction_00000007.png"
    pixels = np.asarray(Image.open(path))
    assert pixels.shape == (6, 5, 3)
    assert np.abs(pixels.astype(float) - image.permute(1, 2, 0).numpy() * 255).max() <= 0.5 + 1e-3
    events = EventAccumulator(str(tmp_path / "logs" / "demo"))
    events.Reload()
    assert events.Scalars("train/loss")[0].value == pytest.approx(0.25) and events.Scalars("train/loss")[0].step == 7
    assert events.Images("val/reconstruction")[0].step == 7


def test_wandb_selection(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_wanted("auto") is False and wandb_wanted(False) is False
    assert accelerator_kwargs("run", use_wandb=False)["log_with"] == ["tensorboard"]
    with pytest.raises(ValueError, match="true, false or 'auto', got 'yes please'"):
        wandb_wanted("yes please")
    if not is_wandb_available():
        with pytest.raises(RuntimeError, match="wandb is not installed"):
            wandb_wanted(True)


def test_throughput_counts_all_processes_over_a_sliding_window(monkeypatch):
    clock = iter([0.0, 1.0, 2.0, 4.0])
    monkeypatch.setattr("pretrain.tracking.time.perf_counter", lambda: next(clock))
    meter = Throughput(num_processes=2, window=2)
    meter.update(10)
    assert meter.rate() is None
    meter.update(10)
    assert meter.rate() == pytest.approx(20.0)
    meter.update(10)
    meter.update(10)
    assert meter.rate() == pytest.approx(40 / 3)  # the window forgot the first interval


# --- several processes -----------------------------------------------------------------------------------------

def _two_process_worker(directory: str) -> None:
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    model, optimizer = accelerator.prepare(torch.nn.Linear(3, 3), torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))]))
    state, guard = TrainState(), NonFiniteGuard(max_consecutive=5, accelerator=accelerator)
    accelerator.register_for_checkpointing(state, guard)

    assert guard.check(torch.tensor(float("nan") if rank == 1 else 1.0), step=0) is True, rank
    assert guard.check(torch.tensor(1.0), step=1) is False, rank
    stop = StopSignal()
    assert stop.should_stop(accelerator) is False, rank
    stop.requested = rank == 1
    assert stop.should_stop(accelerator) is True, rank

    manager = CheckpointManager(accelerator, directory, keep_last=1)
    state.step = 8
    manager.save(7)
    saved = manager.save(8)
    accelerator.wait_for_everyone()
    assert [p.name for p in manager.checkpoints()] == ["step_00000008"], rank
    state.step, guard.skipped_total = 0, 0
    assert manager.resume("auto") == 8 and state.step == 8 and guard.skipped_total == 1, rank
    assert (saved / f"random_states_{rank}.pkl").is_file()


def test_two_processes_skip_stop_save_and_resume_together(tmp_path):
    from accelerate import debug_launcher

    AcceleratorState._reset_state(reset_partial_state=True)  # the forked workers must not inherit a state
    debug_launcher(_two_process_worker, args=(str(tmp_path / "checkpoints"),), num_processes=2)
    assert (tmp_path / "checkpoints" / "step_00000008" / "random_states_1.pkl").is_file()


@pytest.mark.slow
def test_a_hung_two_process_run_fails_with_every_process_stack(tmp_path):
    script = tmp_path / "hang_after_init.py"
    script.write_text("import time\nimport torch.distributed as dist\n\ndist.init_process_group('gloo')\n"
                      "time.sleep(600)\n")
    with pytest.raises(pytest.fail.Exception, match="did not finish in 40 s") as failure:
        run_two_processes(script, [], port=29549, cwd=tmp_path, timeout=40)
    stacks = str(failure.value)
    assert stacks.count('hang_after_init.py", line 5 in <module>') == 2, stacks  # both ranks, at the sleep
