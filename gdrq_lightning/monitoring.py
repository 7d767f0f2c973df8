"""What a quantization user watches: per-layer thresholds, quantization error,
clipped fractions, weight histograms and distribution plots.

Everything goes through the trainer's loggers (W&B, TensorBoard, CSV) so it lands
wherever the run is tracked; plots are also saved as PNGs in the run directory.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch
from pytorch_lightning import Trainer
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor, nn

from .quant import quantized_layers
from .quant.layers import QuantReLU, QuantReLU6
from .quant.primitives import expand_bshape
from .quant.quantizers import WeightQuantizer


@torch.no_grad()
def weight_stats(layer: nn.Module) -> dict[str, float]:
    """Clip threshold, clipped fraction and mean |W - Q(W)| of one conv/linear layer."""
    q: WeightQuantizer = layer.weight_quantizer
    w = layer.weight.detach()
    wq = q(w)
    stats = {"quant_error": float((w - wq).abs().mean())}
    t = q.clip_value(w)
    if t is not None:
        stats["threshold"] = float(t.mean())
        stats["clipped_frac"] = float((w.abs() > expand_bshape(t, w, 0)).float().mean())
    return stats


@contextmanager
def activation_probe(model: nn.Module) -> Iterator[dict[str, dict[str, float]]]:
    """Record, for the next forward pass, each quantized activation's clip value and the
    fraction of its inputs above it (the clipped fraction)."""
    results: dict[str, dict[str, float]] = {}
    handles = []
    for name, module in quantized_layers(model):
        if not isinstance(module, (QuantReLU, QuantReLU6)):
            continue
        quantizer = module.act_quantizer

        def hook(mod: nn.Module, args: tuple, _out: Tensor, name: str = name, quantizer=quantizer) -> None:
            alpha = _act_clip_value(quantizer)
            if alpha is not None:
                x = args[0].detach()
                results[name] = {"threshold": alpha, "clipped_frac": float((x > alpha).float().mean())}

        handles.append(module.register_forward_hook(hook))
    try:
        yield results
    finally:
        for h in handles:
            h.remove()


def _act_clip_value(quantizer: nn.Module) -> float | None:
    clip = quantizer.clip_value()
    return None if clip is None else float(clip.float().mean())


def log_metrics(trainer: Trainer, metrics: dict[str, float], step: int) -> None:
    """Send plain scalars to every logger of the trainer (rank zero only)."""
    if trainer.is_global_zero and metrics:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


def log_histograms(trainer: Trainer, tensors: dict[str, Tensor], step: int) -> None:
    """Weight histograms: ``wandb.Histogram`` for W&B, ``add_histogram`` for TensorBoard."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            logger.experiment.log(
                {k: wandb.Histogram(v.detach().float().cpu().numpy().ravel()) for k, v in tensors.items()}
            )
        elif isinstance(logger, TensorBoardLogger):
            for k, v in tensors.items():
                logger.experiment.add_histogram(k, v.detach().float().cpu(), global_step=step)


def save_distribution_plot(path: str, title: str, series: dict[str, Tensor]) -> str:
    """One PNG with overlaid histograms (e.g. raw vs Scale-Clip vs quantized weights)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for label, values in series.items():
        ax.hist(values.detach().float().cpu().numpy().ravel(), bins=101, alpha=0.55, label=label)
    ax.set_title(title)
    ax.set_xlabel("value")
    ax.set_ylabel("count")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def log_image(trainer: Trainer, key: str, path: str) -> None:
    """Attach a saved PNG to W&B (other loggers keep the file in the run directory)."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[path])


def run_dir(trainer: Trainer) -> str:
    """The run's own directory (where Lightning puts its checkpoints), or the trainer's root dir."""
    logger = trainer.logger
    if isinstance(logger, WandbLogger):
        return os.path.join(logger.save_dir or trainer.default_root_dir, str(logger.name), str(logger.version))
    return (logger.log_dir if logger is not None else None) or trainer.default_root_dir
