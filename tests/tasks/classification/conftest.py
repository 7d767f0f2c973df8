"""Fixtures for the classification tests: tiny ResNet-18 runs on 16 px digits.

One intra-op thread per test (as in ``tests/quant``): faster on a shared CPU.
"""
from __future__ import annotations

import functools

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from gdrq_lightning import GDRQCallback, QuantConfig, Schedule
from gdrq_lightning import monitoring
from tasks.classification import ClassificationModule, DigitsDataModule

IMAGE_SIZE = 16


def digits_batch(n: int = 8) -> torch.Tensor:
    """The first ``n`` validation digits, ``[n, 3, 16, 16]`` (no augmentation)."""
    dm = DigitsDataModule(image_size=IMAGE_SIZE)
    dm.setup("fit")
    return torch.stack([dm.val_set[i][0] for i in range(n)])


def _fit_digits(
    root: Path,
    config: QuantConfig,
    schedule: Schedule | None = None,
    callbacks: tuple[pl.Callback, ...] = (),
    **trainer_kwargs: Any,
) -> tuple[ClassificationModule, GDRQCallback, pl.Trainer]:
    """ResNet-18 + GDRQCallback on 16 px digits: 1 epoch of 2 train batches of 8 and 1 val batch by default."""
    pl.seed_everything(0, verbose=False)
    module = ClassificationModule("resnet18", num_classes=10, lr=0.02)
    gdrq = GDRQCallback(config, schedule or Schedule())
    kwargs: dict[str, Any] = dict(
        accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
    )
    kwargs.update(trainer_kwargs)
    trainer = pl.Trainer(callbacks=[gdrq, *callbacks], **kwargs)
    trainer.fit(module, DigitsDataModule(image_size=IMAGE_SIZE, batch_size=8))
    return module, gdrq, trainer


@pytest.fixture
def fit_digits(tmp_path: Path) -> Callable[..., tuple[ClassificationModule, GDRQCallback, pl.Trainer]]:
    """``fit_digits(config, schedule=None, callbacks=(), **trainer_kwargs)`` in ``tmp_path``."""
    return functools.partial(_fit_digits, tmp_path)


@pytest.fixture(scope="session")
def digits_x() -> torch.Tensor:
    return digits_batch()


@pytest.fixture
def no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip the (slow) matplotlib PNGs of phase changes; tests/callback checks them."""
    monkeypatch.setattr(monitoring, "save_distribution_plot", lambda path, title, series: None)


@pytest.fixture(scope="module")
def gdrq_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """A checkpoint of a short GDRQ W4A4 run (quantization on) and the trained module's eval logits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("gdrq_ckpt")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(monitoring, "save_distribution_plot", lambda path, title, series: None)
        try:
            config = QuantConfig(method="gdrq", weight_bits=4, act_bits=4, groups=4)
            module, _, trainer = _fit_digits(root, config, limit_train_batches=1)
        finally:
            torch.set_num_threads(threads)
    path = root / "run.ckpt"
    trainer.save_checkpoint(path)
    with torch.no_grad():
        logits = module.eval()(digits_batch())
    return path, logits
