"""Monitoring through W&B offline: the quant metrics land in the run's ``.wandb`` file and
the phase-change plots in the run directory's ``quant_plots/`` (no network)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from pytorch_lightning.loggers import WandbLogger

from gdrq_lightning import GDRQCallback, QuantConfig, QuantMonitor, Schedule

wandb = pytest.importorskip("wandb")


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    (tmp_path / "wandb_home").mkdir()
    return tmp_path


def test_quant_metrics_histograms_and_plots_reach_an_offline_wandb_run(offline_wandb: Path, make_trainer, make_module) -> None:
    save_dir = offline_wandb / "runs"
    logger = WandbLogger(project="gdrq-test", save_dir=str(save_dir), offline=True)
    schedule = Schedule(scale_clip="step:1", quant_weights="step:1", quant_acts=None, groups=None)
    trainer = make_trainer(
        [GDRQCallback(QuantConfig(method="gdrq", weight_bits=4, act_bits=4, groups=4), schedule), QuantMonitor()],
        logger=logger, log_every_n_steps=1, max_steps=2, max_epochs=-1, limit_train_batches=2,
    )
    try:
        trainer.fit(make_module())
        run_id = logger.experiment.id
    finally:
        wandb.finish()
    runs = list(save_dir.glob(f"wandb/offline-run-*-{run_id}"))
    assert len(runs) == 1, sorted(p.name for p in save_dir.rglob("*"))
    files = list(runs[0].glob("*.wandb"))
    assert len(files) == 1
    names = (b"quant/3/w_threshold", b"quant/3/w_quant_error", b"quant/3/w_clipped_frac",
             b"quant/5/a_threshold", b"quant/5/a_clipped_frac", b"quant/phase", b"hist/3/weight_raw",
             b"quant/distribution_scale_clip")
    deadline = time.monotonic() + 60  # wandb-core may still be writing on a loaded machine
    while not all(n in files[0].read_bytes() for n in names) and time.monotonic() < deadline:
        time.sleep(0.5)
    data = files[0].read_bytes()
    for name in names:
        assert name in data, name
    plots = sorted(p.name for p in (save_dir / "gdrq-test" / run_id / "quant_plots").iterdir())
    assert plots == ["quant_weights_3.png", "scale_clip_3.png"]
