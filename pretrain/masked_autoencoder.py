"""MAE with a scan-based encoder (ViG, ViG-H or Vim) and MAE's Transformer decoder, as one module.

Two ways to hide patches from a scan (``docs/mae.md`` compares them):

* ``visible``: the encoder sees only the visible tokens, **in raster order** (plain MAE shuffles them, which
  a recurrence would notice); ViG's 3x3 depthwise conv runs on the grid with hidden positions zeroed and
  Vim's 1D conv on the visible sequence. Encoder cost is ~25 % of the full grid at mask ratio 0.75.
* ``mask_token``: the full grid goes through the encoder with hidden patches replaced by a learned token
  (SimMIM-style), so the encoder sees the fine-tuning layout. The only choice for ViG-H, whose strided
  downsampling needs the full grid; its masking unit is its 32-pixel output stride.

Encoder, decoder and both mask tokens live in this one module, so DeepSpeed wraps a single model.
"""
from __future__ import annotations

from functools import partial

import timm
import torch
from timm.layers import build_sincos2d_pos_embed, trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

import vig  # noqa: F401  (registers the encoders with timm)

MASK_MODES = ("visible", "mask_token")


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, patch*patch*C] in raster order, pixels as (p, q, c) like MAE."""
    batch, channels, height, width = images.shape
    x = images.reshape(batch, channels, height // patch, patch, width // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(batch, (height // patch) * (width // patch), patch * patch * channels)


def unpatchify(patches: torch.Tensor, patch: int, grid: tuple[int, int], channels: int) -> torch.Tensor:
    batch = patches.shape[0]
    x = patches.reshape(batch, grid[0], grid[1], patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, grid[0] * patch, grid[1] * patch)


def random_keep(batch: int, num_tokens: int, mask_ratio: float, device: torch.device,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample uniform masking with the same number of visible tokens in every sample.

    Returns ``keep`` [B, L] (visible indices, ascending = raster order) and ``mask`` [B, N] (True = hidden).
    """
    num_keep = max(1, int(num_tokens * (1 - mask_ratio)))
    noise = torch.rand(batch, num_tokens, device=device, generator=generator)
    keep = noise.argsort(dim=1)[:, :num_keep].sort(dim=1).values
    mask = torch.ones(batch, num_tokens, dtype=torch.bool, device=device).scatter(1, keep, False)
    return keep, mask


class MaskedAutoencoder(nn.Module):
    def __init__(self, encoder: str, img_size: int = 224, in_chans: int = 3, mask_mode: str = "visible",
                 mask_ratio: float = 0.75, decoder_dim: int = 512, decoder_depth: int = 8, decoder_heads: int = 16,
                 norm_pix_loss: bool = True, drop_path_rate: float = 0.0):
        super().__init__()
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if encoder not in timm.list_models():
            raise ValueError(f"model.encoder={encoder!r} is not a registered architecture; this project's: "
                             f"{', '.join(vig.MODEL_NAMES)}")
        self.encoder = timm.create_model(encoder, num_classes=0, img_size=img_size, in_chans=in_chans,
                                         drop_path_rate=drop_path_rate)
        if mask_mode == "visible" and isinstance(self.encoder, vig.HierViG):
            raise ValueError(f"{encoder} cannot drop tokens (strided downsampling needs the full grid): "
                             "use mask_mode 'mask_token'")
        self.encoder_name = encoder
        self.mask_mode = mask_mode
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.in_chans = in_chans
        self.patch_size = self.encoder.patch_size
        self.encoder_mask_token = (nn.Parameter(torch.zeros(self.encoder.embed_dim))
                                   if mask_mode == "mask_token" else None)
        self.decoder_embed = nn.Linear(self.encoder.num_features, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim)) if mask_mode == "visible" else None
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True,
                  norm_layer=partial(nn.LayerNorm, eps=1e-6)) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size ** 2 * in_chans)
        self._init_decoder()

    def _init_decoder(self) -> None:
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
        for token in (self.mask_token, self.encoder_mask_token):
            if token is not None:
                trunc_normal_(token, std=0.02)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        tokens = {name for name in ("mask_token", "encoder_mask_token") if getattr(self, name) is not None}
        return tokens | {"encoder." + name for name in self.encoder.no_weight_decay()}

    def grid(self, images: torch.Tensor) -> tuple[int, int]:
        return images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size

    def encode(self, images: torch.Tensor, keep: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.mask_mode == "visible":
            return self.encoder.forward_visible(images, keep)
        return self.encoder.forward_mask_tokens(images, mask, self.encoder_mask_token)

    def decode(self, latent: torch.Tensor, keep: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self.decoder_embed(latent)
        batch, num_tokens = x.shape[0], grid[0] * grid[1]
        if x.shape[1] != num_tokens:
            index = keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])
            x = self.mask_token.to(x.dtype).expand(batch, num_tokens, -1).scatter(1, index, x)
        pos = build_sincos2d_pos_embed(list(grid), x.shape[-1], device=x.device)
        x = x + pos.to(x.dtype)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))

    def target(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-patch targets and, for the normalised-pixel loss, each patch's mean and std."""
        target = patchify(images.float(), self.patch_size)
        if not self.norm_pix_loss:
            return target, torch.zeros_like(target[..., :1]), torch.ones_like(target[..., :1])
        mean = target.mean(dim=-1, keepdim=True)
        std = (target.var(dim=-1, keepdim=True) + 1e-6).sqrt()
        return (target - mean) / std, mean, std

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None):
        """Returns ``(loss, prediction [B, N, p*p*C], mask [B, N])``; the loss is the MSE on hidden patches."""
        grid = self.grid(images)
        keep, mask = random_keep(images.shape[0], grid[0] * grid[1], self.mask_ratio, images.device, generator)
        prediction = self.decode(self.encode(images, keep, mask), keep, grid)
        target, _, _ = self.target(images)
        per_patch = (prediction.float() - target).pow(2).mean(dim=-1)
        loss = (per_patch * mask).sum() / mask.sum()
        return loss, prediction, mask

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, prediction: torch.Tensor, mask: torch.Tensor):
        """Images with hidden patches blanked, and the reconstruction with the visible patches pasted back,
        both in the input's (normalised) pixel space."""
        grid = self.grid(images)
        original = patchify(images.float(), self.patch_size)
        _, mean, std = self.target(images)
        predicted = prediction.float() * std + mean
        hidden = mask.unsqueeze(-1)
        masked = unpatchify(original.masked_fill(hidden, 0.0), self.patch_size, grid, self.in_chans)
        pasted = unpatchify(torch.where(hidden, predicted, original), self.patch_size, grid, self.in_chans)
        return masked, pasted
