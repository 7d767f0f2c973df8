"""The ``gdrq`` command: ``gdrq --help`` lists its six subcommands.

``gdrq fit|validate|test|predict --config FILE`` is a LightningCLI (configs name the
LightningModule / DataModule by ``class_path``); ``gdrq export`` turns a checkpoint
into integer weights + ONNX; ``gdrq data NAME DIR`` runs a data command that a package
declares under the ``gdrq.data`` entry-point group (this repository's: the embedded demo
datasets), so the library never names task code. User errors end in one line on stderr
and exit code 2; set ``GDRQ_DEBUG=1`` (or pass ``--debug``) for the full traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import EntryPoint, entry_points
from typing import Optional

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar, TQDMProgressBar
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.utilities import rank_zero_info

from .interrupt import InterruptCheckpoint
from .monitoring import QuantMonitor
from .progress import LineProgressBar
from .quiet import quiet_output, verbose_requested
from .run_checkpoint import RunCheckpoint
from .run_folder import RunConfigCallback, default_logger_config, finish_wandb, plan_run_folder, where_written
from .utils.run import RunFolder

DATA_GROUP = "gdrq.data"  # entry points: name -> callable(out_dir, seed=...) returning what it wrote
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, FloatingPointError, KeyError, TypeError)


class GDRQCLI(LightningCLI):
    """LightningCLI with one folder per run (:mod:`gdrq_lightning.run_folder`), an
    always-present :class:`RunCheckpoint` (``--checkpoint.*``: ``last.ckpt`` plus the best of the
    final phase), a :class:`QuantMonitor` (``--quant_monitor.*``; idle on a network without
    quantized layers), an :class:`InterruptCheckpoint` (SIGINT/SIGTERM -> ``interrupted.ckpt``),
    W&B offline as the default logger, Rich's progress bar on terminals and one line per epoch
    (:class:`LineProgressBar`) when the output is a file."""

    def add_arguments_to_parser(self, parser) -> None:  # type: ignore[override]
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.filename": "best-{epoch}-{step}"})
        parser.add_lightning_class_args(QuantMonitor, "quant_monitor")
        parser.add_lightning_class_args(InterruptCheckpoint, "interrupt_checkpoint")
        parser.add_argument("--out", type=Optional[str], default=None,
                            help="the run folder (default: runs/<task>/<config name>/ for fit, the checkpoint's folder "
                                 "for validate / test / predict, which write into its validate/, test/, predictions/)")

    def instantiate_trainer(self, **kwargs) -> pl.Trainer:  # type: ignore[override]
        self.run_folder = plan_run_folder(str(self.subcommand), self.config[self.subcommand], self.config_init[self.subcommand])
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.append(RunFolder(self.run_folder))
        if not sys.stdout.isatty():  # a log file: one line per epoch instead of a redrawn bar
            for i, cb in enumerate(trainer.callbacks):
                if type(cb) in (RichProgressBar, TQDMProgressBar):
                    trainer.callbacks[i] = LineProgressBar()
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand == "fit":
            rank_zero_info(f"[gdrq] run folder: {self.run_folder}")
        super()._run_subcommand(subcommand)
        finish_wandb(self.trainer)
        if subcommand != "fit" and self.trainer.is_global_zero:
            print(where_written(self.trainer, subcommand, self.run_folder), flush=True)


def check_ckpt_path(args: list[str]) -> None:
    """Fail in one line on a missing or truncated ``--ckpt_path`` (LightningCLI reads it
    while parsing, and torch's own error is a page long)."""
    for i, arg in enumerate(args):
        path = args[i + 1] if arg == "--ckpt_path" and i + 1 < len(args) else arg.partition("=")[2] if arg.startswith("--ckpt_path=") else None
        if path and path not in ("last", "best", "hpc", "registry", "null"):
            from .checkpoint import load_checkpoint

            load_checkpoint(path)


def run_lightning(args: list[str]) -> None:
    check_ckpt_path(args)
    GDRQCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults={"logger": default_logger_config()},
        save_config_callback=RunConfigCallback,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"exit_on_error": False},  # config errors reach main() as exceptions: one line each
        auto_configure_optimizers=False,
        args=None if args == sys.argv[1:] else args,  # LightningCLI warns when both are given
    )


def run_export(args: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="gdrq export", description="Export a gdrq checkpoint: integer weights, ONNX and a JSON report.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  gdrq export --ckpt runs/classification/digits_gdrq_w4a4/last.ckpt --validate   "
               "# writes runs/classification/digits_gdrq_w4a4/export/\n"
               "  gdrq export --ckpt runs/detection/digits_coco_gdrq_w4a4/last.ckpt --out export_det/ "
               "--input-shape 3 96 96 --data-config configs/detection/digits_coco_gdrq_w4a4.yaml\n"
               "  gdrq export --ckpt runs/.../last.ckpt --out export/ --data-config configs/classification/digits_gdrq_w4a4.yaml")
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint written by a gdrq run (e.g. runs/.../last.ckpt)")
    parser.add_argument("--out", default=None, help="output directory (default: export/ in the checkpoint's run folder)")
    parser.add_argument("--input-shape", type=int, nargs=3, default=[3, 32, 32], metavar=("C", "H", "W"),
                        help="example input shape (default: 3 32 32); the batch and, where the network allows, the "
                             "image size stay dynamic in the ONNX file")
    parser.add_argument("--data-config", help="a gdrq config: its validation images calibrate the 8-bit grids of float "
                                              "outputs, and PyTorch and ONNX Runtime are compared on them (top-1, pixel "
                                              "accuracy, or matching detections)")
    parser.add_argument("--calibration-batches", type=int, default=4, metavar="N",
                        help="validation batches (detection: images) of --data-config used for calibration (default: 4)")
    parser.add_argument("--onnx-weights", choices=["int8", "int4"], default="int8",
                        help="int8: weight codes in int8, integer kernels in ONNX Runtime (default); int4: codes of "
                             "<= 4-bit layers as INT4, the smallest file (ONNX Runtime runs those layers in float)")
    parser.add_argument("--float-outputs", action="store_true",
                        help="keep layers whose output no quantizer reads (residual branches, FPN outputs) in float: "
                             "closer to the fake-quant model, fewer integer kernels")
    parser.add_argument("--validate", action="store_true",
                        help="run the written ONNX file in ONNX Runtime's default session over the validation split of "
                             "the run's datamodule (the checkpoint's, or --data-config) with the task's metric (top-1, "
                             "COCO mAP, mIoU) and print PyTorch and ONNX Runtime side by side with their agreement; "
                             "the numbers go into the report as 'validation'")
    ns = parser.parse_args(args)
    if ns.calibration_batches < 1:
        raise ValueError(f"--calibration-batches={ns.calibration_batches} must be >= 1")
    import json

    import torch

    from .checkpoint import gdrq_state, load_checkpoint, load_datamodule, load_quantized_module
    from .export import export_model
    from .export.accuracy import calibration_inputs, compare_predictions, datamodule_from_config
    from .export.phase_check import export_phase_warning
    from .export.summary import format_export_summary
    from .export.validate import validate_onnx
    from .run_folder import export_dir
    from .task import export_metric, export_network

    warning = export_phase_warning(gdrq_state(load_checkpoint(ns.ckpt), ns.ckpt))
    if warning:
        print(warning, file=sys.stderr)
    out = ns.out or str(export_dir(ns.ckpt))
    module = load_quantized_module(ns.ckpt)
    network = export_network(module)
    datamodule = datamodule_from_config(ns.data_config) if ns.data_config else load_datamodule(ns.ckpt) if ns.validate else None
    calibration = calibration_inputs(datamodule, ns.calibration_batches) if datamodule is not None else None
    report = export_model(network, torch.zeros(1, *ns.input_shape), out, weight_format=ns.onnx_weights,
                          calibration=calibration, float_outputs=ns.float_outputs)
    if ns.validate:  # the task's metric and the agreement: what --data-config alone compares, and more
        report["validation"] = validate_onnx(network, report["files"]["onnx"], datamodule, export_metric(module, datamodule))
    elif datamodule is not None:
        report["val_accuracy"] = compare_predictions(network, report["files"]["onnx"], datamodule)
    if datamodule is not None:
        with open(report["files"]["report"], "w") as f:
            json.dump(report, f, indent=2)
    print(format_export_summary(report))


def run_bits(args: list[str]) -> None:
    from .mixed.command import run_bits as plan  # SciPy and the sensitivity code load for this command only

    plan(args)


def data_commands() -> dict[str, EntryPoint]:
    """The installed ``gdrq data`` commands (entry-point group ``gdrq.data``), by name."""
    return {ep.name: ep for ep in entry_points(group=DATA_GROUP)}


def run_data(args: list[str]) -> None:
    commands = data_commands()
    parser = argparse.ArgumentParser(prog="gdrq data", description="Write a dataset that an installed package provides "
                                     f"(entry-point group {DATA_GROUP!r}), e.g. the embedded demo sets.")
    parser.add_argument("command", choices=sorted(commands), help="one of: " + (", ".join(sorted(commands)) or "(none installed)"))
    parser.add_argument("out_dir", help="directory to write the dataset into")
    parser.add_argument("--seed", type=int, default=0)
    ns = parser.parse_args(args)
    print(commands[ns.command].load()(ns.out_dir, seed=ns.seed))


COMMANDS = {
    "fit": "train a model from a config (gdrq fit --config configs/classification/digits_gdrq_w4a4.yaml)",
    "validate": "score a checkpoint on the validation split (--config FILE --ckpt_path CKPT)",
    "test": "score a checkpoint on the test split (--config FILE --ckpt_path CKPT)",
    "predict": "run a checkpoint on the predict split (classification: classes.csv; detection: COCO results json "
               "+ drawn boxes; segmentation: palette PNG masks)",
    "export": "turn a quantized checkpoint into integer weights + ONNX (gdrq export --ckpt CKPT --out DIR)",
    "data": "write a dataset an installed package provides (gdrq data NAME DIR; e.g. make-digits-coco)",
    "bits": "plan weight bits per layer under a budget (gdrq bits --config FILE --budget avg_weight_bits=3 --out DIR)",
}


def top_level_help() -> str:
    """``gdrq --help``: every subcommand with one line (LightningCLI's own lists only the first four)."""
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    return "\n".join([
        "usage: gdrq {fit,validate,test,predict,export,data,bits} ...",
        "",
        "Low-bit quantization-aware training of vision networks with PyTorch Lightning.",
        "",
        "commands:", *lines,
        "",
        "'gdrq COMMAND --help' shows a command's options. Errors end in one line (exit code 2);",
        "set GDRQ_DEBUG=1 or pass --debug for the traceback; --verbose shows the third-party notices gdrq hides.",
    ])


def one_line(message: str) -> str:
    """A DataLoader worker's error arrives as 'Caught X in DataLoader worker process N. Original
    Traceback ...': report the original error's last line."""
    if message.startswith("Caught ") and "Original Traceback" in message:
        lines = [line for line in message.splitlines() if line.strip()]
        last = lines[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return message


def _raised_in(e: BaseException, package: str) -> bool:
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(tb.tb_frame.f_globals.get("__name__", "")).startswith(package)


def root_cause(e: BaseException) -> BaseException:
    """The error to report: jsonargparse wraps one raised while it builds a class from the
    config (e.g. ``QuantConfig.weight_bits=9 is out of range``) in pages of nested Union
    attempts, so follow its ``raise ... from`` chain back to the original error."""
    while isinstance(e.__cause__, (*USER_ERRORS, argparse.ArgumentError)) and (
        isinstance(e, argparse.ArgumentError) or _raised_in(e, "jsonargparse")
    ):
        e = e.__cause__
    return e


_JSONARGPARSE_NOISE = (
    "Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Expected a <class 'NoneType'>",
    "Given value", "Not a valid subclass", "Subclass types expect", "- a class path", "- a dict",
)


def condense(message: str) -> str:
    """jsonargparse's nested Union report reduced to the lines that name the key and the problem."""
    lines = [line.strip(" -") for line in message.splitlines() if line.strip()]
    return " ".join(line for line in lines if not any(noise in line for noise in _JSONARGPARSE_NOISE))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``gdrq`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("GDRQ_DEBUG", "") not in ("", "0") or "--debug" in args
    args = [a for a in args if a != "--debug"]
    verbose, args = verbose_requested(args)
    if argv is None:
        sys.argv[1:] = args  # without gdrq's own flags: LightningCLI then reads sys.argv, as it expects
    commands = {"export": run_export, "data": run_data, "bits": run_bits}
    if not args or args[0] in ("-h", "--help"):
        print(top_level_help())
        sys.exit(0 if args else 2)
    if args[0] not in COMMANDS and not args[0].startswith("-"):
        print(f"gdrq: error: unknown command {args[0]!r}; one of: {', '.join(COMMANDS)} (gdrq --help)", file=sys.stderr)
        sys.exit(2)
    try:
        with quiet_output(verbose):
            if args and args[0] in commands:
                commands[args[0]](args[1:])
            else:
                run_lightning(args)
    except (*USER_ERRORS, argparse.ArgumentError) as e:
        if debug:
            raise
        cause = root_cause(e)
        text = condense(str(cause)) if isinstance(cause, argparse.ArgumentError) else f"{type(cause).__name__}: {one_line(str(cause))}"
        print(f"gdrq: error: {text}\n(set GDRQ_DEBUG=1 or pass --debug for the traceback)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
