"""Training throughput of MAE and CLIP pretraining: ViG-B against ViT-B baselines, on synthetic GPU data.

    python benchmarks/pretrain_throughput.py all --out benchmarks/results/pretrain_throughput.json
    python benchmarks/pretrain_throughput.py mae --backend reference --out /tmp/mae_reference.json
    python benchmarks/pretrain_throughput.py all --device cpu --batch 2 --image-size 64 --clip-sizes 64 \
        --steps 2 --warmup 1 --vig vig_tiny --vit vit_tiny_patch16_224 --out /tmp/smoke.json   # CPU smoke test

One training step = forward + backward + ``torch.optim.AdamW`` step (``pretrain.optim.build_optimizer``: the
trainers' parameter groups and torch's default implementation), under bf16 autocast on CUDA, batch 256 by
default, random inputs already on the device (no data loading). ``warmup`` steps run first (Triton autotuning,
cuDNN/cuBLAS heuristics, allocator growth); then ``steps`` steps are timed between two
``torch.cuda.synchronize()`` calls, and images/s = steps x batch / elapsed. Per-step CUDA-event times give
the median step and the spread. Peak memory is ``torch.cuda.max_memory_allocated`` over the warm-up and
timed steps (model, optimizer state and activations).

mae: ``pretrain.masked_autoencoder.MaskedAutoencoder(<vig>, mask_mode=...)`` with the default decoder
    (512 wide, 8 deep, 16 heads), mask ratio 0.75, normalised-pixel loss, for ``visible`` and ``mask_token``;
    baseline: the same module with a timm ViT encoder run MAE-style (facebookresearch/mae): position
    embeddings added, the kept 25 % gathered, the class token (with its position embedding) prepended, ViT
    blocks, norm; the same decoder then also carries the class token (197 tokens, as in MAE) and drops it
    before the prediction. The kept indices are the trainer's (``random_keep``: uniform per sample, sorted);
    their order does not change a ViT's cost.
clip: ``open_clip.CLIP`` with ViT-B-16's text tower (width 512, 12 layers, 8 heads, context 77, embed 512)
    and either ``open_clip.create_model("ViT-B-16", force_image_size=S)`` (baseline) or the timm ViG tower
    (``timm_model_name=<vig>``, avg pool, linear projection), ``open_clip.ClipLoss``, random token ids.
With ``--backend reference`` the ViG token mixer runs the plain-PyTorch reference instead of the Triton
kernel (``vig_kernels.set_backend``); the baselines are unaffected.
With ``--compile full``, each case's model runs through ``torch.compile`` (inductor, default mode); with
``--compile regional``, block by block as ``train.compile`` does in the trainers (``pretrain.compiling``), both in
place. The optimizer step stays eager. The first warm-up step, which compiles, is reported as ``first_step_s``.
With ``--profile``, every case also records its top CUDA kernels over a few profiled steps (torch.profiler),
and a breakdown (encoder/tower alone) where the case has one.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import timm  # noqa: E402
from timm.layers import build_sincos2d_pos_embed  # noqa: E402
from timm.models import register_model  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

import vig  # noqa: E402,F401  (registers the ViG models with timm)
import vig_kernels  # noqa: E402
from pretrain.compiling import compile_blocks  # noqa: E402
from pretrain.masked_autoencoder import MaskedAutoencoder  # noqa: E402
from pretrain.optim import build_optimizer  # noqa: E402

try:
    import open_clip  # noqa: E402
    OPEN_CLIP_VERSION = open_clip.__version__
except Exception as exc:  # pragma: no cover - clip mode needs it
    open_clip = None
    OPEN_CLIP_VERSION = f"not importable ({type(exc).__name__}: {exc})"


# ---------------------------------------------------------------------------------------------------------------
# ViT-B MAE baseline: a timm ViT run MAE-style, inside the same MaskedAutoencoder (same decoder and loss)
# ---------------------------------------------------------------------------------------------------------------

class MAEViT(VisionTransformer):
    """timm's VisionTransformer plus MAE's encoder pass over the kept tokens (class token kept)."""

    def forward_visible(self, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)                                            # [B, N, D]
        pos = self.pos_embed
        if self.no_embed_class:
            patch_pos, cls_pos = pos, None
        else:
            patch_pos, cls_pos = pos[:, self.num_prefix_tokens:], pos[:, :self.num_prefix_tokens]
        x = x + patch_pos
        x = x.gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))         # [B, L, D]
        cls = self.cls_token if cls_pos is None else self.cls_token + cls_pos
        x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)              # [B, 1 + L, D]
        x = self.norm_pre(x)
        x = self.blocks(x)
        return self.norm(x)


def _register_mae_vit(vit_name: str) -> str:
    """Register ``mae_<vit_name>``: the timm ViT, re-classed as :class:`MAEViT`, with ``patch_size`` set."""
    name = f"mae_{vit_name}"

    def entrypoint(pretrained: bool = False, **kwargs):
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        model = timm.create_model(vit_name, pretrained=False, **kwargs)
        model.__class__ = MAEViT
        model.patch_size = model.patch_embed.patch_size[0]
        return model

    entrypoint.__name__ = name
    if name not in timm.list_models(name):
        register_model(entrypoint)
    return name


class ViTMaskedAutoencoder(MaskedAutoencoder):
    """MaskedAutoencoder whose encoder output starts with a class token, which the decoder carries (MAE)."""

    def __init__(self, vit_name: str, **kwargs):
        super().__init__(_register_mae_vit(vit_name), mask_mode="visible", **kwargs)

    def decode(self, latent: torch.Tensor, keep: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self.decoder_embed(latent)
        cls, x = x[:, :1], x[:, 1:]
        batch, num_tokens = x.shape[0], grid[0] * grid[1]
        index = keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        x = self.mask_token.to(x.dtype).expand(batch, num_tokens, -1).scatter(1, index, x)
        pos = build_sincos2d_pos_embed(list(grid), x.shape[-1], device=x.device)
        x = torch.cat([cls, x + pos.to(x.dtype)], dim=1)  # the class token's decoder position is zero, as in MAE
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]


def compiled(model: torch.nn.Module, how: str | None) -> torch.nn.Module:
    """The model compiled in place (``nn.Module.compile``, so parameter names do not change): region by region as
    the trainers' ``train.compile`` does (``pretrain.compiling.compile_blocks``), or its whole forward."""
    if how == "full":
        model.compile()
    elif how == "regional":
        compile_blocks(model, True)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Cases: each returns (model, step inputs, loss function, optional tower-only functions for the breakdown)
# ---------------------------------------------------------------------------------------------------------------

def mae_case(kind: str, args, device):
    if kind == "vit":
        model = ViTMaskedAutoencoder(args.vit, img_size=args.image_size)
    else:
        model = MaskedAutoencoder(args.vig, img_size=args.image_size, mask_mode=kind)
    model = model.to(device)
    forward = compiled(model, args.compile)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)

    def loss_fn():
        return forward(images)[0]

    def encoder_only():  # the encoder's share: encoder forward on the kept tokens, sum as the loss
        grid = model.grid(images)
        from pretrain.masked_autoencoder import random_keep
        keep, mask = random_keep(images.shape[0], grid[0] * grid[1], model.mask_ratio, images.device)
        return model.encode(images, keep, mask).float().mean()

    return model, loss_fn, {"encoder only": encoder_only}


def clip_text_cfg() -> dict:
    return dict(open_clip.get_model_config("ViT-B-16")["text_cfg"])


def clip_case(kind: str, size: int, args, device):
    if open_clip is None:
        raise RuntimeError(f"open_clip is not importable: {OPEN_CLIP_VERSION}")
    if kind == "vit":
        model = open_clip.create_model("ViT-B-16", force_image_size=size)
    else:
        model = open_clip.CLIP(embed_dim=512, text_cfg=clip_text_cfg(),
                               vision_cfg=dict(timm_model_name=args.vig, timm_model_pretrained=False,
                                               timm_pool="avg", timm_proj="linear", image_size=size))
    model = model.to(device).train()
    forward = compiled(model, args.compile)
    loss = open_clip.ClipLoss()
    context = model.context_length if hasattr(model, "context_length") else 77
    vocab = model.vocab_size if hasattr(model, "vocab_size") else 49408
    images = torch.randn(args.batch, 3, size, size, device=device)
    text = torch.randint(0, vocab, (args.batch, context), device=device)

    def loss_fn():
        image_features, text_features, logit_scale = forward(images, text)[:3]
        return loss(image_features, text_features, logit_scale)

    def image_only():
        return model.encode_image(images).float().mean()

    def text_only():
        return model.encode_text(text).float().mean()

    return model, loss_fn, {"image tower only": image_only, "text tower only": text_only}


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------

def autocast(device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()  # CPU smoke tests run in fp32


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, steps: int, warmup: int, batch: int, device) -> dict:
    first_step_s = None
    for index in range(warmup):
        start = time.perf_counter()
        step()
        if index == 0:
            sync(device)
            first_step_s = time.perf_counter() - start
    sync(device)
    events, host_ms = [], []
    start = time.perf_counter()
    for _ in range(steps):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            step()
            end.record()
            events.append((begin, end))
        else:
            t0 = time.perf_counter()
            step()
            host_ms.append(1e3 * (time.perf_counter() - t0))
    sync(device)
    elapsed = time.perf_counter() - start
    step_ms = [begin.elapsed_time(end) for begin, end in events] if events else host_ms
    return {"images_per_second": steps * batch / elapsed, "elapsed_s": elapsed, "steps": steps,
            "warmup": warmup, "first_step_s": first_step_s, "median_step_ms": statistics.median(step_ms),
            "min_step_ms": min(step_ms), "max_step_ms": max(step_ms)}


def top_kernels(step, device, steps: int = 3, count: int = 12) -> list[dict]:
    """Every CUDA kernel (self time per step) over a few profiled training steps, the total first, by time."""
    if device.type != "cuda":
        return []
    from torch.profiler import ProfilerActivity, profile
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        sync(device)
    def self_us(e):
        value = getattr(e, "self_device_time_total", None)
        return value if value is not None else e.self_cuda_time_total

    rows = []
    events = [e for e in prof.key_averages() if self_us(e) > 0]
    total = sum(self_us(e) for e in events)
    for e in sorted(events, key=self_us, reverse=True)[:count]:
        rows.append({"name": e.key[:120], "ms_per_step": self_us(e) / 1e3 / steps,
                     "share": self_us(e) / total if total else 0.0, "calls_per_step": e.count / steps})
    for e in sorted(events, key=self_us, reverse=True)[count:]:  # the rest, for categorising offline
        rows.append({"name": e.key[:200], "ms_per_step": self_us(e) / 1e3 / steps,
                     "share": self_us(e) / total if total else 0.0, "calls_per_step": e.count / steps})
    return [{"name": "TOTAL (all kernels)", "ms_per_step": total / 1e3 / steps, "share": 1.0,
             "calls_per_step": sum(e.count for e in events) / steps}] + rows


def run_case(name: str, build, args, device) -> dict:
    result = {"case": name, "batch": args.batch}
    model = optimizer = None
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        torch.manual_seed(0)
        model, loss_fn, parts = build()
        result["params_M"] = sum(p.numel() for p in model.parameters()) / 1e6
        optimizer = build_optimizer(model, 1e-4, 0.05, (0.9, 0.95), 1e-8)

        def step():
            with autocast(device):
                loss = loss_fn()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        result.update(time_steps(step, args.steps, args.warmup, args.batch, device))
        if device.type == "cuda":
            result["peak_memory_GiB"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        with torch.no_grad(), autocast(device):
            result["loss"] = float(loss_fn())
        if args.profile:
            try:
                result["top_kernels"] = top_kernels(step, device)
                result["breakdown"] = {}
                for part, fn in parts.items():
                    def part_step(fn=fn):
                        with autocast(device):
                            loss = fn()
                        loss.backward()
                        model.zero_grad(set_to_none=True)
                    timed = time_steps(part_step, max(5, args.steps // 2), 2, args.batch, device)
                    result["breakdown"][part + " (fwd+bwd)"] = {"median_step_ms": timed["median_step_ms"],
                                                                "images_per_second": timed["images_per_second"]}
                for row in result["top_kernels"][:6]:
                    print(f"    {row['ms_per_step']:8.2f} ms/step {100 * row['share']:5.1f}%  {row['name'][:90]}")
                for part, timed in result["breakdown"].items():
                    print(f"    {part}: {timed['median_step_ms']:.1f} ms")
            except Exception as exc:  # the timing above stands
                result["profile_error"] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
    except Exception as exc:  # record and go on with the other cases
        result["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    finally:
        model = optimizer = None  # noqa: F841  (free the case before the next one)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    status = result.get("error") or (f"{result['images_per_second']:.1f} img/s, median step "
                                     f"{result['median_step_ms']:.1f} ms, peak "
                                     f"{result.get('peak_memory_GiB', float('nan')):.1f} GiB")
    print(f"[{name}] {status}", flush=True)
    return result


# ---------------------------------------------------------------------------------------------------------------

def environment(device) -> dict:
    env = {"date": datetime.date.today().isoformat(), "python": platform.python_version(),
           "torch": torch.__version__, "timm": timm.__version__, "open_clip": OPEN_CLIP_VERSION,
           "kernels_backend": vig_kernels.get_backend(), "device": str(device)}
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = "not importable"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_GiB=round(props.total_memory / 2 ** 30, 1),
                   sm_count=props.multi_processor_count, cuda=torch.version.cuda)
        try:
            import subprocess
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.split("\n")[0]
        except Exception:
            pass
    return env


def ratio(results: list[dict], name: str, baseline: str) -> float | None:
    by_name = {r["case"]: r for r in results if "images_per_second" in r}
    if name in by_name and baseline in by_name:
        return by_name[name]["images_per_second"] / by_name[baseline]["images_per_second"]
    return None


def markdown(report: dict) -> str:
    lines = ["| case | batch | params (M) | images/s | median step (ms) | peak memory (GiB) | vs baseline |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['batch']} | – | failed: {r['error'][:80]} | – | – | – |")
            continue
        vs = r.get("vs_baseline")
        lines.append(f"| {r['case']} | {r['batch']} | {r['params_M']:.1f} | {r['images_per_second']:.1f} | "
                     f"{r['median_step_ms']:.1f} | {r.get('peak_memory_GiB', float('nan')):.1f} | "
                     f"{'' if vs is None else f'{vs:.2f}x'} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["mae", "clip", "all"])
    parser.add_argument("--out", required=True, help="JSON output path")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224, help="MAE input size")
    parser.add_argument("--clip-sizes", type=int, nargs="+", default=[224, 448])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--vig", default="vig_base")
    parser.add_argument("--vit", default="vit_base_patch16_224", help="timm ViT of the MAE baseline")
    parser.add_argument("--backend", default="auto", choices=list(vig_kernels.BACKENDS))
    parser.add_argument("--mae-cases", nargs="+", default=["visible", "mask_token", "vit"],
                        choices=["visible", "mask_token", "vit"])
    parser.add_argument("--clip-cases", nargs="+", default=["vig", "vit"], choices=["vig", "vit"])
    parser.add_argument("--compile", choices=["full", "regional"], help="torch.compile each case's model")
    parser.add_argument("--profile", action="store_true", help="also record top kernels and a tower breakdown")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    vig_kernels.set_backend(args.backend)
    report = {"environment": environment(device), "argv": sys.argv, "args": vars(args), "results": []}
    family, _, size = args.vig.rpartition("_")
    vig_label = f"{family.replace('vig', 'ViG').replace('vim', 'Vim').replace('_h', '-H')}-{size[0].upper()}"
    vit_label = args.vit

    if args.mode in ("mae", "all"):
        names = {"visible": f"MAE {vig_label} visible", "mask_token": f"MAE {vig_label} mask_token",
                 "vit": f"MAE {vit_label} (baseline)"}
        baseline = names["vit"]
        for kind in args.mae_cases:
            result = run_case(names[kind], lambda kind=kind: mae_case(kind, args, device), args, device)
            result.update(task="mae", image_size=args.image_size, backend=args.backend if kind != "vit" else "-")
            report["results"].append(result)
        for r in report["results"]:
            if r.get("task") == "mae":
                r["vs_baseline"] = ratio(report["results"], r["case"], baseline)

    if args.mode in ("clip", "all"):
        for size in args.clip_sizes:
            names = {"vig": f"CLIP {vig_label} @{size}", "vit": f"CLIP ViT-B-16 @{size} (baseline)"}
            chunk = []
            for kind in args.clip_cases:
                result = run_case(names[kind], lambda kind=kind, size=size: clip_case(kind, size, args, device), args, device)
                result.update(task="clip", image_size=size, backend=args.backend if kind != "vit" else "-")
                chunk.append(result)
            for r in chunk:
                r["vs_baseline"] = ratio(chunk, r["case"], names["vit"])
            report["results"].extend(chunk)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    env = report["environment"]
    compiled_note = f", compiled ({args.compile})" if args.compile else ""
    print(f"\n{env.get('gpu', env['device'])}, {env['date']}, torch {env['torch']}, triton {env['triton']}, "
          f"timm {env['timm']}, open_clip {env['open_clip']}, ViG backend {args.backend}{compiled_note}; "
          f"{args.steps} timed steps after {args.warmup} warm-up\n")
    print(markdown(report))


if __name__ == "__main__":
    main()
