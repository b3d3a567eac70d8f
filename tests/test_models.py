"""The nine backbones: exact architectures, official state dicts, the timm contract, resolutions, errors."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import vig
from pretrain.export import export_timm

OFFICIAL_KEYS = Path(__file__).resolve().parent / "official_keys"
TINY = ("vig_tiny", "vig_h_tiny", "vim_tiny")
WITHOUT_HEAD = {"vig_tiny": 5_641_536, "vig_small": 22_230_144, "vig_base": 88_253_184,
                "vig_h_tiny": 27_831_680, "vig_h_small": 49_282_688, "vig_h_base": 87_879_360,
                "vim_tiny": 6_955_008, "vim_small": 25_411_584, "vim_base": 96_829_440}
WITH_HEAD = {"vig_tiny": 5_834_536, "vig_small": 22_615_144, "vig_base": 89_022_184,
             "vig_h_tiny": 28_600_680, "vig_h_small": 50_051_688, "vig_h_base": 88_904_360,
             "vim_tiny": 7_148_008, "vim_small": 25_796_584, "vim_base": 97_598_440}


def official_keys(name: str) -> tuple[int, dict[str, tuple[int, ...]]]:
    """Parameter count and ``key -> shape`` of the official state dict (lists read off the public code)."""
    lines = (OFFICIAL_KEYS / f"{name}.txt").read_text().splitlines()
    count = int(re.search(r": (\d+) parameters", lines[0]).group(1))
    shapes = {}
    for line in lines[1:]:
        if line.strip():
            key, shape = line.split(" ", 1)
            shapes[key] = tuple(int(n) for n in shape.strip("()").split(",") if n.strip())
    return count, shapes


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", vig.MODEL_NAMES)
def test_parameter_counts_and_state_dict_match_official(name):
    count, shapes = official_keys(name)
    model = timm.create_model(name)
    assert num_params(model) == count == WITH_HEAD[name]
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    assert num_params(timm.create_model(name, num_classes=0)) == WITHOUT_HEAD[name]


def synthetic_official_checkpoint(name: str) -> dict[str, torch.Tensor]:
    _, shapes = official_keys(name)
    generator = torch.Generator().manual_seed(0)
    return {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}


@pytest.mark.parametrize("name", vig.MODEL_NAMES)
def test_official_checkpoint_loads_strictly_and_losslessly(name):
    checkpoint = synthetic_official_checkpoint(name)
    model = timm.create_model(name)
    model.load_state_dict(checkpoint, strict=True)
    assert vig.load_official_state_dict(model, {"model": checkpoint}) == {"dropped": []}
    for key, value in model.state_dict().items():
        assert torch.equal(value, checkpoint[key]), key


@pytest.mark.parametrize("container", ["model", "state_dict", "model_ema"])
def test_loader_unwraps_containers_and_ddp_prefix(container):
    checkpoint = synthetic_official_checkpoint("vig_tiny")
    wrapped = {container: {"module." + k: v for k, v in checkpoint.items()}, "epoch": 300}
    model = timm.create_model("vig_tiny")
    vig.load_official_state_dict(model, wrapped, use_ema=container == "model_ema")
    assert torch.equal(model.blocks[3].attn.qkv_proj.weight, checkpoint["blocks.3.attn.qkv_proj.weight"])


def test_vig_h_legacy_names_and_linear2d_weights_load():
    checkpoint = synthetic_official_checkpoint("vig_h_tiny")
    legacy = {}
    for key, value in checkpoint.items():
        key = key.replace("patch_embed.0.", "patch_embed.proj.").replace("patch_embed.2.", "patch_embed.norm.")
        key = key.replace(".blocks.0.norm.", ".blocks.0.ln_1.").replace(".op.", ".self_attention.")
        key = key.replace("classifier.norm.", "norm.").replace("classifier.head.", "head.")
        if key.endswith(("mlp.fc1.weight", "mlp.fc2.weight")):
            value = value[:, :, None, None]
        legacy[key] = value
    model = timm.create_model("vig_h_tiny")
    vig.load_official_state_dict(model, legacy)
    for key, value in model.state_dict().items():
        assert torch.equal(value, checkpoint[key]), key


def test_loader_drops_classifier_for_other_class_count_and_resizes_vim_pos_embed():
    checkpoint = synthetic_official_checkpoint("vim_tiny")
    model = timm.create_model("vim_tiny", num_classes=0, img_size=128)
    report = vig.load_official_state_dict(model, checkpoint)
    assert sorted(report["dropped"]) == ["head.bias", "head.weight"]
    assert model.pos_embed.shape == (1, 8 * 8 + 1, 192)
    # The class entry (index 98 of 197) goes to the middle of the new sequence (index 32 of 65).
    assert torch.equal(model.pos_embed[0, 32], checkpoint["pos_embed"][0, 98])


def test_headless_checkpoint_keeps_the_models_fresh_classifier():
    checkpoint = {k: v for k, v in synthetic_official_checkpoint("vig_tiny").items() if not k.startswith("head.")}
    model = timm.create_model("vig_tiny")
    head = model.head.weight.clone()
    assert vig.load_official_state_dict(model, checkpoint) == {"dropped": []}
    assert torch.equal(model.head.weight, head)
    assert torch.equal(model.norm.weight, checkpoint["norm.weight"])


@pytest.mark.parametrize("name", TINY)
def test_exported_tower_loads_for_finetuning_exactly_with_any_head(name, tmp_path):
    """The README's fine-tuning load: ``pretrained=True`` with the export as ``pretrained_cfg_overlay`` file."""
    torch.manual_seed(0)
    tower = timm.create_model(name, num_classes=0, img_size=64).eval()
    weights = export_timm(tower.state_dict(), name, tmp_path / "tower", img_size=64) / "model.safetensors"
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = tower(images)
        for num_classes in (1000, 10):  # 1000 is the registered class count, so timm would load strictly
            model = timm.create_model(name, pretrained=True, num_classes=num_classes,
                                      pretrained_cfg_overlay=dict(file=str(weights))).eval()
            assert model(images).shape == (2, num_classes)
            pooled = model.forward_head(model.forward_features(images), pre_logits=True)
            torch.testing.assert_close(pooled, expected, rtol=0, atol=0)
        gray = timm.create_model(name, pretrained=True, num_classes=3, in_chans=1,
                                 pretrained_cfg_overlay=dict(file=str(weights)))
        assert gray(images[:, :1]).shape == (2, 3)
    if name != "vig_h_tiny":
        resized = timm.create_model(name, pretrained=True, num_classes=0, img_size=96,
                                    pretrained_cfg_overlay=dict(file=str(weights)))
        assert resized.pos_grid == (6, 6) and resized.pos_embed.shape[1] == 36 + resized.num_prefix_tokens


def test_checkpoints_of_another_model_fail_naming_the_keys(tmp_path):
    tower = timm.create_model("vig_tiny", num_classes=0)
    prefixed = tmp_path / "open_clip_model.safetensors"
    open_clip_like = {"visual.trunk." + k: v.contiguous() for k, v in tower.state_dict().items()}
    open_clip_like.update({"logit_scale": torch.ones(()), "text.token_embedding.weight": torch.zeros(4, 2)})
    save_file(open_clip_like, str(prefixed))
    with pytest.raises(KeyError, match=r"178 missing keys.*under the prefix 'visual\.trunk\.'"):
        timm.create_model("vig_tiny", pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=str(prefixed)))
    deeper = tmp_path / "vig_h_small.safetensors"
    save_file(timm.create_model("vig_h_small", num_classes=0).state_dict(), str(deeper))
    with pytest.raises(KeyError, match=r"0 missing keys.*192 unexpected keys \['layers\.2\.blocks\.10\."):
        timm.create_model("vig_h_tiny", pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=str(deeper)))
    with pytest.raises(KeyError, match=r"does not fit Vim: \d+ missing keys \['cls_token'"):
        vig.load_official_state_dict(timm.create_model("vim_tiny"), synthetic_official_checkpoint("vig_tiny"))


@pytest.mark.parametrize("name", ["vig_tiny", "vim_tiny"])
def test_position_grid_taken_from_a_checkpoint(name, tmp_path):
    source = timm.create_model(name, num_classes=0, img_size=(64, 96))
    model = timm.create_model(name, num_classes=0)
    model.pos_embed.requires_grad_(False)
    with pytest.raises(ValueError, match="24 grid positions, not a square grid.*img_size"):
        model.load_state_dict(source.state_dict())
    model.load_state_dict({k: v.bfloat16() for k, v in timm.create_model(name, num_classes=0, img_size=64)
                           .state_dict().items()})
    assert model.pos_grid == (4, 4)
    assert model.pos_embed.dtype == torch.float32 and not model.pos_embed.requires_grad
    weights = tmp_path / "weights.pth"
    torch.save(source.state_dict(), weights)
    loaded = timm.create_model(name, num_classes=0, img_size=(64, 96), checkpoint_path=str(weights))
    assert torch.equal(loaded.pos_embed, source.pos_embed)


def test_pruned_and_unpooled_models_still_run():
    images = torch.randn(1, 3, 64, 64)
    vim = timm.create_model("vim_tiny", num_classes=0)
    vim.prune_intermediate_layers([0, 1], prune_norm=True)
    assert vim(images).shape == (1, 17, 192)  # pruning removes the pooling too: every token, class token included
    hier = timm.create_model("vig_h_tiny", num_classes=5, global_pool="")
    assert hier(images).shape == (1, 5, 2, 2)  # per-position logits, as timm's 1x1-conv heads give
    hier.prune_intermediate_layers([0, 1], prune_head=False)
    assert hier.num_features == 192 and isinstance(hier.layers[-1].downsample, torch.nn.Identity)
    maps = hier.forward_intermediates(images, output_fmt="NLC", intermediates_only=True)
    assert [tuple(m.shape) for m in maps] == [(1, 256, 96), (1, 64, 192)]
    with torch.device("meta"):
        for name in TINY:
            assert timm.create_model(name).head_hidden_size > 0


def test_vig_h_layer_groups_follow_the_order_of_computation():
    groups = timm.models.group_parameters(timm.create_model("vig_h_tiny"), timm.create_model("vig_h_tiny")
                                          .group_matcher(), reverse=False)
    order = {name: index for index, names in enumerate(groups.values()) for name in names}
    # Each stage's downsample runs after its last block and before the next stage's first (timm merges it into
    # the last block's group).
    assert order["layers.0.blocks.1.norm.weight"] <= order["layers.0.downsample.1.weight"]
    assert order["layers.0.blocks.0.norm.weight"] < order["layers.0.downsample.1.weight"]
    assert order["layers.0.downsample.1.weight"] < order["layers.1.blocks.0.norm.weight"]


def test_bad_state_dict_keys_are_named():
    checkpoint = synthetic_official_checkpoint("vig_tiny")
    checkpoint["blocks.0.attn.not_a_weight"] = checkpoint.pop("blocks.0.attn.o_proj.weight")
    with pytest.raises(KeyError, match=r"blocks\.0\.attn\.o_proj\.weight.*blocks\.0\.attn\.not_a_weight"):
        vig.load_official_state_dict(timm.create_model("vig_tiny"), checkpoint)
    checkpoint = synthetic_official_checkpoint("vig_tiny")
    checkpoint["norm.weight"] = torch.ones(7)
    with pytest.raises(ValueError, match=r"norm\.weight"):
        vig.load_official_state_dict(timm.create_model("vig_tiny"), checkpoint)
    with pytest.raises(KeyError, match="no state dict"):
        vig.load_official_state_dict(timm.create_model("vig_tiny"), {"epoch": 3, "args": "x"})


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("size", [224, 256, 320])
@pytest.mark.parametrize("batch", [1, 3])
def test_forward_backward_at_several_resolutions(name, size, batch):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    logits = model(torch.randn(batch, 3, size, size))
    assert logits.shape == (batch, 10) and torch.isfinite(logits).all()
    logits.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


@pytest.mark.parametrize("name", TINY)
def test_resolution_changes_between_calls_without_rebuilding(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=0).eval()
    small = torch.randn(2, 3, 128, 128)
    before = model(small)
    assert model(torch.randn(2, 3, 192, 160)).shape == before.shape
    assert torch.allclose(model(small), before)
    # Each image is processed independently of the batch it is in.
    assert torch.allclose(model(small[:1]), before[:1], atol=1e-5)


def test_vig_pos_embed_is_resized_bicubically_only_when_the_grid_differs():
    model = timm.create_model("vig_tiny")
    _, grid = model.patch_embed(torch.zeros(1, 3, 224, 224))
    assert grid == model.pos_grid == (14, 14)
    tokens, grid = model.embed(torch.zeros(1, 3, 320, 256))
    assert grid == (20, 16)
    stem, _ = model.patch_embed(torch.zeros(1, 3, 320, 256))
    table = model.pos_embed.reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(table, size=(20, 16), mode="bicubic", align_corners=False)
    assert torch.allclose(tokens - stem, expected.flatten(2).transpose(1, 2), atol=1e-6)


def test_vim_position_embedding_keeps_the_class_entry_in_the_middle():
    model = timm.create_model("vim_tiny")
    assert model.position_embedding((14, 14)) is model.pos_embed
    resized = model.position_embedding((10, 12))
    assert resized.shape == (1, 121, 192)
    assert torch.equal(resized[0, 60], model.pos_embed[0, 98])


@pytest.mark.parametrize("name, reductions, channels", [
    ("vig_tiny", [16] * 4, [192] * 4),
    ("vig_h_tiny", [4, 8, 16, 32], [96, 192, 384, 768]),
    ("vim_tiny", [16] * 4, [192] * 4),
])
def test_features_only_strides_and_channels(name, reductions, channels):
    model = timm.create_model(name, features_only=True)
    assert model.feature_info.reduction() == reductions
    assert model.feature_info.channels() == channels
    features = model(torch.randn(2, 3, 128, 96))
    assert [f.shape for f in features] == [(2, c, 128 // r, 96 // r) for c, r in zip(channels, reductions)]


@pytest.mark.parametrize("name", TINY)
def test_timm_model_contract(name, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7, drop_path_rate=0.1).eval()
    images = torch.randn(2, 3, 64, 64)
    logits = model(images)
    pooled = model.forward_head(model.forward_features(images), pre_logits=True)
    assert pooled.shape == (2, model.num_features)
    assert torch.allclose(model.get_classifier()(pooled), logits, atol=1e-5)

    final, intermediates = model.forward_intermediates(images, indices=2)
    assert len(intermediates) == 2 and all(f.dim() == 4 for f in intermediates)
    assert torch.allclose(model.forward_head(final), logits, atol=1e-5)

    path = tmp_path / "weights.pth"
    torch.save(model.state_dict(), path)
    reloaded = timm.create_model(name, num_classes=7, checkpoint_path=str(path)).eval()
    assert torch.equal(reloaded(images), logits)

    model.reset_classifier(0)
    assert torch.allclose(model(images), pooled, atol=1e-5)
    model.reset_classifier(3)
    assert model(images).shape == (2, 3)
    assert model.no_weight_decay() <= {n for n, _ in model.named_parameters()}
    assert model.group_matcher()


@pytest.mark.parametrize("name", TINY)
def test_feature_taps_in_training_draw_no_stochastic_depth_of_their_own(name):
    one_block_stages = dict(depths=(1, 1, 1, 1)) if name == "vig_h_tiny" else {}
    model = timm.create_model(name, num_classes=0, drop_path_rate=0.5, **one_block_stages).train()
    images = torch.randn(4, 3, 64, 64)
    # The first block's output is never dropped (stochastic depth rises from 0), so its tap is the same whatever
    # the random state; taps must not consume random numbers, so the last output matches forward_features.
    first = [model.forward_intermediates(images, indices=[0], norm=True, intermediates_only=True)[0]
             for _ in range(2)]
    assert torch.equal(*first)
    torch.manual_seed(1)
    final, _ = model.forward_intermediates(images, indices=[0, 1], norm=True)
    torch.manual_seed(1)
    assert torch.equal(final, model.forward_features(images))


@pytest.mark.parametrize("name", TINY)
def test_gradient_checkpointing_gives_the_same_gradients(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=4)
    images = torch.randn(2, 3, 64, 64)
    model(images).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(images).sum().backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, expected[n], atol=1e-5, rtol=1e-4), n


@pytest.mark.parametrize("name", TINY)
def test_in_chans_and_train_eval_compute_the_same_function(name):
    torch.manual_seed(0)
    model = timm.create_model(name, in_chans=1, num_classes=5)
    gray = torch.randn(2, 1, 64, 64)
    train_out = model.train()(gray)
    assert torch.allclose(model.eval()(gray), train_out, atol=1e-6)


@pytest.mark.parametrize("name", TINY)
def test_bad_inputs_are_named(name):
    model = timm.create_model(name)
    with pytest.raises(ValueError, match="expects 3 input channels, got 1"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="divisible by its stride"):
        model(torch.randn(1, 3, 64, 72))
    with pytest.raises(ValueError, match=r"image batch \[B, C, H, W\]"):
        model(torch.randn(3, 64, 64))


def test_unknown_model_name_is_named():
    with pytest.raises(RuntimeError, match="vig_tinny"):
        timm.create_model("vig_tinny")


def test_registration_under_official_vim_names():
    long_name = "vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"
    assert num_params(timm.create_model(long_name)) == WITH_HEAD["vim_small"]
    assert set(vig.MODEL_NAMES) <= set(timm.list_models("vi[gm]_*"))


def test_model_cost_counts_mixers_and_the_swiglu_down_projection():
    vig_t = vig.model_cost(timm.create_model("vig_tiny"))
    assert vig_t["params"] == WITH_HEAD["vig_tiny"]
    # Published (fvcore) convention vs full count, architecture.md §6.6: 0.88 G vs 1.20 G.
    assert round(vig_t["fvcore_style_macs"] / 1e9, 2) == 0.88
    assert round(vig_t["macs"] / 1e9, 2) == 1.20
    down_proj = 12 * 196 * 512 * 192
    gla = 12 * 2 * 196 * 3 * 3 * 32 * 64
    assert vig_t["macs"] - vig_t["fvcore_style_macs"] == down_proj + gla
    deit_s = vig.model_cost(timm.create_model("deit_small_patch16_224"))
    assert deit_s["macs"] == deit_s["fvcore_style_macs"] and math.isclose(deit_s["macs"] / 1e9, 4.6, abs_tol=0.01)
