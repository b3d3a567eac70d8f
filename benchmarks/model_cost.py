"""Print the parameter and MAC table of the README (CPU, a few seconds per model).

    python benchmarks/model_cost.py [--img-size 224]
"""
from __future__ import annotations

import argparse

import timm
import torch

import vig

DEIT = ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img-size", type=int, default=224)
    args = parser.parse_args()
    print(f"| model | params (M) | GMACs at {args.img_size}² (all) | of which token mixing | "
          "GMACs fvcore-style (as published) |")
    print("|---|---:|---:|---:|---:|")
    for name in (*vig.MODEL_NAMES, *DEIT):
        torch.manual_seed(0)
        cost = vig.model_cost(timm.create_model(name, img_size=args.img_size), args.img_size)
        print(f"| {name} | {cost['params'] / 1e6:.2f} | {cost['macs'] / 1e9:.2f} | {cost['mixer_macs'] / 1e9:.2f} | "
              f"{cost['fvcore_style_macs'] / 1e9:.2f} |")


if __name__ == "__main__":
    main()
