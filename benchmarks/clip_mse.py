"""Quantization error of GDRQ's fixed clips, ``T = k * mean|x|``, against ``k``.

Scale-Clip picks its clip as a multiple of the mean magnitude (docs/methods.md#scale-clip: ``k_w = 2`` for
weights, ``k_a = 4`` for activations). ``k_w = 2`` is exact for the distribution Scale-Clip
trains towards (uniform on ``[-T, T]`` has ``mean|w| = T / 2``), but a pretrained network
starts from bell-shaped weights and ReLU outputs of roughly Gaussian inputs. This prints
the mean squared error of our own quantizers (``scale_clip_fake_quant`` for weights,
``fake_quant_unsigned`` at ``k * mean`` for activations, as the EMA gives once settled) on
such inputs, for a grid of ``k``, as a ratio to the best ``k`` of each row -- it shows
which clip a short fine-tune, with no time to reshape, would want.

Usage:
    python benchmarks/clip_mse.py
    python benchmarks/clip_mse.py --quick
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch

from gdrq_lightning.quant import primitives as P

K_WEIGHTS = (1.0, 1.33, 1.5, 2.0, 2.5, 3.0, 4.0)
K_ACTS = (3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0)
FIXED_DEFAULT = {"weights": 2.0, "activations": 4.0}


def weight_mse(w: torch.Tensor, k: float, bits: int) -> float:
    """MSE of GDRQ's weight path (one group): clip at ``k * mean|w|`` and quantize on that range."""
    return float((P.scale_clip_fake_quant(w[None], 1, k, bits)[0] - w).pow(2).mean())


def act_mse(x: torch.Tensor, k: float, bits: int) -> float:
    """MSE of GDRQ's activation path on ``relu(x)`` with the clip at ``k * mean(relu(x))``."""
    a = torch.relu(x)
    return float((P.fake_quant_unsigned(a, k * a.mean(), bits) - a).pow(2).mean())


def rows(n: int, seed: int) -> list[tuple[str, str, int, torch.Tensor, Callable[[torch.Tensor, float, int], float]]]:
    g = torch.Generator().manual_seed(seed)
    gauss = torch.randn(n, generator=g)
    uniform = torch.rand(n, generator=g) * 2 - 1
    return [
        ("weights", "N(0, 1)", 4, gauss, weight_mse),
        ("weights", "U(-1, 1)", 4, uniform, weight_mse),
        ("weights", "N(0, 1)", 2, gauss, weight_mse),
        ("weights", "U(-1, 1)", 2, uniform, weight_mse),
        ("activations", "ReLU(N(0, 1))", 4, gauss, act_mse),
        ("activations", "ReLU(N(0, 1))", 2, gauss, act_mse),
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=2_000_000, help="draws per distribution")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: 20,000 draws")
    args = p.parse_args(argv)
    n = 20_000 if args.quick else args.samples
    print(f"# clip MSE: {n} draws per distribution, seed {args.seed}; cells are MSE / best MSE of the row, "
          "* marks the former fixed default k")
    inputs = rows(n, args.seed)
    for kind, ks in (("weights", K_WEIGHTS), ("activations", K_ACTS)):
        print(f"\n### {kind}: T = k * mean|x|\n")
        print("| input | bits | " + " | ".join(f"k={k:g}" + ("*" if k == FIXED_DEFAULT[kind] else "") for k in ks)
              + " | best k | best MSE |")
        print("|---|---:|" + "---:|" * len(ks) + "---:|---:|")
        for row_kind, name, bits, x, mse in inputs:
            if row_kind != kind:
                continue
            errors = [mse(x, k, bits) for k in ks]
            best = min(range(len(ks)), key=errors.__getitem__)
            cells = " | ".join(f"{e / errors[best]:.2f}" for e in errors)
            print(f"| {name} | {bits} | {cells} | {ks[best]:g} | {errors[best]:.2e} |")


if __name__ == "__main__":
    main()
