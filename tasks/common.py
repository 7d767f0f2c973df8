"""Pieces every task's LightningModule shares: the quantization contract, optimizer + LR
schedule, loss guard, the per-epoch validation picture and the class-count check.

Quantizer parameters (learned clips and steps) get no weight decay here: a method that
wants a decay on them applies its own term, and learned steps must not be pulled
towards zero.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from gdrq_lightning.quant.distributed import reduce_, world_size
from gdrq_lightning.training.guards import check_quantizers_finite
from gdrq_lightning.utils.run import log_image, run_dir

OptimizerName = Literal["sgd", "adamw"]
SchedulerName = Literal["cosine", "poly", "none"]
CompileOption = Union[bool, dict[str, Any]]  # true, or keyword arguments of torch.compile


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and undecayed norms/biases/quantizer parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or "quantizer" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimization(
    module: pl.LightningModule,
    *,
    optimizer: OptimizerName,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    scheduler: SchedulerName = "cosine",
    warmup_steps: int = 0,
    poly_power: float = 0.9,
) -> dict:
    """Optimizer and per-step LR schedule in Lightning's ``configure_optimizers`` format.

    Called from ``configure_optimizers``, which Lightning runs after the
    quantization callback's ``setup`` swap, so quantizer parameters are included.
    """
    groups = param_groups(module, weight_decay)
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=lr)
    else:
        raise ValueError(f"optimizer={optimizer!r} is not one of: sgd, adamw")
    if scheduler == "none":
        return {"optimizer": opt}
    total = max(int(module.trainer.estimated_stepping_batches), 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min((step - warmup_steps) / max(total - warmup_steps, 1), 1.0)
        if scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if scheduler == "poly":
            return (1.0 - progress) ** poly_power
        raise ValueError(f"scheduler={scheduler!r} is not one of: cosine, poly, none")

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def check_finite(losses: dict[str, Tensor], step: int, model: nn.Module | None = None) -> None:
    """Stop on a non-finite loss, naming the term, instead of training on NaNs.

    With ``model`` given, a non-finite quantizer statistic or scale is named first,
    since that is usually where the NaN came from. Under DDP the verdict is reduced over
    the ranks (one 1-element all-reduce per step), so every rank stops at the same step: a
    rank stopping alone would leave the others waiting in the gradient all-reduce (with
    NCCL, until its timeout). On one device this costs what it always did, one host sync.

    Raises:
        FloatingPointError: some loss term (or quantizer value) on this or another rank is
            NaN or infinite.
    """
    nonfinite = torch.stack([~torch.isfinite(v.detach()).all() for v in losses.values()])
    verdict = reduce_(nonfinite.any().float().reshape(1), "max") if world_size() > 1 else nonfinite.any()
    if not bool(verdict):
        return
    bad = [k for k, flag in zip(losses, nonfinite.tolist()) if flag]
    if not bad:
        raise FloatingPointError(f"non-finite loss on another rank at global step {step}; every rank stops (that rank names it)")
    if model is not None:
        check_quantizers_finite(model, step)
    values = ", ".join(f"{k}={float(losses[k]):.4g}" for k in bad)
    raise FloatingPointError(f"non-finite loss at global step {step}: {values}")


class TaskModule(pl.LightningModule):
    """Base of the task modules: :class:`gdrq_lightning.task.QuantTask` for a network in ``self.model``,
    the optimizer and its schedule (one set of hyper-parameters for every task), the validation
    picture of each epoch and the class-count check.

    Starting weights load in :meth:`load_pretrained`, once, from ``setup``: after the
    quantization callback's swap and before Lightning restores a ``ckpt_path``.
    Subclasses say what to load in :meth:`load_starting_weights`, and their own defaults of the
    optimizer hyper-parameters in :attr:`optim_defaults`.

    Args:
        optimizer: ``sgd`` (Nesterov momentum) or ``adamw``.
        lr: peak learning rate (default: the task's, see :attr:`optim_defaults`).
        weight_decay: decay on conv/linear weights, not on norms, biases or quantizer
            parameters (default: the task's).
        momentum: SGD momentum.
        scheduler: per-step learning-rate schedule, ``cosine``, ``poly`` or ``none`` (default: the task's).
        warmup_steps: linear warm-up steps.
        poly_power: exponent of the ``poly`` schedule.
        compile: ``torch.compile`` the network in ``setup`` (``true``, or a mapping of
            ``torch.compile`` keyword arguments, e.g. ``{mode: max-autotune}``).
    """

    model: nn.Module
    optim_defaults: ClassVar[dict[str, Any]] = {"lr": 0.01, "weight_decay": 1e-4, "scheduler": "cosine"}

    def __init__(
        self,
        *,
        optimizer: OptimizerName = "sgd",
        lr: float | None = None,
        weight_decay: float | None = None,
        momentum: float = 0.9,
        scheduler: SchedulerName | None = None,
        warmup_steps: int = 0,
        poly_power: float = 0.9,
        compile: CompileOption = False,  # noqa: A002 (the CLI's name)
    ) -> None:
        super().__init__()
        if not isinstance(compile, (bool, dict)):
            raise ValueError(f"compile={compile!r} must be true, false or a mapping of torch.compile arguments")
        given = {"lr": lr, "weight_decay": weight_decay, "scheduler": scheduler}
        self.optim = {**self.optim_defaults, **{k: v for k, v in given.items() if v is not None},
                      "optimizer": optimizer, "momentum": momentum, "warmup_steps": warmup_steps, "poly_power": poly_power}
        self._pretrained_loaded = False
        self._compile = compile

    def save_hyperparameters(self, *args: Any, frame: Any = None, **kwargs: Any) -> None:
        """Lightning's, plus the optimizer settings in use: a subclass passes them on as ``**kwargs``
        (the CLI passes ``None`` for "the task's default"), and the logged hyper-parameters and the
        checkpoint should name the values that trained the model."""
        super().save_hyperparameters(*args, frame=frame or inspect.currentframe().f_back, **kwargs)
        self.hparams.update(self.optim)

    def configure_optimizers(self) -> dict:
        return build_optimization(self, **self.optim)

    def check_num_classes(self, needed: int | None, data: str, hint: str = "") -> None:
        """Fail before the first step when ``self.num_classes`` differs from what the data needs.

        Args:
            needed: the number the data needs (None: unknown, nothing to check).
            data: how the data arrives at it, for the message (e.g. ``"20 categories + background = 21"``).
            hint: appended to the message.

        Raises:
            ValueError: names both numbers.
        """
        if needed is not None and needed != self.num_classes:
            raise ValueError(f"{type(self).__name__}(num_classes={self.num_classes}) does not match the data: "
                             f"{data}{hint}")

    def save_val_picture(self, draw: Callable[[Path], None]) -> Path:
        """``<run dir>/predictions/val_epochNNN.png`` drawn by ``draw(path)``, attached to W&B when
        that is the logger: the one picture of a few validation predictions per epoch."""
        path = Path(run_dir(self.trainer)) / "predictions" / f"val_epoch{self.current_epoch:03d}.png"
        draw(path)
        log_image(self.trainer, "val/predictions", str(path))
        return path

    def quant_network(self) -> nn.Module:
        return self.model

    def quant_skip_default(self) -> list[str] | None:
        return None  # the library's default: first conv and last linear stay full precision

    def quant_inputs_default(self) -> list[str] | None:
        return None  # no input quantizers: every quantized layer reads a quantized activation

    def export_network(self) -> nn.Module:
        return self.model

    def quant_forward(self, batch: Any) -> None:
        """``(inputs, targets)`` batches: the network on the inputs."""
        self.model(batch[0])

    def load_pretrained(self) -> None:
        """Load the starting weights once; a later stage (fit, then test) must not undo training."""
        if not self._pretrained_loaded:
            self.load_starting_weights()
            self._pretrained_loaded = True

    def load_starting_weights(self) -> None:
        """Read the task's ``pretrained`` files into ``self.model`` (nothing by default)."""

    def setup(self, stage: str) -> None:
        self.load_pretrained()
        self.compile_network()

    def compile_network(self) -> None:
        """With ``compile``: compile ``self.model`` in place, once, after the quantization callback's
        swap (so the quantizers are in the graph; a phase switch recompiles once). In place
        (``nn.Module.compile``), so checkpoint keys do not change."""
        if self._compile is False or getattr(self.model, "_compiled_call_impl", None) is not None:
            return
        self.model.compile(**({} if self._compile is True else self._compile))

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Weights from a checkpoint replace the starting weights: ``setup`` then loads none."""
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._pretrained_loaded = True
        return result
