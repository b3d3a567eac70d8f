"""ViG and ViG-H: vision backbones built on bidirectional gated linear attention.

Paper: "ViG: Linear-complexity Visual Sequence Learning with Gated Linear Attention" (arXiv 2405.18425).
Official code: https://github.com/hustvl/ViG. Module and parameter names follow the official state dicts,
so released checkpoints load with ``strict=True`` (ViG-H's legacy names go through ``checkpoint_filter_fn``).

Two deliberate differences from the official code, both documented in ``docs/models.md``:
* training and evaluation run the same token mixer (``vig_kernels.bigla``), which has a backward pass; the
  official eval kernel has none and divides the plain-ViG output by 2 twice (only visible through eps);
* every input size divisible by the output stride works, and ``pos_embed`` is resized per call.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from functools import partial

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    DropPath,
    GluMlp,
    LayerNorm2d,
    resample_abs_pos_embed,
    trunc_normal_,
)
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

import vig_kernels

from ._common import (
    Permute,
    adopt_position_grid,
    check_input,
    first_conv_weights,
    fit_checkpoint,
    fp32_or_wider,
    square_grid,
)

__all__ = ["ViG", "HierViG", "BiGLAMixer"]


class BiGLAMixer(nn.Module):
    """ViG's token mixer (official class ``GatedLinearAttention`` / ``GLA2D``).

    A 3x3 depthwise convolution on the token grid gives ``u``; q, k, v and two direction-wise forget gates
    (a shared 16-wide bottleneck, one half of the output per direction) are projected from ``u``; the
    bidirectional GLA output and a per-head normalised copy of ``u`` are mixed by a sigmoid gate.
    """

    def __init__(self, dim: int, num_heads: int, act_in_conv: bool = False, out_act: bool = False,
                 gate_low_rank_dim: int = 16, gate_logit_normalizer: float = 16.0, norm_eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = dim // 2
        self.gate_logit_normalizer = gate_logit_normalizer
        head_value_dim = dim // num_heads
        self.in_proj = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False),
                                     nn.SiLU() if act_in_conv else nn.Identity())
        self.qkv_proj = nn.Linear(dim, 2 * self.key_dim + dim, bias=False)
        self.gk_proj = nn.Sequential(nn.Linear(dim, gate_low_rank_dim, bias=False),
                                     nn.Linear(gate_low_rank_dim, 2 * self.key_dim, bias=True))
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.g_norm = nn.RMSNorm(head_value_dim, eps=norm_eps)
        self.l_norm = nn.RMSNorm(head_value_dim, eps=norm_eps)
        self.g_proj = nn.Linear(dim, dim, bias=True)
        self.out_act = nn.SiLU() if out_act else nn.Identity()

    def reset_parameters(self) -> None:
        gain = 2 ** -2.5
        for module in (self.in_proj[0], self.qkv_proj, self.g_proj, self.o_proj, *self.gk_proj):
            nn.init.xavier_uniform_(module.weight, gain=gain)

    def local_mix(self, x: torch.Tensor, grid: tuple[int, int], keep: torch.Tensor | None = None) -> torch.Tensor:
        """The depthwise 3x3 convolution on the raster-ordered token grid.

        With ``keep`` ([B, L] ascending grid indices of the tokens in ``x``), the tokens are scattered into a
        zero grid first, so hidden positions contribute nothing (a sparse convolution, as in SparK).
        """
        batch, _, dim = x.shape
        if keep is not None:
            index = keep.unsqueeze(-1).expand(-1, -1, dim)
            x = x.new_zeros(batch, grid[0] * grid[1], dim).scatter(1, index, x)
        x = self.in_proj(x.transpose(1, 2).reshape(batch, dim, *grid)).flatten(2).transpose(1, 2)
        return x if keep is None else x.gather(1, index)

    def forward(self, x: torch.Tensor, grid: tuple[int, int], keep: torch.Tensor | None = None) -> torch.Tensor:
        u = self.local_mix(x, grid, keep)
        q, k, v = self.qkv_proj(u).split([self.key_dim, self.key_dim, u.shape[-1]], dim=-1)
        # Log-space gates in fp32: logsigmoid has no lower bound and the kernels assume g <= 0 exactly.
        gates = F.logsigmoid(fp32_or_wider(self.gk_proj(u))) / self.gate_logit_normalizer
        g_fwd, g_bwd = gates.chunk(2, dim=-1)
        per_head = partial(torch.unflatten, dim=-1, sizes=(self.num_heads, -1))
        o = vig_kernels.bigla(per_head(q), per_head(k), per_head(v), per_head(g_fwd), per_head(g_bwd))
        mix = torch.sigmoid(self.g_proj(u)).unflatten(-1, (self.num_heads, -1))
        y = mix * self.g_norm(o) + (1 - mix) * self.l_norm(per_head(u))
        return self.o_proj(self.out_act(y.flatten(2)))


class SwiGLU(nn.Module):
    """SwiGLU feed-forward with ViG's parameter names: the first half of ``gate_proj`` is the gate."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, 2 * hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.gate_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * value)


class GLABlock(nn.Module):
    """Pre-norm block of plain ViG: RMSNorm -> BiGLA mixer, RMSNorm -> SwiGLU."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden_dim: int, act_in_conv: bool, out_act: bool,
                 drop_path: float = 0.0):
        super().__init__()
        self.attn_norm = nn.RMSNorm(dim, eps=1e-6)
        self.attn = BiGLAMixer(dim, num_heads, act_in_conv=act_in_conv, out_act=out_act)
        self.mlp_norm = nn.RMSNorm(dim, eps=1e-6)
        self.mlp = SwiGLU(dim, mlp_hidden_dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: tuple[int, int], keep: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.attn_norm(x), grid, keep))
        return x + self.drop_path(self.mlp(self.mlp_norm(x)))


class OverlapPatchEmbed(nn.Module):
    """ViG's stem (official ``V2PatchEmbed``): conv k9 s8 -> LN -> SiLU -> conv k3 s2 -> LN, stride 16."""

    def __init__(self, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 2, kernel_size=9, stride=8, padding=1),
            LayerNorm2d(embed_dim // 2, eps=1e-5),
            nn.SiLU(),
            nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=3, stride=2, padding=1),
            LayerNorm2d(embed_dim, eps=1e-5),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2), (x.shape[-2], x.shape[-1])


def swiglu_hidden_dim(dim: int, multiple_of: int) -> int:
    """The official rule: 8/3 of the width, rounded up to a multiple."""
    return multiple_of * math.ceil(int(8 * dim / 3) / multiple_of)


class ViG(nn.Module):
    """Plain (isotropic) ViG: overlapping stem, absolute position embedding, 12 GLA blocks, average pool."""

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "avg", embed_dim: int = 192, depth: int = 12,
                 num_heads: int = 3, mlp_hidden_dim: int | None = None, act_in_conv: bool = True,
                 out_act: bool = True, drop_rate: float = 0.0, pos_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0):
        super().__init__()
        if patch_size != 16:
            raise ValueError(f"ViG's stem has a fixed stride of 16, got patch_size={patch_size}")
        if global_pool not in ("avg", ""):
            raise ValueError(f"ViG supports global_pool 'avg' or '' (no pooling), got {global_pool!r}")
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 0
        self.grad_checkpointing = False
        mlp_hidden_dim = mlp_hidden_dim or swiglu_hidden_dim(embed_dim, 256)

        self.patch_embed = OverlapPatchEmbed(in_chans, embed_dim)
        self.pos_grid = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.pos_grid[0] * self.pos_grid[1], embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            GLABlock(embed_dim, num_heads, mlp_hidden_dim, act_in_conv, out_act, drop_path=rate) for rate in rates)
        self.norm = nn.RMSNorm(embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f"blocks.{i}") for i in range(depth)]
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for block in self.blocks:
            block.attn.reset_parameters()
        trunc_normal_(self.pos_embed, std=0.02)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^pos_embed|^patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"ViG supports global_pool 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint trained at another resolution brings its own position grid (open_clip cannot pass img_size
        # to timm towers).
        adopt_position_grid(self, state_dict.get(prefix + "pos_embed"), prefix_tokens=0)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.jit.ignore
    def set_input_size(self, img_size: int | tuple[int, int] | None = None, patch_size: int | None = None) -> None:
        """Resample the stored ``pos_embed`` to ``img_size`` once, instead of on every call (timm's API; open_clip
        calls it for ``force_image_size``)."""
        if patch_size not in (None, self.patch_size):
            raise ValueError(f"ViG's patch size is fixed at {self.patch_size}, got {patch_size}")
        if img_size is None:
            return
        height, width = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        grid = (height // self.patch_size, width // self.patch_size)
        if grid != self.pos_grid:
            resized = resample_abs_pos_embed(self.pos_embed.data, list(grid), list(self.pos_grid), num_prefix_tokens=0,
                                             antialias=False)
            self.pos_embed = nn.Parameter(resized)
            self.pos_grid = grid
        self.pretrained_cfg = {**getattr(self, "pretrained_cfg", {}), "input_size": (self.in_chans, height, width)}

    def embed(self, x: torch.Tensor, mask: torch.Tensor | None = None,
              mask_token: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """Stem plus position embedding (resized when the grid differs from the stored one); tokens where
        ``mask`` ([B, N], True = hidden) is set are replaced by ``mask_token`` before the position embedding."""
        check_input(x, self.in_chans, self.patch_size, type(self).__name__)
        x, grid = self.patch_embed(x)
        if mask is not None:
            x = torch.where(mask.unsqueeze(-1), mask_token.to(x.dtype), x)
        pos_embed = self.pos_embed
        if grid != self.pos_grid:
            pos_embed = resample_abs_pos_embed(pos_embed, list(grid), list(self.pos_grid), num_prefix_tokens=0,
                                               antialias=False)
        return self.pos_drop(x + pos_embed), grid

    def run_block(self, block: nn.Module, x: torch.Tensor, grid: tuple[int, int],
                  keep: torch.Tensor | None = None) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, grid, keep, use_reentrant=False)
        return block(x, grid, keep)

    def forward_visible(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Encode only the tokens at ``keep`` ([B, L] ascending raster indices), in raster order, with the
        dwconv on the sparse grid. Returns normalised tokens [B, L, C] (MAE's order-preserving encoder)."""
        x, grid = self.embed(x)
        x = x.gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        for block in self.blocks:
            x = self.run_block(block, x, grid, keep)
        return self.norm(x)

    def forward_mask_tokens(self, x: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
        """Encode the full grid with hidden tokens ([B, N] ``mask``) replaced by ``mask_token`` (SimMIM-style).
        Returns normalised tokens [B, N, C]."""
        x, grid = self.embed(x, mask, mask_token)
        for block in self.blocks:
            x = self.run_block(block, x, grid)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, grid = self.embed(x)
        for block in self.blocks:
            x = self.run_block(block, x, grid)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """Block outputs as ``NCHW`` maps (or ``NLC`` tokens), timm's contract for dense features."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x, grid = self.embed(x)
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, block in enumerate(blocks):
            x = self.run_block(block, x, grid)
            if i in take_indices:
                y = self.norm(x) if norm else x
                intermediates.append(y.transpose(1, 2).reshape(y.shape[0], -1, *grid) if output_fmt == "NCHW" else y)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


class HierViGBlock(nn.Module):
    """ViG-H block (official ``VSSBlock``): LayerNorm -> BiGLA mixer, LayerNorm -> SwiGLU (``fc1``/``fc2``)."""

    def __init__(self, dim: int, mlp_hidden_dim: int, drop_path: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.op = BiGLAMixer(dim, num_heads=dim // 32)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = GluMlp(dim, 2 * mlp_hidden_dim, act_layer=nn.SiLU, bias=False, gate_last=False)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.op(self.norm(x), grid))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class HierViGStage(nn.Module):
    """Blocks at one resolution, then (except in the last stage) a stride-2 conv that doubles the width."""

    def __init__(self, dim: int, depth: int, drop_path: list[float], downsample: bool):
        super().__init__()
        hidden = swiglu_hidden_dim(dim, 32)
        self.blocks = nn.ModuleList(HierViGBlock(dim, hidden, drop_path=rate) for rate in drop_path[:depth])
        self.downsample = nn.Sequential(
            Permute(0, 3, 1, 2), nn.Conv2d(dim, 2 * dim, kernel_size=3, stride=2, padding=1),
            Permute(0, 2, 3, 1), nn.LayerNorm(2 * dim, eps=1e-5),
        ) if downsample else nn.Identity()


class ClassifierHead(nn.Module):
    """ViG-H's ``classifier``: LayerNorm over channels, global average pool, linear head."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()


class HierViG(nn.Module):
    """Hierarchical ViG (ViG-H): four stages at strides 4, 8, 16, 32, no position embedding."""

    def __init__(self, img_size: int | tuple[int, int] = 224, in_chans: int = 3, num_classes: int = 1000,
                 global_pool: str = "avg", depths: tuple[int, ...] = (2, 2, 5, 2),
                 dims: tuple[int, ...] = (96, 192, 384, 768), drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0):
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"ViG-H supports global_pool 'avg' or '' (no pooling), got {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.patch_size = 2 ** (len(depths) + 1)
        self.num_features = self.head_hidden_size = dims[-1]
        self.embed_dim = dims[0]
        self.grad_checkpointing = False
        stem_dim = dims[0] // 2
        self.patch_embed = nn.Sequential(
            nn.Conv2d(in_chans, stem_dim, kernel_size=3, stride=2, padding=1), Permute(0, 2, 3, 1),
            nn.LayerNorm(stem_dim, eps=1e-5), Permute(0, 3, 1, 2), nn.GELU(),
            nn.Conv2d(stem_dim, dims[0], kernel_size=3, stride=2, padding=1), Permute(0, 2, 3, 1),
            nn.LayerNorm(dims[0], eps=1e-5),
        )
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        starts = [sum(depths[:i]) for i in range(len(depths))]
        self.layers = nn.ModuleList(
            HierViGStage(dim, depth, rates[start:start + depth], downsample=i < len(depths) - 1)
            for i, (dim, depth, start) in enumerate(zip(dims, depths, starts)))
        self.classifier = ClassifierHead(dims[-1], num_classes)
        self.head_drop = nn.Dropout(drop_rate)
        self.feature_info = [dict(num_chs=dim, reduction=2 ** (i + 2), module=f"layers.{i}")
                             for i, dim in enumerate(dims)]
        for module in self.modules():
            if isinstance(module, BiGLAMixer):
                module.reset_parameters()
        # The official model re-initialises every Linear afterwards; only the dwconv keeps its xavier init.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^patch_embed",
                    blocks=r"^layers\.(\d+)" if coarse else [(r"^layers\.(\d+)\.downsample", (99999,)),
                                                             (r"^layers\.(\d+)\.blocks\.(\d+)", None),
                                                             (r"^classifier\.norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classifier.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"ViG-H supports global_pool 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.classifier.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def set_input_size(self, img_size: int | tuple[int, int] | None = None, patch_size: int | None = None) -> None:
        """ViG-H has no position embedding, so any size divisible by 32 runs as is; this records the size."""
        if patch_size not in (None, self.patch_size):
            raise ValueError(f"ViG-H's output stride is fixed at {self.patch_size}, got {patch_size}")
        if img_size is not None:
            height, width = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
            self.pretrained_cfg = {**getattr(self, "pretrained_cfg", {}), "input_size": (self.in_chans, height, width)}

    def run_stage(self, stage: HierViGStage, x: torch.Tensor) -> torch.Tensor:
        """Blocks of one stage on an NHWC map; returns the NHWC map before the downsample."""
        batch, height, width, dim = x.shape
        x = x.reshape(batch, height * width, dim)
        for block in stage.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, (height, width), use_reentrant=False)
            else:
                x = block(x, (height, width))
        return x.reshape(batch, height, width, dim)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last-stage map, NCHW, before the classifier's norm."""
        check_input(x, self.in_chans, self.patch_size, type(self).__name__)
        x = self.patch_embed(x)
        for stage in self.layers:
            x = stage.downsample(self.run_stage(stage, x))
        return x.permute(0, 3, 1, 2)

    def forward_visible(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("ViG-H downsamples with strided convolutions, which need the full grid: "
                                  "pretrain it with mask tokens (forward_mask_tokens, mask_mode 'mask_token')")

    def forward_mask_tokens(self, x: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
        """Encode with hidden units replaced by ``mask_token`` at the stem. ``mask`` [B, N] lives on the
        stride-32 output grid; each unit covers 8x8 stem tokens. Returns normalised tokens [B, N, C]."""
        check_input(x, self.in_chans, self.patch_size, type(self).__name__)
        x = self.patch_embed(x)
        batch, height, width, _ = x.shape
        units = mask.reshape(batch, height * 4 // self.patch_size, width * 4 // self.patch_size)
        units = units.repeat_interleave(self.patch_size // 4, 1).repeat_interleave(self.patch_size // 4, 2)
        x = torch.where(units.unsqueeze(-1), mask_token.to(x.dtype), x)
        for stage in self.layers:
            x = stage.downsample(self.run_stage(stage, x))
        return self.classifier.norm(x).flatten(1, 2)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.classifier.norm(x.permute(0, 2, 3, 1))
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        if not pre_logits:
            x = self.classifier.head(x)
        # Without pooling the head acts on every position (as timm's 1x1-conv heads do), NCHW in and out.
        return x if self.global_pool == "avg" else x.permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """Stage outputs (before each downsample) at strides 4, 8, 16, 32, as NCHW maps or NLC tokens."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        check_input(x, self.in_chans, self.patch_size, type(self).__name__)
        x = self.patch_embed(x)
        stages = self.layers[:max_index + 1] if stop_early else self.layers
        intermediates = []
        for i, stage in enumerate(stages):
            x = self.run_stage(stage, x)
            if i in take_indices:
                y = self.classifier.norm(x) if norm and i == len(self.layers) - 1 else x
                intermediates.append(y.permute(0, 3, 1, 2) if output_fmt == "NCHW" else y.flatten(1, 2))
            x = stage.downsample(x)
        if intermediates_only:
            return intermediates
        return x.permute(0, 3, 1, 2), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        if max_index < len(self.layers) - 1:
            # The last kept stage now ends the network: no downsample after it, and the final norm, whose width
            # is the last stage's, cannot apply.
            self.layers = self.layers[:max_index + 1]
            self.layers[-1].downsample = nn.Identity()
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            self.classifier.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        if prune_norm:
            self.classifier.norm = nn.Identity()
        return take_indices


_HIER_LEGACY_RENAMES = (
    (r"^patch_embed\.proj\.", "patch_embed.0."),
    (r"^patch_embed\.norm\.", "patch_embed.2."),
    (r"(^layers\.\d+\.blocks\.\d+\.)ln_1\.", r"\1norm."),
    (r"(^layers\.\d+\.blocks\.\d+\.)self_attention\.", r"\1op."),
    (r"^norm\.", "classifier.norm."),
    (r"^head\.", "classifier.head."),
)


def map_official_keys(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Official ViG or ViG-H names onto this implementation's.

    Plain ViG needs nothing (the names are identical). ViG-H applies the renames of the official
    ``HierViG._load_from_state_dict`` and views ``Linear2d`` weights stored as ``(out, in, 1, 1)`` as ``(out, in)``.
    """
    if not isinstance(model, HierViG):
        return dict(state_dict)
    linear_shapes = {name + ".weight": module.weight.shape for name, module in model.named_modules()
                     if isinstance(module, nn.Linear)}
    out = {}
    for key, value in state_dict.items():
        for pattern, replacement in _HIER_LEGACY_RENAMES:
            key = re.sub(pattern, replacement, key)
        if key in linear_shapes and value.dim() == 4 and value.shape[2:] == (1, 1):
            value = value.flatten(1)
        out[key] = value
    return out


def resample_to_model_grid(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A plain-ViG checkpoint's ``pos_embed`` of another (square) grid, resampled bicubically to the model's."""
    stored = state_dict.get("pos_embed")
    if isinstance(model, ViG) and stored is not None and stored.shape != model.pos_embed.shape:
        grid = square_grid(stored.shape[1], type(model).__name__)
        state_dict["pos_embed"] = resample_abs_pos_embed(stored, list(model.pos_grid), list(grid), num_prefix_tokens=0,
                                                         antialias=False)
    return state_dict


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: nn.Module,
                         img_size: int | tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """timm's pretrained filter for official or exported weights: the official names, the classifier fitted to
    ``num_classes`` (kept, dropped or freshly initialised) and every other key checked (``fit_checkpoint``).

    ``img_size`` is the ``create_model`` argument: when given, a plain-ViG ``pos_embed`` of another grid is
    resampled to it once, as timm does; when not, the model adopts the checkpoint's grid, which is lossless.
    """
    # timm adapts the stem to another in_chans after this filter.
    state_dict, _ = fit_checkpoint(map_official_keys(state_dict, model), model,
                                   shape_may_differ=first_conv_weights(model))
    return resample_to_model_grid(state_dict, model) if img_size is not None else state_dict


def _create(model_cls: type, variant: str, pretrained: bool = False, **kwargs) -> nn.Module:
    out_indices = kwargs.pop("out_indices", (3, 5, 7, 11) if model_cls is ViG else (0, 1, 2, 3))
    return build_model_with_cfg(model_cls, variant, pretrained,
                                pretrained_filter_fn=partial(checkpoint_filter_fn, img_size=kwargs.get("img_size")),
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs)


def _cfg(first_conv: str, classifier: str, **kwargs) -> dict:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.875,
        "interpolation": "bicubic", "fixed_input_size": False, "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD, "first_conv": first_conv, "classifier": classifier,
        "paper_ids": "arXiv:2405.18425", "paper_name": "ViG: Linear-complexity Visual Sequence Learning with "
        "Gated Linear Attention", "origin_url": "https://github.com/hustvl/ViG", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    **{f"vig_{size}.in1k": _cfg("patch_embed.proj.0", "head") for size in ("tiny", "small", "base")},
    **{f"vig_h_{size}.in1k": _cfg("patch_embed.0", "classifier.head", pool_size=(7, 7))
       for size in ("tiny", "small", "base")},
})


@register_model
def vig_tiny(pretrained: bool = False, **kwargs) -> ViG:
    """ViG-T: width 192, 3 heads, SiLU after the dwconv and before o_proj (5.83 M parameters)."""
    args = dict(embed_dim=192, num_heads=3, act_in_conv=True, out_act=True)
    return _create(ViG, "vig_tiny", pretrained, **dict(args, **kwargs))


@register_model
def vig_small(pretrained: bool = False, **kwargs) -> ViG:
    """ViG-S: width 384, 6 heads (22.6 M parameters)."""
    args = dict(embed_dim=384, num_heads=6, act_in_conv=False, out_act=False)
    return _create(ViG, "vig_small", pretrained, **dict(args, **kwargs))


@register_model
def vig_base(pretrained: bool = False, **kwargs) -> ViG:
    """ViG-B: width 768, 12 heads (89.0 M parameters)."""
    args = dict(embed_dim=768, num_heads=12, act_in_conv=False, out_act=False)
    return _create(ViG, "vig_base", pretrained, **dict(args, **kwargs))


@register_model
def vig_h_tiny(pretrained: bool = False, **kwargs) -> HierViG:
    """ViG-H-T: depths 2-2-5-2, widths 96-768 (28.6 M parameters)."""
    args = dict(depths=(2, 2, 5, 2), dims=(96, 192, 384, 768))
    return _create(HierViG, "vig_h_tiny", pretrained, **dict(args, **kwargs))


@register_model
def vig_h_small(pretrained: bool = False, **kwargs) -> HierViG:
    """ViG-H-S: depths 2-2-17-2, widths 96-768 (50.1 M parameters)."""
    args = dict(depths=(2, 2, 17, 2), dims=(96, 192, 384, 768))
    return _create(HierViG, "vig_h_small", pretrained, **dict(args, **kwargs))


@register_model
def vig_h_base(pretrained: bool = False, **kwargs) -> HierViG:
    """ViG-H-B: depths 2-2-17-2, widths 128-1024 (88.9 M parameters)."""
    args = dict(depths=(2, 2, 17, 2), dims=(128, 256, 512, 1024))
    return _create(HierViG, "vig_h_base", pretrained, **dict(args, **kwargs))
