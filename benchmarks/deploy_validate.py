"""What ``simulate_deploy`` alone does to a trained checkpoint: ``gdrq export --validate`` before and after.

1. ``before``: ``gdrq export --ckpt CKPT --validate`` of the checkpoint as trained (8-bit output
   grids calibrated on ``--calibration-batches`` validation batches, as ``gdrq export`` does).
2. ``deploy``: the checkpoint's network put into deploy form with ``simulate_deploy`` on
   ``--deploy-batches`` training batches (what the schedule's ``deploy`` phase does: the inputs
   captured from the task's ``quant_forward`` through ``network_inputs``), saved as a checkpoint
   whose state lists the phase ``deploy``, then ``gdrq export --validate`` of that checkpoint;
   no training in between.
3. ``--finetune-steps N``: N SGD steps in deploy form on training batches (grids fixed), then
   validate again; and the same weights with their grids set up again from fresh batches
   (``clear_deploy`` + ``simulate_deploy``), to see whether grids that stayed fixed cost anything.

Usage:
    python benchmarks/deploy_validate.py --ckpt runs/.../last.ckpt --out benchmarks/results/deploy_digits.json
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gdrq_lightning.checkpoint import gdrq_state, load_checkpoint, load_datamodule, load_quantized_module  # noqa: E402
from gdrq_lightning.cli import main as gdrq  # noqa: E402
from gdrq_lightning.export import clear_deploy, network_inputs, simulate_deploy  # noqa: E402
from gdrq_lightning.export.accuracy import datamodule_from_config  # noqa: E402
from gdrq_lightning.task import quant_forward, quant_network  # noqa: E402


def export_validate(ckpt: str, out: Path, extra: list[str]) -> dict[str, Any]:
    """``gdrq export --ckpt CKPT --out OUT --validate`` in this process; the report's numbers."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        gdrq(["export", "--ckpt", ckpt, "--out", str(out), "--validate", *extra])
    report = json.loads((out / "model_report.json").read_text())
    return {"validation": report["validation"], "kernels": report["onnx"]["kernels"], "deploy": report["deploy"]}


def train_batches(datamodule: Any, count: int) -> list[Any]:
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    return [datamodule.on_after_batch_transfer(b, 0) for b in itertools.islice(loader, count)]


def save_deployed(ckpt: str, module: Any, path: Path) -> Path:
    """The checkpoint with the deploy-form weights and ``deploy`` appended to the callback's phases."""
    saved = load_checkpoint(ckpt)
    key = next(k for k in saved["callbacks"] if k.startswith("GDRQCallback"))
    saved["callbacks"][key] = gdrq_state(saved, ckpt) | {"done": [*gdrq_state(saved, ckpt)["done"], "deploy"]}
    saved["state_dict"] = module.state_dict()
    torch.save(saved, path)
    return path


def finetune(module: Any, batches: list[Any], steps: int, lr: float) -> None:
    """``steps`` SGD steps of the task's own training step in deploy form (train mode; BatchNorms stay frozen)."""
    params = [p for n, p in module.named_parameters() if p.requires_grad and "act_quantizer" not in n]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    module.train()
    for step, batch in zip(range(steps), itertools.cycle(batches)):
        loss = module.training_step(batch, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    module.eval()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--out", required=True, help="JSON file for the numbers")
    parser.add_argument("--work", default="runs/deploy_validate", help="folder for the exports and checkpoints")
    parser.add_argument("--data-config", help="a gdrq config whose data section to use instead of the checkpoint's")
    parser.add_argument("--deploy-batches", type=int, default=4, help="training batches simulate_deploy sets grids on")
    parser.add_argument("--finetune-steps", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out, work = Path(args.out), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    extra = ["--data-config", args.data_config] if args.data_config else []
    result: dict[str, Any] = {"ckpt": args.ckpt, "loadavg_start": os.getloadavg(), "deploy_batches": args.deploy_batches}
    t = time.time()
    result["before"] = export_validate(args.ckpt, work / "before", extra)
    module = load_quantized_module(args.ckpt)
    data = datamodule_from_config(args.data_config) if args.data_config else load_datamodule(args.ckpt)
    batches = train_batches(data, max(args.deploy_batches, 1))
    network = quant_network(module)
    inputs = network_inputs(network, batches[: args.deploy_batches], lambda b: quant_forward(module, b))
    simulate_deploy(network, inputs)
    deployed = save_deployed(args.ckpt, module, work / "deploy.ckpt")
    result["deploy"] = export_validate(str(deployed), work / "deploy", extra)
    if args.finetune_steps:
        finetune(module, train_batches(data, args.finetune_steps), args.finetune_steps, args.lr)
        tuned = save_deployed(args.ckpt, module, work / "deploy_tuned.ckpt")
        result["deploy_finetuned"] = export_validate(str(tuned), work / "tuned", extra) | {"steps": args.finetune_steps, "lr": args.lr}
        clear_deploy(network)
        fresh = train_batches(data, args.deploy_batches)  # another shuffle: other batches
        simulate_deploy(network, network_inputs(network, fresh, lambda b: quant_forward(module, b)))
        regridded = save_deployed(args.ckpt, module, work / "deploy_regridded.ckpt")
        result["deploy_finetuned_regridded"] = export_validate(str(regridded), work / "regridded", extra)
    result["seconds"] = time.time() - t
    result["loadavg_end"] = os.getloadavg()
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
