"""Throughput of our fake-quantizers (forward + backward) against ``clone`` and ATen's fake-quant.

Each op runs forward and backward on a leaf tensor with a fixed upstream gradient:

* weights ``[512, 512, 3, 3]``: ``clone``; ``torch.fake_quantize_per_channel_affine``
  (4-bit, one scale per output channel); the plain composition our weight path replaces
  (Scale-Clip ``clamp`` + ``fake_quantize_per_channel_affine``, what the quantizer ran
  before the speed work); ours, ``WeightQuantizer`` (GDRQ W4, ``--groups`` groups, train
  mode: threshold, clip, quantize, masks).
* activations ``[32, 128, 28, 28]`` (pre-ReLU): ``clone``; ``torch.fake_quantize_per_tensor_affine``
  and ``..._per_channel_affine`` (4-bit unsigned) on the ReLU output; the plain composition
  (``relu`` + ``minimum`` + per-tensor fake-quant); ours, ``ActQuantizer`` (GDRQ A4, train
  mode: ReLU, EMA statistics, clip, quantize).

Ours runs twice: with the fused kernels inductor compiles (the default) and with the same
kernel bodies as ATen ops (``GDRQ_KERNELS=eager``, the fallback where compiling fails).

GB/s counts the same nominal traffic for every op: read x + write y forward, read dy +
write dx backward (``4 * numel * 4`` bytes), so GB/s is proportional to 1 / time; the
ratio column is time / time of ``clone``. Ops run round-robin, the table shows medians.

Usage:
    python benchmarks/fake_quant_throughput.py --threads 1
    python benchmarks/fake_quant_throughput.py --quick
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Union

import torch

from gdrq_lightning import QuantConfig
from gdrq_lightning.quant import ActQuantizer, WeightQuantizer
from gdrq_lightning.quant import kernels

Op = Union[Callable[[torch.Tensor], torch.Tensor], tuple[Callable[[torch.Tensor], torch.Tensor], str]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--groups", type=int, default=8, help="GDRQ weight groups G")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="small tensors, 2 rounds")
    args = p.parse_args(argv)
    args.weight_shape, args.act_shape = (512, 512, 3, 3), (32, 128, 28, 28)
    if args.quick:
        args.weight_shape, args.act_shape, args.repeats = (64, 32, 3, 3), (2, 16, 8, 8), 2
    return args


def fwd_bwd(op: Op, x: torch.Tensor, g: torch.Tensor) -> Callable[[], None]:
    """Forward and backward of ``op``: a function, or ``(function, kernel backend)``."""
    fn, backend = op if isinstance(op, tuple) else (op, "auto")

    def run() -> None:
        x.grad = None
        with kernels.use_backend(backend):
            fn(x).backward(g)

    return run


def weight_ops(shape: tuple[int, ...], groups: int) -> tuple[torch.Tensor, dict[str, Op]]:
    torch.manual_seed(0)
    w = (torch.randn(shape) * 0.05).requires_grad_()
    c_out, n = shape[0], 7
    quantizer = WeightQuantizer(QuantConfig(method="gdrq", weight_bits=4, groups=groups), c_out).train()
    zero = torch.zeros(c_out, dtype=torch.int32)

    def per_channel(x: torch.Tensor) -> torch.Tensor:
        scale = (x.detach().abs().reshape(c_out, -1).amax(dim=1) / n).clamp_min(1e-8)
        return torch.fake_quantize_per_channel_affine(x, scale, zero, 0, -n, n)

    def plain(x: torch.Tensor) -> torch.Tensor:  # threshold, expand to channels, clamp, fake-quant
        t = (2.0 * x.detach().abs().reshape(groups, -1).mean(dim=1)).repeat_interleave(c_out // groups)
        tb = t.reshape(-1, *([1] * (x.dim() - 1)))
        return torch.fake_quantize_per_channel_affine(torch.clamp(x, -tb, tb), (t / n).clamp_min(1e-8), zero, 0, -n, n)

    return w, {
        "clone": torch.clone,
        "torch fake_quantize_per_channel_affine": per_channel,
        "plain clamp + per-channel fake-quant (before)": plain,
        f"ours WeightQuantizer GDRQ W4 G={groups}": quantizer,
        "ours, kernels as ATen ops (GDRQ_KERNELS=eager)": (quantizer, "eager"),
    }


def act_ops(shape: tuple[int, ...]) -> tuple[torch.Tensor, dict[str, Op]]:
    torch.manual_seed(1)
    x = torch.randn(shape).requires_grad_()
    n, channels = 15, shape[1]
    quantizer = ActQuantizer(QuantConfig(method="gdrq", act_bits=4)).train()
    quantizer(x.detach())  # EMA initialised, as after the first batch
    zero, zeros = torch.zeros(1, dtype=torch.int32), torch.zeros(channels, dtype=torch.int32)

    def per_tensor(v: torch.Tensor) -> torch.Tensor:
        y = torch.relu(v)
        return torch.fake_quantize_per_tensor_affine(y, (y.detach().amax() / n).reshape(1), zero, 0, n)

    def per_channel(v: torch.Tensor) -> torch.Tensor:
        y = torch.relu(v)
        scale = (y.detach().transpose(0, 1).reshape(channels, -1).amax(dim=1) / n).clamp_min(1e-8)
        return torch.fake_quantize_per_channel_affine(y, scale, zeros, 1, 0, n)

    def plain(v: torch.Tensor) -> torch.Tensor:  # what ActQuantizer composed before
        y = torch.relu(v)
        alpha = 4.0 * y.detach().mean()
        return torch.fake_quantize_per_tensor_affine(
            torch.minimum(torch.clamp_min(y, 0.0), alpha), (alpha / n).reshape(1), zero, 0, n
        )

    return x, {
        "clone": torch.clone,
        "torch relu + fake_quantize_per_tensor_affine": per_tensor,
        "torch relu + fake_quantize_per_channel_affine": per_channel,
        "plain relu + clamp + per-tensor fake-quant (before)": plain,
        "ours ActQuantizer GDRQ A4 (ReLU, EMA, clip, quantize)": quantizer,
        "ours, kernels as ATen ops (GDRQ_KERNELS=eager)": (quantizer, "eager"),
    }


def measure(x: torch.Tensor, ops: dict[str, Op], repeats: int) -> dict[str, float]:
    g = torch.randn_like(x)
    runs = {name: fwd_bwd(fn, x, g) for name, fn in ops.items()}
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def print_table(title: str, x: torch.Tensor, med: dict[str, float]) -> None:
    nominal = 4 * x.numel() * x.element_size()
    print(f"\n### {title} {tuple(x.shape)} ({x.numel() / 1e6:.2f} M elements)\n")
    print("| op (forward + backward) | ms | GB/s (nominal) | time vs clone |")
    print("|---|---:|---:|---:|")
    for name, t in med.items():
        print(f"| {name} | {t * 1e3:.2f} | {nominal / t / 1e9:.2f} | {t / med['clone']:.1f}x |")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"# fake-quant throughput: cpu, threads={torch.get_num_threads()}, rounds={args.repeats}, "
          f"torch {torch.__version__}, loadavg at start {load}")
    w, ops = weight_ops(args.weight_shape, args.groups)
    print_table("weights", w, measure(w, ops, args.repeats))
    x, ops = act_ops(args.act_shape)
    print_table("activations", x, measure(x, ops, args.repeats))


if __name__ == "__main__":
    main()
