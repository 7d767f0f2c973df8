"""Where a ``gdrq`` command writes: one folder per run.

``gdrq fit --config configs/<task>/<name>.yaml`` puts everything of the run (checkpoints,
the resolved ``config.yaml``, logger files, quantization plots, validation pictures) into
``runs/<task>/<name>/``, or ``runs/<task>/<name>_version_N/`` when that folder already
holds a run; a fit that resumes a checkpoint continues in the checkpoint's folder.
``validate`` / ``test`` / ``predict`` of a checkpoint write into ``validate/``, ``test/`` and
``predictions/`` of the checkpoint's folder, so they never touch the fit's ``config.yaml``.
``--out DIR`` or an explicit ``trainer.default_root_dir`` names the folder instead. Every
trainer carries the folder as a :class:`~gdrq_lightning.utils.run.RunFolder` callback, which
is what :func:`~gdrq_lightning.utils.run.run_dir` reads for the callbacks and tasks.
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pytorch_lightning.cli import SaveConfigCallback
from pytorch_lightning.loggers import WandbLogger

from .utils.run import run_dir

RUNS_ROOT = "runs"
WANDB_PROJECT = "gdrq-lightning"
# what each command writes into, inside the run folder ("" = the folder itself)
OUTPUT_SUBDIR = {"fit": "", "validate": "validate", "test": "test", "predict": "predictions", "export": "export"}
KEYWORD_CKPT_PATHS = ("last", "best", "hpc", "registry", "null")
RUN_FOLDER_ENV = "GDRQ_RUN_FOLDER"  # rank 0's folder, for the ranks Lightning launches as child processes
_VERSION = re.compile(r"_version_\d+$")


def task_and_name(config_paths: Sequence[str | os.PathLike], model_class: str | None) -> tuple[str, str]:
    """``(task, config name)`` of a run: ``configs/classification/digits.yaml`` gives
    ``("classification", "digits")``; a run folder's own ``config.yaml`` gives that run's
    task and name; a config in the working directory, or none, takes the task from the
    model class (``ClassificationModule`` -> ``classification``)."""
    from_class = re.sub(r"(Lightning)?(Module|Task)$", "", (model_class or "").rsplit(".", 1)[-1]).lower() or "run"
    if not config_paths:
        return from_class, "run"
    path = Path(os.fspath(config_paths[-1]))
    if path.name == "config.yaml" and path.parent.name:  # re-running a run folder's resolved config
        return path.parent.parent.name or from_class, _VERSION.sub("", path.parent.name)
    parent = path.resolve().parent
    task = parent.name if parent != Path.cwd().resolve() else from_class
    return task or from_class, path.stem


def _taken(folder: Path) -> bool:
    return folder.exists() and any(folder.iterdir())


def fresh_folder(base: Path) -> Path:
    """``base`` if it holds nothing yet, else the first free ``<base>_version_N`` (N >= 1)."""
    if not _taken(base):
        return base
    n = 1
    while _taken(base.with_name(f"{base.name}_version_{n}")):
        n += 1
    return base.with_name(f"{base.name}_version_{n}")


def resolve_run_folder(*, config_paths: Sequence[str | os.PathLike], model_class: str | None, ckpt_path: str | None,
                       out: str | None = None, default_root_dir: str | None = None, root: str = RUNS_ROOT) -> Path:
    """The run folder of a command, first match wins: ``--out``; an explicit
    ``trainer.default_root_dir``; the folder of ``--ckpt_path`` (a resumed fit continues
    there, ``test`` / ``predict`` write beside it); else a fresh ``<root>/<task>/<config name>``."""
    if os.environ.get(RUN_FOLDER_ENV) and os.environ.get("LOCAL_RANK", "0") != "0":
        return Path(os.environ[RUN_FOLDER_ENV])  # a DDP child rank: rank 0 chose (and may have created) it
    if out:
        return Path(out)
    if default_root_dir:
        return Path(default_root_dir)
    if ckpt_path and ckpt_path not in KEYWORD_CKPT_PATHS:
        return Path(ckpt_path).parent
    task, name = task_and_name(config_paths, model_class)
    return fresh_folder(Path(root) / task / name)


def output_dir(folder: str | os.PathLike, command: str) -> Path:
    """Where ``command`` writes inside the run folder (``test`` -> ``<folder>/test``)."""
    return Path(folder) / OUTPUT_SUBDIR.get(command, command)


def export_dir(ckpt_path: str | os.PathLike) -> Path:
    """Default output folder of ``gdrq export --ckpt CKPT``: ``export/`` beside the checkpoint."""
    return output_dir(Path(ckpt_path).parent, "export")


def wandb_logger(**init_args: Any) -> WandbLogger:
    """Lightning's ``WandbLogger`` without its ``anonymous=None`` argument, which wandb >= 0.19
    answers with a warning on every run."""
    logger = WandbLogger(**init_args)
    init = getattr(logger, "_wandb_init", {})
    if init.get("anonymous", 0) is None:
        del init["anonymous"]
    return logger


def default_logger_config() -> dict:
    """The ``--trainer.logger`` default: W&B, offline unless the user set ``WANDB_MODE``
    (no network is assumed); ``save_dir: null`` means "the run folder"."""
    mode = os.environ.get("WANDB_MODE", "offline")
    return {
        "class_path": "pytorch_lightning.loggers.WandbLogger",
        "init_args": {"project": WANDB_PROJECT, "save_dir": None, "offline": mode in ("offline", "disabled")},
    }


KEEP = object()  # run_logger's answer for "leave the configured logger as it is"


def run_logger(command: str, configured: Any, folder: Path, name: str) -> Any:
    """The logger to use instead of one configured logger, or :data:`KEEP`. A W&B logger without
    ``save_dir`` (the default one) writes into the command's output folder, with the config's
    name as the run name (``<name>-test`` for ``test``); ``predict``, which logs nothing, gets
    none. Every other logger stays as given.

    Args:
        configured: one parsed ``trainer.logger`` entry (a dict / namespace with ``class_path``, or a bool).
    """
    as_dict = configured.as_dict() if hasattr(configured, "as_dict") else configured
    if not isinstance(as_dict, dict) or not str(as_dict.get("class_path", "")).endswith("WandbLogger"):
        return KEEP
    init_args = dict(as_dict.get("init_args") or {})
    if init_args.get("save_dir") is not None:
        return KEEP
    if command == "predict":
        return False
    run_name = init_args.get("name") or (name if command == "fit" else f"{name}-{command}")
    return wandb_logger(**{**init_args, "save_dir": str(output_dir(folder, command)), "name": run_name})


class RunConfigCallback(SaveConfigCallback):
    """Saves the resolved config of each command in its own place in the run folder: ``fit``
    -> ``config.yaml`` (``config_resume.yaml`` when a resumed fit finds one there),
    ``test`` -> ``test/config.yaml``, ``predict`` -> ``predictions/config.yaml``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "save_to_log_dir": False})

    def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:
        folder = output_dir(run_dir(trainer), stage)
        path = folder / "config.yaml"
        if stage == "fit" and self.config.get("ckpt_path") and path.exists():  # a resume (trainer.ckpt_path: not yet)
            path = folder / "config_resume.yaml"
        folder.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, str(path), skip_none=False, overwrite=True, multifile=self.multifile)


def plan_run_folder(command: str, config: Any, init: Any) -> str:
    """Choose the run folder of a LightningCLI command and point the trainer's root directory,
    its default logger and the checkpoint callback at it.

    Args:
        command: ``fit``, ``validate``, ``test`` or ``predict``.
        config: the command's parsed config (``LightningCLI.config[command]``).
        init: the same with classes instantiated (``LightningCLI.config_init[command]``);
            changed in place.
    """
    config_paths, model_class = config.get("config") or [], config.get("model.class_path")
    folder = resolve_run_folder(config_paths=config_paths, model_class=model_class, ckpt_path=config.get("ckpt_path"),
                                out=config.get("out"), default_root_dir=config.get("trainer.default_root_dir"))
    os.environ[RUN_FOLDER_ENV] = str(folder)  # DDP ranks that Lightning starts as child processes reuse it
    _, name = task_and_name(config_paths, model_class)
    configured = config.get("trainer.logger")
    if isinstance(configured, list):
        for i, entry in enumerate(configured):
            if (logger := run_logger(command, entry, folder, name)) is not KEEP:
                init.trainer.logger[i] = logger
    elif (logger := run_logger(command, configured, folder, name)) is not KEEP:
        init.trainer.logger = logger
    if not config.get("trainer.default_root_dir"):
        init.trainer.default_root_dir = str(output_dir(folder, command))
    if init.get("checkpoint") is not None and config.get("checkpoint.dirpath") is None:
        init.checkpoint.dirpath = os.path.realpath(folder)
    return str(folder)


def where_written(trainer: Any, command: str, folder: str | os.PathLike) -> str:
    """The last line of ``gdrq validate|test|predict``: where its output is (and, for ``predict``
    on a task that writes no prediction files, that nothing but the config was written)."""
    from pytorch_lightning.callbacks import BasePredictionWriter

    out = output_dir(folder, command)
    if command == "predict" and not any(isinstance(cb, BasePredictionWriter) for cb in trainer.callbacks):
        model = type(trainer.lightning_module).__name__ if trainer.lightning_module is not None else "the model"
        return f"[gdrq] predict: {model} has no prediction writer, no predictions were written (config: {out}/config.yaml)"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir()) if out.is_dir() else []
    listed = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
    return f"[gdrq] {command} output in {out}/ ({listed})"


def finish_wandb(trainer: Any) -> None:
    """End the command's W&B run when the command ends (not at interpreter exit): its closing
    lines then come before the command's last line, and a next command in the same process
    (a notebook, a test) starts a run of its own instead of reusing this one."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and getattr(logger, "_experiment", None) is not None:
            logger.experiment.finish()
