"""Where the extra time of a quantized training step goes: torch.profiler, FP32 vs one variant.

Profiles ``--steps`` full training steps (forward + loss + backward + SGD) of each
network after a warm-up and prints, per ATen op, the self CPU time of both and the
difference, largest difference first. The ops that exist only in the quantized step
(fake-quant kernels, reductions for thresholds, clamps) are the overhead; the rest is
noise between two profiles.

Usage:
    python benchmarks/profile_step.py --threads 1 --batch 32 --size 64
    python benchmarks/profile_step.py --variant "ours HWGQ W1A2"
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections import defaultdict

import torch
from torch.nn import functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baselines  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet18", choices=baselines.MODELS)
    p.add_argument("--variant", default=None, help="a label of step_overhead.py (default: ours GDRQ W4A4 G=<groups>)")
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--top", type=int, default=15, help="rows of the table")
    p.add_argument("--quick", action="store_true", help="smoke run: batch 2, 16x16, 1 step")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.size, args.steps = 2, 16, 1
    args.variant = args.variant or f"ours GDRQ W4A4 G={args.groups}"
    variants = baselines.step_variants(args.groups)
    if args.variant not in variants:
        p.error(f"unknown --variant {args.variant!r}; choose from: {', '.join(variants)}")
    return args


def self_cpu_ms(label: str, args: argparse.Namespace) -> tuple[dict[str, float], float]:
    """Per-op self CPU milliseconds per step, and the total per step."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = baselines.step_variants(args.groups)[label](args.model)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(args.batch, 3, args.size, args.size, generator=g), torch.randint(0, 10, (args.batch,), generator=g)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    per_op: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        per_op[event.key] += event.self_cpu_time_total / 1e3 / args.steps
    return dict(per_op), sum(per_op.values())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    fp, fp_total = self_cpu_ms("FP32", args)
    q, q_total = self_cpu_ms(args.variant, args)
    print(f"# profile: {args.model}, batch {args.batch}, 3x{args.size}x{args.size}, threads {torch.get_num_threads()}, "
          f"{args.steps} steps; self CPU ms per step: FP32 {fp_total:.1f}, {args.variant} {q_total:.1f} "
          f"({q_total / fp_total:.2f}x)\n")
    print(f"| op | FP32 ms/step | {args.variant} ms/step | difference | share of the overhead |")
    print("|---|---:|---:|---:|---:|")
    extra = q_total - fp_total
    diffs = sorted(set(fp) | set(q), key=lambda k: q.get(k, 0.0) - fp.get(k, 0.0), reverse=True)
    for op in diffs[: args.top]:
        d = q.get(op, 0.0) - fp.get(op, 0.0)
        share = f"{100 * d / extra:.0f} %" if extra > 0 else "-"
        print(f"| {op} | {fp.get(op, 0.0):.1f} | {q.get(op, 0.0):.1f} | {d:+.1f} | {share} |")


if __name__ == "__main__":
    main()
