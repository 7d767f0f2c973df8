"""What the library needs from a LightningModule to quantize, rebuild and export it.

The callback, :mod:`gdrq_lightning.checkpoint`, the monitor and ``gdrq export`` talk to a
task only through :class:`QuantTask`; they never guess attribute names. A plain
LightningModule that does not implement the contract is quantized as a whole, with the
library's default ``skip`` (first conv, last linear), and exported as it is.

Pretrained weights load in :meth:`QuantTask.load_pretrained`, which a task calls once from
its own ``setup``. Lightning runs the callbacks' ``setup`` (the quantization swap) before
the module's, and restores a ``ckpt_path`` after both, so float weights go into the
swapped network and a resumed checkpoint still wins. Construction reads no file, which is
what lets :func:`~gdrq_lightning.checkpoint.load_quantized_module` rebuild a module from
its hyper-parameters alone.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from torch import nn

from .quant import QuantConfig

if TYPE_CHECKING:
    import pytorch_lightning as pl


@runtime_checkable
class QuantTask(Protocol):
    """The contract a LightningModule meets to be quantized by gdrq.

    Three more methods are optional (a module without them still meets the contract):
    ``quant_inputs_default() -> list[str] | None``, the layers whose input gets its own
    quantizer when ``QuantConfig.quant_inputs`` is None (see :func:`resolve_config`), for
    necks whose convs read float sums or concatenations (detection: the FPN output convs);
    ``quant_overrides_default() -> dict``, per-layer settings the task's layers need whatever the
    config's bits (detection: its heads' hidden layers at 8 bits), applied before the config's
    own ``overrides``, which win where both set a field;
    ``export_metric(datamodule)``, a fresh metric over :meth:`export_network` outputs
    (``update(outputs, batch)``, ``compute() -> dict``; see :mod:`gdrq_lightning.export.validate`)
    that ``gdrq export --validate`` scores PyTorch and ONNX Runtime with (default: top-1 or mIoU,
    from the targets' shape).

    Example:
        >>> class MyTask(pl.LightningModule):
        ...     def quant_network(self) -> nn.Module: return self.net
        ...     def quant_skip_default(self) -> list[str] | None: return ["stem", "head"]
        ...     def quant_inputs_default(self) -> list[str] | None: return ["neck.fuse"]  # optional
        ...     def quant_overrides_default(self) -> dict: return {"head": {"weight_bits": 8}}  # optional
        ...     def export_metric(self, datamodule): return Top1()       # optional
        ...     def load_pretrained(self) -> None: ...          # called from setup()
        ...     def export_network(self) -> nn.Module: return self.net
        ...     def quant_forward(self, batch) -> None: self.net(batch[0])
    """

    def quant_network(self) -> nn.Module:
        """The network whose layers are swapped (module names in configs are relative to it)."""
        ...

    def quant_skip_default(self) -> list[str] | None:
        """Patterns kept full precision when ``QuantConfig.skip`` is None; None: the library's default."""
        ...

    def load_pretrained(self) -> None:
        """Load the task's starting weights, once; called from the module's ``setup``, never ``__init__``."""
        ...

    def export_network(self) -> nn.Module:
        """A module mapping one image batch to one tensor (logits, the main segmentation map) or
        to a tuple of tensors (a detector's boxes, labels and scores). It may carry an
        ``onnx_spec`` attribute (:class:`gdrq_lightning.export.OnnxSpec`: output names, which
        input axes are dynamic); without one: one output, dynamic batch and image size.

        Raises:
            TypeError: the task's outputs cannot be exported as tensors (say why).
        """
        ...

    def quant_forward(self, batch: Any) -> None:
        """Run :meth:`quant_network` on a training batch (already on the device), in whatever
        mode the network is in, without a loss: the callback's calibration and BatchNorm
        re-estimation passes."""
        ...


def quant_network(pl_module: pl.LightningModule) -> nn.Module:
    """The network the contract names, or the whole module for a plain LightningModule."""
    return pl_module.quant_network() if isinstance(pl_module, QuantTask) else pl_module


def quant_forward(pl_module: pl.LightningModule, batch: Any) -> None:
    """The contract's :meth:`QuantTask.quant_forward`, or, for a plain LightningModule, the
    module called on the batch's first element (``(inputs, targets)`` batches)."""
    if isinstance(pl_module, QuantTask):
        pl_module.quant_forward(batch)
    else:
        pl_module(batch[0] if isinstance(batch, (list, tuple)) else batch)


def export_network(pl_module: pl.LightningModule) -> nn.Module:
    """The contract's export module (tensor outputs), or the whole module for a plain LightningModule."""
    return pl_module.export_network() if isinstance(pl_module, QuantTask) else pl_module


def export_metric(pl_module: pl.LightningModule, datamodule: pl.LightningDataModule) -> Callable[[], Any] | None:
    """A maker of the task's :meth:`export_metric <QuantTask>` objects, or ``None`` (no such method)."""
    method = getattr(pl_module, "export_metric", None)
    return (lambda: method(datamodule)) if callable(method) else None


def resolve_config(config: QuantConfig, pl_module: pl.LightningModule) -> QuantConfig:
    """``config`` with the task's default ``skip`` and ``quant_inputs`` filled in where the config
    leaves them unset (``None``), and the task's default ``overrides`` before the config's own."""
    if not isinstance(pl_module, QuantTask):
        return config
    fields = {}
    skip = pl_module.quant_skip_default()
    if config.skip is None and skip is not None:
        fields["skip"] = list(skip)
    inputs_default = getattr(pl_module, "quant_inputs_default", None)
    inputs = inputs_default() if callable(inputs_default) else None
    if config.quant_inputs is None and inputs is not None:
        fields["quant_inputs"] = list(inputs)
    overrides_default = getattr(pl_module, "quant_overrides_default", None)
    task_overrides = overrides_default() if callable(overrides_default) else {}
    if task_overrides:  # the config's fields win: merged into the same pattern, or applied later by the swap
        merged = {p: dict(f) for p, f in task_overrides.items()}
        for pattern, own in config.overrides.items():
            merged[pattern] = {**merged.get(pattern, {}), **own}
        fields["overrides"] = merged
    return dataclasses.replace(config, **fields) if fields else config
