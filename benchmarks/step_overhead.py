"""Training-step overhead of quantization-aware training: FP32 vs ours vs torch.ao vs Brevitas.

One full training step = forward + cross-entropy + backward + SGD(momentum) step, in float32
or under ``bf16-mixed`` autocast, eager and/or ``torch.compile``d. All variants of a model
live in ONE process and are timed round-robin (the order rotates every round), so a load
spike on a shared machine hits every variant alike. Each round times ``--steps``
consecutive steps per variant; the table shows the median over rounds, and the ratio to
FP32 as the median of the per-round ratios (paired, so drift between rounds cancels):
eager rows against FP32 eager, compiled rows against FP32 compiled (and, last column, eager).

Peak memory (``--memory``, on by default except with ``--quick``):
  * cpu (eager rows): each (model, variant) runs in a fresh subprocess; a throw-away copy of the
    model first runs one step on a batch of 2, so code loaded and kernels compiled on first use
    are not counted; then the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``),
    ``--mem-steps`` steps run, and the number is ``VmHWM - RSS before the first step``:
    gradients, optimizer state, saved activations and allocator slack. Falls back to
    ``ru_maxrss`` where ``clear_refs`` is not writable (then it is an upper bound).
  * cuda: in process, after warm-up steps, ``torch.cuda.max_memory_allocated()`` over
    ``--mem-steps`` more steps minus the allocation before them (``reset_peak_memory_stats()``):
    saved activations, gradients and temporaries.

Defaults: cpu: ResNet-18 and MobileNetV3-small, batch 32, 3x64x64, float32, eager; cuda:
ResNet-18 and ResNet-50, batch 128, 3x224x224, bf16-mixed, eager and compiled.

Usage:
    python benchmarks/step_overhead.py --threads 1 --batch 32 --size 64
    python benchmarks/step_overhead.py --compile both --models resnet18      # + compiled rows
    python benchmarks/step_overhead.py --device cuda --batch 256 --models resnet50
    python benchmarks/step_overhead.py --quick
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baselines  # noqa: E402

MODELS = baselines.MODELS + ("resnet50",)
DEFAULTS = {  # device -> models, batch, size, precision, compile
    "cpu": (["resnet18", "mobilenet_v3_small"], 32, 64, "32", "off"),
    "cuda": (["resnet18", "resnet50"], 128, 224, "bf16-mixed", "both"),
}
COMPILED = " (compiled)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--models", nargs="+", choices=MODELS, help="default: see the module docstring")
    p.add_argument("--batch", type=int)
    p.add_argument("--size", type=int, help="input side length (3 x size x size)")
    p.add_argument("--precision", choices=("32", "bf16-mixed"), help="float32, or bf16 autocast as Lightning's bf16-mixed")
    p.add_argument("--compile", choices=("off", "on", "both"), help="eager rows, compiled rows, or both")
    p.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled rows")
    p.add_argument("--variants", nargs="+", help="only the variants whose label contains one of these (FP32 always runs)")
    p.add_argument("--groups", type=int, default=8, help="GDRQ weight groups G (divides every layer here)")
    p.add_argument("--repeats", type=int, default=15, help="round-robin rounds")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant before the rounds")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (default 1: on a loaded machine several OpenMP threads collapse)")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None, help="measure peak memory (default: on unless --quick)")
    p.add_argument("--mem-steps", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny smoke run: batch 2, 16x16, 2 rounds, no memory")
    p.add_argument("--memory-worker", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    models, batch, size, precision, compile_ = DEFAULTS[args.device]
    args.models = args.models or models
    args.batch, args.size = args.batch or batch, args.size or size
    args.precision, args.compile = args.precision or precision, args.compile or compile_
    if args.quick:
        args.batch, args.size, args.repeats, args.steps, args.warmup = 2, 16, 2, 1, 1
    if args.memory is None:
        args.memory = not args.quick
    return args


def make_batch(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    return x.to(args.device), y.to(args.device)


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace, compiled: bool) -> Callable[[], None]:
    """A closure running one full training step of ``model`` (compiled: through ``torch.compile``)."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    forward = torch.compile(model, backend=args.backend) if compiled else model

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        autocast = torch.autocast(args.device, dtype=torch.bfloat16) if args.precision == "bf16-mixed" else contextlib.nullcontext()
        with autocast:
            loss = F.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()

    return step


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def variants(args: argparse.Namespace) -> dict[str, tuple[Callable[[str], nn.Module], bool]]:
    """Row label -> (builder(model_name), compiled)."""
    builders = baselines.step_variants(args.groups)
    if args.variants:
        builders = {k: v for k, v in builders.items() if k == "FP32" or any(s in k for s in args.variants)}
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    return {label + (COMPILED if c else ""): (build, c) for c in modes for label, build in builders.items()}


def build(builder: Callable[[str], nn.Module], model_name: str, device: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return builder(model_name).to(device)


def ready_steps(model_name: str, args: argparse.Namespace) -> dict[str, Callable[[], None]]:
    """Every variant's step, built and warmed up (compiled rows compile here); a variant that
    cannot run this model or mode is left out with a note."""
    x, y = make_batch(args)
    steps = {}
    for label, (builder, compiled) in variants(args).items():
        try:
            step = make_step(build(builder, model_name, args.device), x, y, args, compiled)
            for _ in range(max(args.warmup, 3 if compiled else 0)):  # compiled: the first-batch flags recompile once
                step()
        except Exception as err:  # e.g. no torch.ao quantizable model, or a compile failure
            print(f"note: {label} skipped on {model_name}: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
            continue
        steps[label] = step
    sync(args.device)
    return steps


def time_model(model_name: str, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Median ms/step and median paired ratios to FP32 (same mode, and eager) for every variant."""
    steps = ready_steps(model_name, args)
    labels = list(steps)
    times: dict[str, list[float]] = {label: [] for label in labels}
    for r in range(args.repeats):
        order = labels[r % len(labels):] + labels[: r % len(labels)]
        for label in order:
            sync(args.device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                steps[label]()
            sync(args.device)
            times[label].append((time.perf_counter() - t0) / args.steps * 1e3)

    def ratio(t: list[float], ref: str) -> float:
        return statistics.median([a / b for a, b in zip(t, times[ref])]) if ref in times else float("nan")

    return {
        label: {
            "ms": statistics.median(t),
            "min": min(t),
            "ratio": ratio(t, "FP32" + (COMPILED if label.endswith(COMPILED) else "")),
            "ratio_eager": ratio(t, "FP32"),
        }
        for label, t in times.items()
    }


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes(reset_ok: bool) -> int:
    if reset_ok:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _warm_step(model_name: str, label: str, args: argparse.Namespace) -> Callable[[], None]:
    """The variant's step after warm-up steps (cuda memory: the steady state)."""
    builder, compiled = variants(args)[label]
    x, y = make_batch(args)
    step = make_step(build(builder, model_name, args.device), x, y, args, compiled)
    for _ in range(3 if compiled else 1):
        step()
    return step


def memory_worker(args: argparse.Namespace) -> None:
    """Subprocess body: peak RSS growth over ``--mem-steps`` training steps, printed as JSON."""
    model_name, label = args.memory_worker
    builder, _ = variants(args)[label]
    x, y = make_batch(args)
    make_step(build(builder, model_name, "cpu"), x[:2], y[:2], args, compiled=False)()  # loads code, builds kernels
    step = make_step(build(builder, model_name, "cpu"), x, y, args, compiled=False)
    base = _rss_bytes()
    reset_ok = _reset_peak_rss()
    for _ in range(args.mem_steps):
        step()
    print(json.dumps({"peak_bytes": _peak_rss_bytes(reset_ok) - base, "hwm_reset": reset_ok}))


def measure_memory(model_name: str, labels: list[str], args: argparse.Namespace) -> dict[str, float]:
    """Peak memory (bytes) per variant: subprocess RSS on cpu, allocator peak on cuda."""
    out: dict[str, float] = {}
    for label in labels:
        if args.device == "cpu" and label.endswith(COMPILED):
            continue  # a first step would count the compiler's own memory
        if args.device == "cuda":
            step = _warm_step(model_name, label, args)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            for _ in range(args.mem_steps):
                step()
            torch.cuda.synchronize()
            out[label] = float(torch.cuda.max_memory_allocated() - base)
            del step
            torch.cuda.empty_cache()
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-worker", model_name, label,
               "--batch", str(args.batch), "--size", str(args.size), "--groups", str(args.groups),
               "--mem-steps", str(args.mem_steps), "--precision", args.precision, "--compile", args.compile,
               "--backend", args.backend]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            print(f"memory worker failed for {model_name} / {label}:\n{res.stderr[-2000:]}", file=sys.stderr)
            out[label] = float("nan")
            continue
        out[label] = float(json.loads(res.stdout.strip().splitlines()[-1])["peak_bytes"])
    return out


def print_table(model_name: str, timing: dict[str, dict[str, float]], memory: dict[str, float] | None) -> None:
    compiled = any(label.endswith(COMPILED) for label in timing)
    head = "| variant | ms/step (median) | ms/step (min) | step ratio vs FP32 |"
    rule = "|---|---:|---:|---:|"
    if compiled:
        head += " vs FP32 eager |"
        rule += "---:|"
    if memory:
        head += " peak mem (MiB) | mem ratio vs FP32 |"
        rule += "---:|---:|"
    print(f"\n### {model_name}\n")
    print(head)
    print(rule)
    for label, t in timing.items():
        row = f"| {label} | {t['ms']:.1f} | {t['min']:.1f} | {t['ratio']:.2f}x |"
        if compiled:
            row += f" {t['ratio_eager']:.2f}x |"
        if memory:
            mem, fp = memory.get(label), memory.get("FP32", float("nan"))
            row += " - | - |" if mem is None else f" {mem / 2**20:.0f} | {mem / fp:.2f}x |"
        print(row)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        memory_worker(args)
        return
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    print(f"# step overhead: device={device}, threads={torch.get_num_threads()}, batch={args.batch}, "
          f"input=3x{args.size}x{args.size}, precision={args.precision}, compile={args.compile} ({args.backend}), "
          f"rounds={args.repeats} x {args.steps} steps, warm-up {args.warmup}, torch {torch.__version__}, loadavg at start {load}")
    if not baselines.brevitas_available():
        print(baselines.BREVITAS_MISSING)
    for model_name in args.models:
        timing = time_model(model_name, args)
        memory = measure_memory(model_name, list(timing), args) if args.memory else None
        print_table(model_name, timing, memory)
    with open("/proc/loadavg") as f:
        print(f"\nloadavg at end {' '.join(f.read().split()[:3])}")
    if args.memory and args.device == "cpu":
        print("peak mem = peak RSS growth of a fresh process over its first steps (grads, optimizer state, activations), "
              "code and kernels loaded before; not measured for compiled rows")


if __name__ == "__main__":
    main()
