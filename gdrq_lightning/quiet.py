"""Quiet by default: the ``gdrq`` command hides third-party notices that ask nothing of its users.

Each entry below names a known notice and where it comes from; everything else (the
project's own warnings, Lightning's warnings about the user's settings) still prints.
``gdrq ... --verbose`` (or ``GDRQ_VERBOSE=1``) shows everything. W&B is made silent, its
console capture off and its git probing off (unless the user set those variables), so no
colour codes reach a log file and nothing follows the run's last line.
"""
from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# Python warnings, matched against the start of the message
KNOWN_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's pytree helper on torch >= 2.10
    r"The dirpath has changed from",  # ModelCheckpoint restored in another folder (test / predict)
    r"You are using `torch.load` with `weights_only=False`",  # torch FutureWarning on trusted checkpoints
    r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint",  # test / predict of a fit's checkpoint
    r".*does not have many workers",  # the in-memory demo sets are fastest without workers
    r"Checkpoint directory .* exists and is not empty",  # a resumed fit continues in its own folder
    r"Experiment logs directory .* exists and is not empty",  # the CSV logger of a repeated `gdrq test`
)
# log lines (substrings) of Lightning's and torch's loggers
KNOWN_LOG_LINES = (
    "Tip: For seamless cloud",  # Lightning's advertisement for litlogger / litmodels
    "GPU available:", "TPU available:", "HPU available:",
    "Loading `train_dataloader` to estimate number of stepping batches",
    "No CUDA runtime is found",  # torch's C++ extension probe when the CPU kernels compile
)
LOGGERS = ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric", "torch.utils.cpp_extension")
WANDB_ENV = {"WANDB_SILENT": "true", "WANDB_CONSOLE": "off", "WANDB_DISABLE_GIT": "true"}


class _DropKnownLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(line in message for line in KNOWN_LOG_LINES)


def verbose_requested(args: list[str]) -> tuple[bool, list[str]]:
    """``(verbose, args without gdrq's own --verbose)``. A ``--verbose`` followed by a value is
    left alone: ``gdrq test --verbose false`` is Lightning's option of ``Trainer.test``."""
    values = {"true", "false", "yes", "no", "1", "0"}
    keep, verbose = [], os.environ.get("GDRQ_VERBOSE", "") not in ("", "0")
    for i, arg in enumerate(args):
        if arg == "--verbose" and (i + 1 == len(args) or args[i + 1].lower() not in values):
            verbose = True
        else:
            keep.append(arg)
    return verbose, keep


@contextmanager
def quiet_output(verbose: bool = False) -> Iterator[None]:
    """Within the block: the known notices are hidden and W&B is silent; on exit the warning
    filters, log filters and environment are as before (so a test that calls the command in
    process keeps its own settings)."""
    if verbose:
        yield
        return
    drop = _DropKnownLines()
    targets = [logging.getLogger(name) for name in LOGGERS]
    targets += [h for logger in targets for h in logger.handlers]  # propagated records pass the handlers
    saved_env = {k: os.environ.get(k) for k in WANDB_ENV}
    with warnings.catch_warnings():
        for pattern in KNOWN_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        for target in targets:
            target.addFilter(drop)
        for key, value in WANDB_ENV.items():
            os.environ.setdefault(key, value)
        try:
            yield
        finally:
            for target in targets:
                target.removeFilter(drop)
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
