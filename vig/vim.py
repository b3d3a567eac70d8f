"""Vim: Vision Mamba with bidirectional ("v2") Mamba mixers and a middle class token.

Paper: "Vision Mamba: Efficient Visual Representation Learning with Bidirectional State Space Model"
(arXiv 2401.09417). Official code: https://github.com/hustvl/Vim. Parameter names follow the official
state dicts of the ``*_midclstok_div2`` models, so released checkpoints load with ``strict=True``.

Differences from the official code, documented in ``docs/models.md``: no CUDA extensions (the scan is
``vig_kernels.bi_selective_scan``; the backward direction's causal conv on the flipped sequence is computed as
the equivalent anti-causal conv, so nothing is flipped), and any input size divisible by 16 works
(``pos_embed`` is resized around the class-token entry; the official model asserts 224).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from functools import partial

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    DropPath,
    PatchEmbed,
    lecun_normal_,
    resample_abs_pos_embed,
    trunc_normal_,
)
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

import vig_kernels

from ._common import adopt_position_grid, check_input, first_conv_weights, fit_checkpoint, fp32_or_wider, square_grid

__all__ = ["Vim", "BiMambaMixer"]


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int]) -> torch.Tensor:
    """Resize ``[1, M + 1, D]`` position embeddings with the class entry at ``M // 2``: the class entry is
    taken out, the M grid entries are resized bicubically (in fp32) and the class entry goes back at the
    new middle."""
    stored_cls = (pos_embed.shape[1] - 1) // 2
    patches = torch.cat([pos_embed[:, :stored_cls], pos_embed[:, stored_cls + 1:]], dim=1)
    patches = resample_abs_pos_embed(patches, list(new_grid), list(old_grid), num_prefix_tokens=0, antialias=False)
    middle = patches.shape[1] // 2
    return torch.cat([patches[:, :middle], pos_embed[:, stored_cls:stored_cls + 1], patches[:, middle:]], dim=1)


class BiMambaMixer(nn.Module):
    """Mamba mixer with ``bimamba_type="v2"``: shared in/out projections, per-direction conv and SSM."""

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4):
        super().__init__()
        inner = expand * dim
        self.inner_dim, self.d_state, self.dt_rank = inner, d_state, math.ceil(dim / 16)
        self.in_proj = nn.Linear(dim, 2 * inner, bias=False)
        self.conv1d = nn.Conv1d(inner, inner, d_conv, groups=inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, inner, bias=True)
        self.conv1d_b = nn.Conv1d(inner, inner, d_conv, groups=inner, padding=d_conv - 1)
        self.x_proj_b = nn.Linear(inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj_b = nn.Linear(self.dt_rank, inner, bias=True)
        s4d_real = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(inner, 1)
        self.A_log = nn.Parameter(s4d_real.clone())
        self.A_b_log = nn.Parameter(s4d_real.clone())
        self.D = nn.Parameter(torch.ones(inner))
        self.D_b = nn.Parameter(torch.ones(inner))
        self.out_proj = nn.Linear(inner, dim, bias=False)
        for dt_proj in (self.dt_proj, self.dt_proj_b):
            bound = self.dt_rank ** -0.5
            nn.init.uniform_(dt_proj.weight, -bound, bound)
            log_dt = torch.rand(inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
            dt = log_dt.exp().clamp(min=dt_init_floor)
            with torch.no_grad():
                dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus

    def _direction(self, u: torch.Tensor, x_proj: nn.Linear, dt_proj: nn.Linear):
        """Step sizes and input/output projections of one direction from its conv output ``u`` [B, T, E]."""
        low_rank, B, C = x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        # The step is formed in fp32 as in the official scan (bias and softplus applied inside the kernel).
        delta = F.softplus(fp32_or_wider(F.linear(low_rank, dt_proj.weight)) + fp32_or_wider(dt_proj.bias))
        return delta, B, C

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        length = hidden.shape[1]
        x, z = self.in_proj(hidden).chunk(2, dim=-1)
        x = x.transpose(1, 2)
        groups = self.inner_dim
        u_fwd = F.conv1d(x, self.conv1d.weight, self.conv1d.bias, padding=self.conv1d.padding, groups=groups)
        # Official: causal conv on the flipped sequence; in natural order that is an anti-causal conv with
        # the kernel reversed.
        u_bwd = F.conv1d(F.pad(x, (0, self.conv1d_b.kernel_size[0] - 1)), self.conv1d_b.weight.flip(-1),
                         self.conv1d_b.bias, groups=groups)
        u_fwd = F.silu(u_fwd[..., :length]).transpose(1, 2)
        u_bwd = F.silu(u_bwd).transpose(1, 2)
        delta_fwd, B_fwd, C_fwd = self._direction(u_fwd, self.x_proj, self.dt_proj)
        delta_bwd, B_bwd, C_bwd = self._direction(u_bwd, self.x_proj_b, self.dt_proj_b)
        A = -fp32_or_wider(torch.stack([self.A_log, self.A_b_log])).exp()
        y = vig_kernels.bi_selective_scan(torch.stack([u_fwd, u_bwd]), torch.stack([delta_fwd, delta_bwd]), A,
                                      torch.stack([B_fwd, B_bwd]), torch.stack([C_fwd, C_bwd]),
                                      fp32_or_wider(torch.stack([self.D, self.D_b])))
        return self.out_proj(y * F.silu(z))


class VimLayer(nn.Module):
    """Add -> RMSNorm -> mixer, with the residual stream kept in fp32 (official ``residual_in_fp32``).

    ``drop_path`` acts on the *incoming* mixer output, i.e. the previous layer's, as in the official code.
    """

    def __init__(self, dim: int, drop_path: float = 0.0):
        super().__init__()
        self.mixer = BiMambaMixer(dim)
        self.norm = nn.RMSNorm(dim, eps=1e-5)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        residual = fp32_or_wider(hidden) if residual is None else residual + fp32_or_wider(self.drop_path(hidden))
        return self.mixer(self.norm(residual.to(self.norm.weight.dtype))), residual


class Vim(nn.Module):
    """Vision Mamba: 16x16 patches, class token in the middle of the sequence, 24 bidirectional layers."""

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "token", embed_dim: int = 192, depth: int = 24,
                 drop_rate: float = 0.0, pos_drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        if global_pool not in ("token", "avg", ""):
            raise ValueError(f"Vim supports global_pool 'token' (middle class token), 'avg' or '', got {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, strict_img_size=False)
        self.pos_grid = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.pos_grid[0] * self.pos_grid[1] + 1, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        incoming_rates = [0.0] + rates
        self.layers = nn.ModuleList(VimLayer(embed_dim, drop_path=incoming_rates[i]) for i in range(depth))
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.norm_f = nn.RMSNorm(embed_dim, eps=1e-5)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f"layers.{i}") for i in range(depth)]
        self._init_weights(depth)

    def _init_weights(self, depth: int) -> None:
        lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for layer in self.layers:
            # GPT-2 style: one residual branch per layer, scaled by 1/sqrt(depth).
            out_proj = layer.mixer.out_proj.weight
            nn.init.kaiming_uniform_(out_proj, a=math.sqrt(5))
            with torch.no_grad():
                out_proj.div_(math.sqrt(depth))

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        names = {"pos_embed", "cls_token"}
        for name, _ in self.named_parameters():
            if name.rsplit(".", 1)[-1] in ("A_log", "A_b_log", "D", "D_b"):
                names.add(name)
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed",
                    blocks=[(r"^layers\.(\d+)", None), (r"^norm_f", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in ("token", "avg", ""):
                raise ValueError(f"Vim supports global_pool 'token', 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint trained at another resolution brings its own position grid (plus the class entry).
        adopt_position_grid(self, state_dict.get(prefix + "pos_embed"), prefix_tokens=1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.jit.ignore
    def set_input_size(self, img_size: int | tuple[int, int] | None = None, patch_size: int | None = None) -> None:
        """Resample the stored ``pos_embed`` (around its class-token entry) to ``img_size`` once, instead of on
        every call (timm's API; open_clip calls it for ``force_image_size``)."""
        if patch_size not in (None, self.patch_size):
            raise ValueError(f"Vim's patch size is fixed at {self.patch_size}, got {patch_size}")
        if img_size is None:
            return
        height, width = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        grid = (height // self.patch_size, width // self.patch_size)
        if tuple(grid) != tuple(self.pos_grid):
            self.pos_embed = nn.Parameter(resize_pos_embed(self.pos_embed.data, grid, self.pos_grid))
            self.pos_grid = grid
        self.pretrained_cfg = {**getattr(self, "pretrained_cfg", {}), "input_size": (self.in_chans, height, width)}

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """``pos_embed`` for a token grid (resized when it differs from the stored one)."""
        if tuple(grid) == tuple(self.pos_grid):
            return self.pos_embed
        return resize_pos_embed(self.pos_embed, grid, self.pos_grid)

    def embed_parts(self, x: torch.Tensor, mask: torch.Tensor | None = None, mask_token: torch.Tensor | None = None):
        """Patch tokens [B, M, D] and the class token [B, 1, D], each with its position embedding, and the
        grid. Patches where ``mask`` ([B, M], True = hidden) is set become ``mask_token`` first."""
        check_input(x, self.in_chans, self.patch_size, type(self).__name__)
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        x = self.patch_embed(x)
        if mask is not None:
            x = torch.where(mask.unsqueeze(-1), mask_token.to(x.dtype), x)
        pos_embed = self.position_embedding(grid)
        middle = x.shape[1] // 2
        patches = x + torch.cat([pos_embed[:, :middle], pos_embed[:, middle + 1:]], dim=1)
        cls = (self.cls_token + pos_embed[:, middle:middle + 1]).expand(x.shape[0], -1, -1).to(x.dtype)
        return self.pos_drop(patches), self.pos_drop(cls), grid

    @staticmethod
    def insert_middle(patches: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        middle = patches.shape[1] // 2
        return torch.cat([patches[:, :middle], cls, patches[:, middle:]], dim=1)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patches with the class token inserted at index ``M // 2`` and position embedding added."""
        patches, cls, grid = self.embed_parts(x)
        return self.insert_middle(patches, cls), grid

    def encode_sequence(self, hidden: torch.Tensor) -> torch.Tensor:
        """All layers and the final norm on an embedded sequence of any length."""
        residual = None
        for layer in self.layers:
            hidden, residual = self.run_layer(layer, hidden, residual)
        return self.final_norm(hidden, residual)

    def forward_visible(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Encode only the patches at ``keep`` ([B, L] ascending raster indices), in raster order, with the
        class token in the middle of the visible sequence. Returns normalised patch tokens [B, L, D]."""
        patches, cls, _ = self.embed_parts(x)
        patches = patches.gather(1, keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        out = self.encode_sequence(self.insert_middle(patches, cls))
        middle = patches.shape[1] // 2
        return torch.cat([out[:, :middle], out[:, middle + 1:]], dim=1)

    def forward_mask_tokens(self, x: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
        """Encode all patches with hidden ones replaced by ``mask_token``; normalised patch tokens [B, M, D]."""
        patches, cls, _ = self.embed_parts(x, mask, mask_token)
        out = self.encode_sequence(self.insert_middle(patches, cls))
        middle = patches.shape[1] // 2
        return torch.cat([out[:, :middle], out[:, middle + 1:]], dim=1)

    def run_layer(self, layer: VimLayer, hidden: torch.Tensor, residual: torch.Tensor | None):
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(layer, hidden, residual, use_reentrant=False)
        return layer(hidden, residual)

    def final_norm(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.norm_stream(residual + fp32_or_wider(self.drop_path(hidden)))

    def norm_stream(self, stream: torch.Tensor) -> torch.Tensor:
        weight = getattr(self.norm_f, "weight", None)  # None once prune_intermediate_layers removed the norm
        return self.norm_f(stream if weight is None else stream.to(weight.dtype))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised tokens ``[B, M + 1, D]`` with the class token at index ``M // 2``."""
        return self.encode_sequence(self.embed(x)[0])

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        middle = (x.shape[1] - 1) // 2
        if self.global_pool == "token":
            x = x[:, middle]
        elif self.global_pool == "avg":
            x = torch.cat([x[:, :middle], x[:, middle + 1:]], dim=1).mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """Residual-stream values after the chosen layers, class token removed, as NCHW maps or NLC tokens."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        hidden, grid = self.embed(x)
        middle = grid[0] * grid[1] // 2
        last = len(self.layers) - 1
        stop = max_index if stop_early else last
        residual, intermediates = None, []

        def tap(stream):
            y = self.norm_stream(stream) if norm else stream
            y = torch.cat([y[:, :middle], y[:, middle + 1:]], dim=1).to(hidden.dtype)
            intermediates.append(y.transpose(1, 2).reshape(y.shape[0], -1, *grid) if output_fmt == "NCHW" else y)

        # Layer i's output joins the residual stream inside layer i + 1, through that layer's stochastic depth, so
        # the tap after layer i is the stream layer i + 1 returns: the sample the network trains with.
        for i, layer in enumerate(self.layers[:stop + 1]):
            hidden, residual = self.run_layer(layer, hidden, residual)
            if i - 1 in take_indices:
                tap(residual)
        following_drop_path = self.layers[stop + 1].drop_path if stop < last else self.drop_path
        stream = residual + fp32_or_wider(following_drop_path(hidden))
        if stop in take_indices:
            tap(stream)
        if intermediates_only:
            return intermediates
        return self.norm_stream(stream), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[:max_index + 1]
        if prune_norm:
            self.norm_f = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


def map_official_keys(state_dict: Mapping[str, torch.Tensor], model: Vim) -> dict[str, torch.Tensor]:
    """Official Vim names onto this implementation's: they are identical."""
    return dict(state_dict)


def resample_to_model_grid(state_dict: dict[str, torch.Tensor], model: Vim) -> dict[str, torch.Tensor]:
    """A checkpoint's ``pos_embed`` of another (square) grid, resized to the model's around its class entry."""
    stored = state_dict.get("pos_embed")
    if stored is not None and stored.shape != model.pos_embed.shape:
        grid = square_grid(stored.shape[1] - 1, type(model).__name__)
        state_dict["pos_embed"] = resize_pos_embed(stored, model.pos_grid, grid)
    return state_dict


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: Vim,
                         img_size: int | tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """timm's pretrained filter: the classifier fitted to ``num_classes`` and every other key checked
    (``fit_checkpoint``). ``img_size`` is the ``create_model`` argument: when given, a ``pos_embed`` of another grid
    is resampled to it once (around its class entry), as timm does; when not, the model adopts the checkpoint's
    grid, which is lossless."""
    # timm adapts the stem to another in_chans after this filter.
    state_dict, _ = fit_checkpoint(map_official_keys(state_dict, model), model,
                                   shape_may_differ=first_conv_weights(model))
    return resample_to_model_grid(state_dict, model) if img_size is not None else state_dict


def _create(variant: str, pretrained: bool = False, **kwargs) -> Vim:
    out_indices = kwargs.pop("out_indices", (5, 11, 17, 23))
    return build_model_with_cfg(Vim, variant, pretrained,
                                pretrained_filter_fn=partial(checkpoint_filter_fn, img_size=kwargs.get("img_size")),
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs)


def _cfg(**kwargs) -> dict:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.875,
        "interpolation": "bicubic", "fixed_input_size": False, "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_embed.proj", "classifier": "head",
        "paper_ids": "arXiv:2401.09417", "origin_url": "https://github.com/hustvl/Vim", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "vim_tiny.in1k": _cfg(),
    "vim_small.in1k": _cfg(),
    "vim_base.in1k": _cfg(),
})


@register_model
def vim_tiny(pretrained: bool = False, **kwargs) -> Vim:
    """Vim-T: width 192, 24 layers (7.15 M parameters)."""
    return _create("vim_tiny", pretrained, **dict(dict(embed_dim=192, depth=24), **kwargs))


@register_model
def vim_small(pretrained: bool = False, **kwargs) -> Vim:
    """Vim-S: width 384, 24 layers (25.8 M parameters)."""
    return _create("vim_small", pretrained, **dict(dict(embed_dim=384, depth=24), **kwargs))


@register_model
def vim_base(pretrained: bool = False, **kwargs) -> Vim:
    """Vim-B: width 768, 24 layers (97.6 M parameters)."""
    return _create("vim_base", pretrained, **dict(dict(embed_dim=768, depth=24), **kwargs))


@register_model
def vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2(pretrained=False, **kwargs):
    """The official registration name of Vim-T (same model as ``vim_tiny``)."""
    return vim_tiny(pretrained, **kwargs)


@register_model
def vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2(pretrained=False, **kwargs):
    """The official registration name of Vim-S (same model as ``vim_small``)."""
    return vim_small(pretrained, **kwargs)


@register_model
def vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2(pretrained=False,
                                                                                            **kwargs):
    """The official registration name of Vim-B (same model as ``vim_base``)."""
    return vim_base(pretrained, **kwargs)
