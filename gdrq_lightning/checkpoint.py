"""Rebuild a quantized LightningModule from a checkpoint alone (for export and inspection).

A checkpoint written with :class:`GDRQCallback` carries the module's class path, its
hyper-parameters and the ``QuantConfig``; loading is ``weights_only=True`` throughout.
Constructing a task module reads no file (pretrained weights load in its ``setup``, see
:mod:`gdrq_lightning.task`), so the hyper-parameters are used exactly as saved. A checkpoint
saved in deploy form (its state lists the phase ``deploy``) comes back in deploy form, its
grids as trained (:func:`~gdrq_lightning.export.restore_deploy`).
"""
from __future__ import annotations

import os
import pickle
import zipfile
from typing import Any

import pytorch_lightning as pl
import torch

from .export.deploy import restore_deploy
from .quant import QuantConfig, quantize_model
from .task import quant_network, resolve_config
from .utils.modules import import_object


class CheckpointError(ValueError):
    """A checkpoint that is unreadable, not from gdrq, or from another model."""


def load_checkpoint(path: str) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with errors that name the file and the problem."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is truncated or not a PyTorch checkpoint ({str(e).splitlines()[0]})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"checkpoint {path} has no 'state_dict': not a Lightning checkpoint")
    return ckpt


def gdrq_state(ckpt: dict[str, Any], path: str = "checkpoint") -> dict[str, Any]:
    """The ``GDRQCallback`` state stored in a Lightning checkpoint."""
    for key, state in ckpt.get("callbacks", {}).items():
        if key.startswith("GDRQCallback") and isinstance(state, dict):
            return state
    raise CheckpointError(f"{path} has no GDRQCallback state: it was not trained with the gdrq quantization callback")


def load_datamodule(path: str) -> pl.LightningDataModule:
    """The checkpoint's own datamodule, built from the hyper-parameters ``gdrq fit`` saved with it.

    Raises:
        CheckpointError: the checkpoint names no datamodule class (pass a data config instead).
    """
    hparams = load_checkpoint(path).get("datamodule_hyper_parameters") or {}
    class_path = hparams.get("_class_path", "")
    if not class_path:
        raise CheckpointError(f"{path} names no datamodule (saved outside `gdrq fit`?); pass --data-config CONFIG")
    try:
        cls = import_object(class_path)
    except ImportError:
        raise CheckpointError(f"{path}: cannot import the datamodule class {class_path!r}") from None
    return cls(**{k: v for k, v in hparams.items() if not k.startswith("_")})


def load_quantized_module(path: str) -> pl.LightningModule:
    """Instantiate the checkpoint's LightningModule, quantize it as trained, load the weights
    (a deploy-form checkpoint: in deploy form).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: unreadable file, no gdrq state, or weights that do not fit the model.
    """
    ckpt = load_checkpoint(path)
    state = gdrq_state(ckpt, path)
    class_path = state.get("module") or ckpt.get("hyper_parameters", {}).get("_class_path", "")
    try:
        cls = import_object(class_path)
    except ImportError:
        raise CheckpointError(f"{path}: cannot import the module class {class_path!r}") from None
    hparams = {k: v for k, v in ckpt.get("hyper_parameters", {}).items() if not k.startswith("_")}
    module = cls(**hparams)
    config = QuantConfig(**{"quant_inputs": [], **state["config"]})  # checkpoints from before input quantizers: none
    network = quant_network(module)
    quantize_model(network, resolve_config(config, module))
    try:
        result = module.load_state_dict(ckpt["state_dict"], strict=False)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"{path} does not match {class_path}: {str(e).splitlines()[-1].strip()}") from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{path} does not match {class_path}: missing keys {result.missing_keys[:5]}, "
            f"unexpected keys {result.unexpected_keys[:5]}"
        )
    if not restore_deploy(network) and "deploy" in state.get("done", []):
        raise CheckpointError(f"{path}: its GDRQCallback state lists the phase 'deploy' but its weights hold no deploy state")
    return module.eval()
