"""Recipe sections shared by the pretraining scripts (see ``docs/training.md`` for the mechanism)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .recipe import NonNegativeInt, PositiveInt


@dataclass
class DataSection:
    train_shards: str = ""
    """Shard directory, brace/glob pattern or ``::``-joined patterns of the training set."""
    val_shards: str | None = None
    """Labelled shards for the evaluation run during or after training (optional): CLIP's zero-shot
    classification and fine-tuning's accuracy. MAE does not read it: probe its export with ``eval.linear_probe``."""
    resampled: bool = True
    """Draw shards with replacement (the open_clip default for large sets); False reads each sample once per epoch."""
    samples_per_epoch: PositiveInt | None = None
    """Virtual epoch size in resampled mode; defaults to one pass over the shards."""
    num_workers: NonNegativeInt = 8
    shuffle_buffer: NonNegativeInt = 5000
    max_bad_fraction: float = 0.01


@dataclass
class OptimSection:
    batch_size: PositiveInt = 64
    """Micro-batch per process."""
    accum_steps: PositiveInt = 1
    base_lr: float = 1.5e-4
    """Learning rate for an effective batch of 256; scaled linearly (``lr = base_lr * global_batch / 256``)."""
    lr: float | None = None
    """Absolute learning rate; overrides ``base_lr`` when set."""
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    epochs: PositiveInt = 800
    warmup_epochs: NonNegativeInt = 40
    warmup_steps: NonNegativeInt | None = None
    """Warm-up in optimizer updates; overrides ``warmup_epochs`` when set (CLIP counts warm-up in steps)."""
    clip_grad: float | None = None
    """Clip the gradient norm to this value (None: measure it without clipping)."""


@dataclass
class TrainSection:
    output_dir: str = "runs/run"
    seed: int = 0
    mixed_precision: Literal["no", "fp16", "bf16", "fp8"] | None = None
    """``no``, ``fp16``, ``bf16`` or ``fp8``; None keeps what ``accelerate launch`` configured."""
    max_steps: PositiveInt | None = None
    """Stop after this many optimizer updates (the schedule still spans ``optim.epochs``)."""
    log_every: PositiveInt = 20
    image_every: PositiveInt = 1000
    checkpoint_every: PositiveInt = 1000
    keep_checkpoints: PositiveInt = 3
    resume: str = "auto"
    """``auto`` (newest complete checkpoint in ``output_dir`` if any), ``none``, or a checkpoint path."""
    resume_data: Literal["exact", "continue"] = "exact"
    """``exact``: resuming needs the data layout the checkpoint was saved with (shards, world size, workers, batch
    size, seed), which keeps the resumed epoch's samples exact; ``continue``: resume after such a change anyway (the
    epoch and step carry on; the resumed epoch may repeat or skip samples)."""
    max_nonfinite: PositiveInt = 10
    """Stop with an error after this many consecutive steps with a NaN/Inf loss."""
    grad_checkpointing: bool = False
    """Recompute activations in the backward pass (the image tower's blocks) to save memory."""
    compile: bool = False
    """torch.compile (inductor) every block of the model in place before training (``pretrain.compiling``); the
    first steps take longer while it compiles. Parameter names, checkpoints and exports do not change."""
    wandb: bool | Literal["auto"] = "auto"
    """Also log to Weights & Biases: True, False, or ``auto`` (when installed and configured)."""


@dataclass
class MAEModelSection:
    encoder: str = "vig_base"
    img_size: PositiveInt = 224
    in_chans: PositiveInt = 3
    mask_mode: str = "visible"
    """``visible`` (order-preserving drop, sparse dwconv) or ``mask_token`` (full grid, SimMIM-like)."""
    mask_ratio: float = 0.75
    decoder_dim: PositiveInt = 512
    decoder_depth: PositiveInt = 8
    decoder_heads: PositiveInt = 16
    norm_pix_loss: bool = True
    drop_path_rate: float = 0.0


@dataclass
class MAERecipe:
    model: MAEModelSection = field(default_factory=MAEModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)


@dataclass
class CLIPModelSection:
    config: str = "ViG-B-16"
    """An open_clip model config: the project's (``ViG-B-16``, ``Vim-S-16``, ``ViG-T-16-MiniLM-L6``, ...; see
    ``vig.clip_towers``) or any other with a timm image tower."""
    image_size: PositiveInt = 224
    text_model_dir: str | None = None
    """A local Hugging Face text model to use instead of the config's text tower (LiT; lock it with lock_text)."""
    lock_text: bool = False
    """Freeze the text tower (kept in eval mode); the image tower learns to map into its space."""
    text_cache_size: NonNegativeInt = 0
    """With lock_text: keep up to this many caption features instead of recomputing them (0: no cache)."""
    loss: Literal["clip", "siglip"] = "clip"
    local_loss: bool = True
    """CLIP loss: score this rank's rows against all columns (same gradient, memory linear in the batch)."""
    gather_with_grad: bool = True
    """CLIP loss: gather features with gradient (required for the global loss's gradient with local_loss)."""
    drop_path_rate: float = 0.0


@dataclass
class ZeroShotSection:
    class_names: str | None = None
    """``imagenet``, a file with one name per line, or None for the class names recorded with data.val_shards."""
    templates: str = "openai"
    """``openai`` (80), ``simple`` (7), or a file with one template per line (``{}`` marks the class name)."""
    every: NonNegativeInt = 1000
    """Run zero-shot classification on data.val_shards every this many updates and at the end (0: only at the end)."""
    batch_size: PositiveInt = 256


@dataclass
class CLIPOptimSection(OptimSection):
    """The CLIP paper's optimiser settings: an absolute learning rate, AdamW (0.9, 0.98), eps 1e-6, wd 0.2."""
    lr: float | None = 5e-4
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    epochs: PositiveInt = 32
    warmup_epochs: NonNegativeInt = 0
    warmup_steps: NonNegativeInt | None = 2000


@dataclass
class CLIPRecipe:
    model: CLIPModelSection = field(default_factory=CLIPModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: CLIPOptimSection = field(default_factory=CLIPOptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    zeroshot: ZeroShotSection = field(default_factory=ZeroShotSection)


@dataclass
class FinetuneModelSection:
    encoder: str = ""
    """An exported tower (a folder with ``config.json`` and ``model.safetensors``, as the MAE and CLIP trainers
    write), or a registered architecture name (``vig_base``) to train from random initialisation (the baseline)."""
    num_classes: PositiveInt | None = None
    """Classes of the new head; None: the ``class_names`` in the ``dataset.json`` of data.train_shards."""
    img_size: PositiveInt | None = None
    """Input size; None: the exported tower's (the architecture's default for a name)."""
    drop_path_rate: float = 0.1
    layer_decay: float = 0.75
    """Layer-wise LR decay (BEiT, MAE): the head trains at the LR, each block below at ``layer_decay`` times the
    block above it, the patch embedding lowest (1: off)."""


@dataclass
class AugmentSection:
    """MAE's fine-tuning augmentation: timm's RandAugment, random erasing, mixup and cutmix, label smoothing."""
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float | None = None
    """Color jitter strength; timm applies it only without auto_augment."""
    re_prob: float = 0.25
    """Random erasing probability."""
    scale: tuple[float, float] = (0.08, 1.0)
    """RandomResizedCrop area range."""
    mixup: float = 0.8
    """Mixup alpha (0: off)."""
    cutmix: float = 1.0
    """Cutmix alpha (0: off)."""
    mixup_prob: float = 1.0
    """Probability of mixing a batch at all."""
    mixup_switch_prob: float = 0.5
    """Probability of cutmix rather than mixup when both are on."""
    smoothing: float = 0.1
    """Label smoothing."""


@dataclass
class FinetuneOptimSection(OptimSection):
    """MAE's fine-tuning optimiser: AdamW (0.9, 0.999), base LR 5e-4 per 256 images, 100 epochs, 5 warm-up."""
    base_lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    min_lr: float = 1e-6
    epochs: PositiveInt = 100
    warmup_epochs: NonNegativeInt = 5


@dataclass
class FinetuneTrainSection(TrainSection):
    eval_every: NonNegativeInt = 1
    """Evaluate on data.val_shards every this many epochs and at the end (0: only at the end)."""


@dataclass
class FinetuneRecipe:
    model: FinetuneModelSection = field(default_factory=FinetuneModelSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    data: DataSection = field(default_factory=lambda: DataSection(resampled=False))
    optim: FinetuneOptimSection = field(default_factory=FinetuneOptimSection)
    train: FinetuneTrainSection = field(default_factory=FinetuneTrainSection)
