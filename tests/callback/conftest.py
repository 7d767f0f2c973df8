"""Fixtures for the callback / schedule / resume tests: a tiny conv net in a LightningModule.

The net has the shape the callback cares about (conv -> BN -> ReLU blocks, a final
linear) but runs a training step in milliseconds, so schedule tests can take many
steps. One intra-op thread per test (as in ``tests/quant``): faster on a shared CPU.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from gdrq_lightning import monitoring


def tiny_net() -> nn.Module:
    """conv1 (kept float) -> 2 quantizable conv/BN/ReLU blocks -> pool -> fc (kept float)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )


class TinyModule(pl.LightningModule):
    """Cross-entropy on random 8x8 images; implements :class:`gdrq_lightning.task.QuantTask`
    by hand (no task base class): the network is ``self.model`` (what the callback quantizes)."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.model = tiny_net()

    def quant_network(self) -> nn.Module:
        return self.model

    def quant_skip_default(self) -> list[str] | None:
        return None

    def load_pretrained(self) -> None:
        pass

    def export_network(self) -> nn.Module:
        return self.model

    def quant_forward(self, batch: tuple[Tensor, Tensor]) -> None:
        self.model(batch[0])

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val/acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 4, (64,), generator=g))
        return DataLoader(data, batch_size=8)

    def val_dataloader(self) -> DataLoader:
        return self.train_dataloader()


@pytest.fixture
def make_module() -> Callable[..., TinyModule]:
    """``make_module(**hparams)``: a fresh :class:`TinyModule` (same initial weights every time)."""
    return TinyModule


@pytest.fixture
def make_trainer(tmp_path: Path) -> Callable[..., pl.Trainer]:
    """``make_trainer(callbacks, **overrides)``: a CPU trainer with no logger, bar or checkpoints."""

    def make(callbacks: list[pl.Callback], **overrides: Any) -> pl.Trainer:
        kwargs: dict[str, Any] = dict(
            accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=2, limit_val_batches=0,
            num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp_path,
        )
        kwargs.update(overrides)
        return pl.Trainer(callbacks=callbacks, **kwargs)

    return make


@pytest.fixture
def no_plots(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Skip the (slow) matplotlib PNGs of phase changes; returns the paths that would have been written."""
    paths: list[str] = []

    def record(path: str, title: str, series: dict) -> None:
        paths.append(path)
        return None

    monkeypatch.setattr(monitoring, "save_distribution_plot", record)
    return paths
