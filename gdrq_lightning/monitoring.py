"""What a quantization user watches: :class:`QuantMonitor` and the logging helpers it uses.

Per quantized layer, every ``log_every_n_steps``: the clip threshold in use, the
fraction of values it clips and the weight quantization error. At each phase change of
the :class:`~gdrq_lightning.GDRQCallback` schedule, what that phase changes, raw and as
used: one layer's weights when ``scale_clip``, ``quant_weights`` or ``groups`` begins, the
input of the activation after it during the next training batch when ``quant_acts``
begins (logger histograms and a PNG with the threshold and the share it clips).
Everything goes through the trainer's loggers (W&B, TensorBoard, CSV) so it lands
wherever the run is tracked; plots are also saved in ``<run dir>/quant_plots/``. The
monitor only reads: removing it changes no training.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import Tensor, nn

from .callback import GDRQCallback
from .plots import clip_note, save_distribution_plot, threshold_lines
from .quant import quantized_layers
from .quant.primitives import expand_bshape
from .task import quant_network
from .utils.run import log_histograms, log_image, log_metrics, run_dir

WEIGHT_PHASES = ("scale_clip", "quant_weights", "groups")  # phases that change how weights are used


def _k(quantizer: nn.Module) -> dict[str, float]:
    """The clip factor ``quantizer.k`` (docs/methods.md#public-interface) of methods that have one."""
    k = getattr(quantizer, "k", None)
    return {"k": float(k)} if isinstance(k, Tensor) else {}


@torch.no_grad()
def weight_stats(layer: nn.Module) -> dict[str, float]:
    """Bit width (a bit plan gives each layer its own), clip threshold, clipped fraction and mean
    ``|W - Q(W)|`` of one conv/linear layer."""
    q = layer.weight_quantizer
    w = layer.weight.detach()
    stats = {"bits": float(q.bits), "quant_error": float((w - q(w)).abs().mean())} | _k(q)
    clip = q.clip_value(w)
    if clip is not None:
        stats["threshold"] = float(clip.mean())
        stats["clipped_frac"] = float((w.abs() > expand_bshape(clip, w, 0)).float().mean())
    return stats


@contextmanager
def activation_probe(model: nn.Module) -> Iterator[dict[str, dict[str, float]]]:
    """Record, for the next forward pass, each quantized activation's clip value and the
    fraction of its inputs above it (the clipped fraction)."""
    results: dict[str, dict[str, float]] = {}
    handles = []
    for name, layer in quantized_layers(model):
        quantizer = getattr(layer, "act_quantizer", None)
        if quantizer is None:
            continue

        def hook(_mod: nn.Module, args: tuple, _out: Tensor, name: str = name, quantizer: nn.Module = quantizer) -> None:
            clip = quantizer.clip_value()
            if clip is not None:
                x = args[0].detach()
                above = x > expand_bshape(clip.to(x.device), x, 1)
                results[name] = {"threshold": float(clip.mean()), "clipped_frac": float(above.float().mean())} | _k(quantizer)

        handles.append(layer.register_forward_hook(hook))
    try:
        yield results
    finally:
        for h in handles:
            h.remove()


class QuantMonitor(Callback):
    """Log per-layer quantization statistics and plot weight distributions at phase changes.

    Works beside a :class:`~gdrq_lightning.GDRQCallback` (it plots that callback's phase
    changes); on a network without quantized layers it logs and plots nothing.

    Args:
        log_every_n_steps: interval of the per-layer statistics (default: the trainer's).
        plot_layer: name of the layer plotted at each phase change (default: the first
            quantized conv/linear; a name that matches no layer turns plotting off).

    Metrics: ``quant/<layer>/w_threshold``, ``w_quant_error``, ``w_clipped_frac``, ``w_bits``,
    ``a_threshold``, ``a_clipped_frac``, and ``w_k`` / ``a_k`` (the clip factor ``k`` of
    Scale-Clip methods, calibrated with ``auto``); histograms ``hist/<layer>/weight_raw`` and
    ``weight_used``; images ``quant/distribution_<phase>``.
    """

    def __init__(self, log_every_n_steps: int | None = None, plot_layer: str | None = None) -> None:
        super().__init__()
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"QuantMonitor(log_every_n_steps={log_every_n_steps}) must be >= 1 or None")
        self.log_every_n_steps = log_every_n_steps
        self.plot_layer = plot_layer
        self._target: nn.Module | None = None
        self._schedule: GDRQCallback | None = None
        self._phases_seen = 0
        self._probe: Any = None
        self._act_stats: dict[str, dict[str, float]] = {}
        self._capture: tuple[str, str, nn.Module, dict[str, Any], Any] | None = None
        self._batch_step = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._target = quant_network(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._schedule = next((cb for cb in trainer.callbacks if isinstance(cb, GDRQCallback)), None)
        self._phases_seen = len(self._schedule.done) if self._schedule else 0  # a resumed run's phases are not new

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch_step = trainer.global_step
        self._plot_new_phases(trainer)
        if self._should_log(trainer):
            self._probe = activation_probe(self._target)
            self._act_stats = self._probe.__enter__()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._probe is not None:
            self._probe.__exit__(None, None, None)
            self._probe = None
            self._log_layer_stats(trainer)
        self._finish_act_capture(trainer)
        self._plot_new_phases(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._capture is not None:  # the phase began on the last batch: nothing to plot
            self._capture[4].remove()
            self._capture = None

    def _should_log(self, trainer: pl.Trainer) -> bool:
        every = self.log_every_n_steps or trainer.log_every_n_steps or 50
        return trainer.global_step % every == 0 and bool(trainer.loggers) and bool(quantized_layers(self._target))

    def _log_layer_stats(self, trainer: pl.Trainer) -> None:
        metrics: dict[str, float] = {}
        for name, layer in quantized_layers(self._target):
            if getattr(layer, "weight_quantizer", None) is not None:
                for key, value in weight_stats(layer).items():
                    metrics[f"quant/{name}/w_{key}"] = value
        for name, stats in self._act_stats.items():
            for key, value in stats.items():
                metrics[f"quant/{name}/a_{key}"] = value
        log_metrics(trainer, metrics, trainer.global_step)

    def _plot_new_phases(self, trainer: pl.Trainer) -> None:
        if self._schedule is None or len(self._schedule.done) <= self._phases_seen:
            return
        for phase in self._schedule.done[self._phases_seen:]:
            if phase == "quant_acts":
                self._start_act_capture(trainer, phase)
            elif phase in WEIGHT_PHASES:
                path = self._plot_weights(trainer, phase)
                if path is not None:
                    log_image(trainer, f"quant/distribution_{phase}", path)
        self._phases_seen = len(self._schedule.done)

    def _plot_layers(self) -> tuple[tuple[str, nn.Module] | None, tuple[str, nn.Module] | None]:
        """The weight layer to plot (``plot_layer``, default the first) and the activation after it."""
        layers = quantized_layers(self._target)
        index = next((i for i, (n, m) in enumerate(layers) if getattr(m, "weight_quantizer", None) is not None
                      and self.plot_layer in (None, n)), None)
        if index is None:
            return None, None
        after = [(n, m) for n, m in layers[index:] if getattr(m, "act_quantizer", None) is not None]
        return layers[index], (after[0] if after else None)

    def _plot_weights(self, trainer: pl.Trainer, tag: str) -> str | None:
        """Raw vs as-used (clipped / quantized) weights of one layer: logger histograms and a PNG."""
        if not trainer.is_global_zero:
            return None
        found, _ = self._plot_layers()
        if found is None:
            return None
        name, layer = found
        with torch.no_grad():
            w = layer.weight.detach()
            wq = layer.weight_quantizer(w).detach()
            clip = layer.weight_quantizer.clip_value(w)
        log_histograms(trainer, {f"hist/{name}/weight_raw": w, f"hist/{name}/weight_used": wq}, trainer.global_step)
        stats = weight_stats(layer)
        note = clip_note(clip, stats.get("clipped_frac"), "weights")
        path = os.path.join(run_dir(trainer), "quant_plots", f"{tag}_{name.replace('.', '_')}.png")
        return save_distribution_plot(
            path, f"{name} weights: phase '{tag}' at epoch {trainer.current_epoch}\n{note}",
            {"raw weight": w, "as used in forward": wq, "clip threshold ±T": threshold_lines(clip, signed=True)},
        )

    def _start_act_capture(self, trainer: pl.Trainer, tag: str) -> None:
        """Hook the activation after the plotted layer for the next training forward pass."""
        _, found = self._plot_layers()
        if found is None or not trainer.is_global_zero or self._capture is not None:
            return
        name, layer = found
        store: dict[str, Any] = {}

        def hook(_mod: nn.Module, args: tuple, out: Tensor) -> None:
            if not store:
                store.update(input=args[0].detach(), output=out.detach(), step=self._batch_step)

        self._capture = (tag, name, layer, store, layer.register_forward_hook(hook))

    def _finish_act_capture(self, trainer: pl.Trainer) -> None:
        if self._capture is None or not self._capture[3]:
            return
        tag, name, layer, store, handle = self._capture
        handle.remove()
        self._capture = None
        raw = store["input"].float().clamp(min=0, max=getattr(layer, "upper", None))  # the float activation
        used = store["output"].float()
        clip = layer.act_quantizer.clip_value()
        clipped = float((raw > expand_bshape(clip.to(raw.device), raw, 1)).float().mean()) if clip is not None else None
        log_histograms(trainer, {f"hist/{name}/act_raw": raw, f"hist/{name}/act_used": used}, trainer.global_step)
        path = os.path.join(run_dir(trainer), "quant_plots", f"{tag}_{name.replace('.', '_')}.png")
        save_distribution_plot(
            path, f"{name} activation: phase '{tag}', epoch {trainer.current_epoch} step {store['step']}\n"
                  f"{clip_note(clip, clipped, 'values')}",
            {"float activation": raw, "as used in forward": used, "clip threshold T": threshold_lines(clip, signed=False)},
        )
        log_image(trainer, f"quant/distribution_{tag}", path)
