"""``QuantMonitor``: per-layer statistics, phase-change histograms and PNGs through a CSV
logger, the same metric names as before it left the callback, and no effect without
quantized layers."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from pytorch_lightning.loggers import CSVLogger

from gdrq_lightning import GDRQCallback, QuantConfig, QuantMonitor, Schedule

GDRQ_W4A4 = QuantConfig(method="gdrq", weight_bits=4, act_bits=4, groups=4)


def read_metrics(logger: CSVLogger) -> list[dict[str, str]]:
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_bad_arguments_fail_in_init() -> None:
    with pytest.raises(ValueError, match=r"QuantMonitor\(log_every_n_steps=0\) must be >= 1"):
        QuantMonitor(log_every_n_steps=0)
    with pytest.raises(TypeError):
        GDRQCallback(GDRQ_W4A4, log_every_n_steps=5)  # type: ignore[call-arg]  # monitoring left the callback


def test_layer_statistics_phases_and_plots_reach_a_csv_logger(tmp_path: Path, make_trainer, make_module) -> None:
    logger = CSVLogger(tmp_path, name="csv", version=0)
    schedule = Schedule(scale_clip="step:1", quant_weights="step:2", quant_acts="step:2", groups=None, freeze_bn=None)
    module = make_module()
    trainer = make_trainer([GDRQCallback(GDRQ_W4A4, schedule), QuantMonitor()], logger=logger, log_every_n_steps=1,
                           max_steps=3, max_epochs=-1, limit_train_batches=2)
    trainer.fit(module)
    rows = read_metrics(logger)
    columns = set(rows[0])
    for layer in ("3", "6"):
        assert {f"quant/{layer}/w_threshold", f"quant/{layer}/w_quant_error", f"quant/{layer}/w_clipped_frac",
                f"quant/{layer}/w_bits"} <= columns
    for act in ("2", "5", "8"):
        assert {f"quant/{act}/a_threshold", f"quant/{act}/a_clipped_frac"} <= columns
    assert "quant/0/w_threshold" not in columns  # the float first conv is not a quantized layer
    phases = [(int(r["step"]), float(r["quant/phase"])) for r in rows if r.get("quant/phase")]
    assert phases == [(1, 1.0), (2, 2.0), (2, 3.0)]
    by_step = {int(r["step"]): r for r in rows if r.get("quant/3/w_quant_error")}
    assert sorted(by_step) == [1, 2, 3]  # logged after steps 0, 1, 2
    assert float(by_step[1]["quant/3/w_quant_error"]) == 0.0  # fp: the weight is used as is
    last = by_step[3]
    assert float(last["quant/3/w_quant_error"]) > 0.0
    w = module.model[3].weight.detach()
    assert float(last["quant/3/w_threshold"]) == pytest.approx(float(2.0 * w.abs().mean()), rel=1e-6)
    assert 0.0 <= float(last["quant/3/w_clipped_frac"]) <= 1.0 and 0.0 <= float(last["quant/5/a_clipped_frac"]) <= 1.0
    assert float(last["quant/5/a_threshold"]) > 0
    assert float(last["quant/3/w_bits"]) == 4.0  # the layer's bit width (its own under a bit plan)
    plots = sorted(p.name for p in (Path(logger.log_dir) / "quant_plots").iterdir())
    assert plots == ["quant_acts_5.png", "quant_weights_3.png", "scale_clip_3.png"]  # quant_acts: the activation after layer 3
    assert all((Path(logger.log_dir) / "quant_plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)


def test_without_a_monitor_the_callback_logs_only_the_phase(tmp_path: Path, make_trainer, make_module, no_plots) -> None:
    logger = CSVLogger(tmp_path, name="csv", version=0)
    schedule = Schedule(scale_clip="step:1", quant_weights=None, quant_acts=None, groups=None)
    make_trainer([GDRQCallback(GDRQ_W4A4, schedule)], logger=logger, log_every_n_steps=1, max_steps=2,
                 max_epochs=-1).fit(make_module())
    columns = set(read_metrics(logger)[0])
    assert "quant/phase" in columns and not any(c.startswith("quant/") and c != "quant/phase" for c in columns)
    assert no_plots == []


def test_plot_layer_and_interval(tmp_path: Path, make_trainer, make_module, no_plots) -> None:
    logger = CSVLogger(tmp_path, name="csv", version=0)
    monitor = QuantMonitor(log_every_n_steps=2, plot_layer="6")
    trainer = make_trainer([GDRQCallback(GDRQ_W4A4, Schedule(quant_acts=None, groups=None)), monitor], logger=logger,
                           log_every_n_steps=1, max_steps=4, max_epochs=-1, limit_train_batches=4)
    trainer.fit(make_module())
    assert [Path(p).name for p in no_plots] == ["scale_clip_6.png", "quant_weights_6.png"]
    steps = [int(r["step"]) for r in read_metrics(logger) if r.get("quant/6/w_quant_error")]
    assert steps == [1, 3]  # after steps 0 and 2


def test_fp32_without_quantized_layers_logs_and_plots_nothing(tmp_path: Path, make_trainer, make_module, no_plots) -> None:
    logger = CSVLogger(tmp_path, name="csv", version=0)
    module = make_module()
    before = [p.detach().clone() for p in module.parameters()]
    trainer = make_trainer([QuantMonitor(log_every_n_steps=1)], logger=logger, log_every_n_steps=1, max_steps=2, max_epochs=-1)
    trainer.fit(module)  # no GDRQCallback: a plain FP32 run
    assert not any(c.startswith(("quant/", "hist/")) for c in read_metrics(logger)[0])
    assert no_plots == [] and not (Path(logger.log_dir) / "quant_plots").exists()
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))  # it trained as usual


def test_a_resumed_run_does_not_plot_its_earlier_phases_again(tmp_path: Path, make_trainer, make_module, no_plots) -> None:
    schedule = Schedule(scale_clip=0, quant_weights=1, quant_acts=None, groups=None)
    gdrq = GDRQCallback(GDRQ_W4A4, schedule)
    trainer = make_trainer([gdrq, QuantMonitor()], max_epochs=1, limit_train_batches=1)
    trainer.fit(make_module())
    trainer.save_checkpoint(tmp_path / "epoch0.ckpt")
    assert [Path(p).name for p in no_plots] == ["scale_clip_3.png"]
    no_plots.clear()
    resumed = make_trainer([GDRQCallback(GDRQ_W4A4, schedule), QuantMonitor()], max_epochs=2, limit_train_batches=1)
    resumed.fit(make_module(), ckpt_path=str(tmp_path / "epoch0.ckpt"))
    assert [Path(p).name for p in no_plots] == ["quant_weights_3.png"]


def test_each_phase_plots_what_it_changes_on_shared_bins(tmp_path: Path, make_trainer, make_module, monkeypatch) -> None:
    """Weights at scale_clip / quant_weights / groups, the activation after the plotted layer at
    quant_acts (caught during the next batch), with the threshold drawn and written."""
    from gdrq_lightning import monitoring

    plots: dict[str, tuple[str, dict]] = {}
    monkeypatch.setattr(monitoring, "save_distribution_plot",
                        lambda path, title, series: plots.setdefault(Path(path).name, (title, series)))
    schedule = Schedule(scale_clip="step:1", quant_weights="step:2", quant_acts="step:3", groups="step:4", freeze_bn=None)
    module = make_module()
    make_trainer([GDRQCallback(GDRQ_W4A4, schedule), QuantMonitor()], max_steps=6, max_epochs=-1,
                 limit_train_batches=6).fit(module)
    assert sorted(plots) == ["groups_3.png", "quant_acts_5.png", "quant_weights_3.png", "scale_clip_3.png"]
    title, series = plots["quant_weights_3.png"]
    assert title.startswith("3 weights: phase 'quant_weights' at epoch 0\nT = ") and "% of the weights" in title
    raw, used, lines = series["raw weight"], series["as used in forward"], series["clip threshold ±T"]
    assert raw.shape == used.shape == module.model[3].weight.shape
    assert len(used.unique()) <= 15 * 4  # 4-bit signed codes, one step per group
    assert lines[-1] == pytest.approx(max(abs(v) for v in lines)) and lines[0] == -lines[-1]
    title, series = plots["quant_acts_5.png"]
    assert title.startswith("5 activation: phase 'quant_acts', epoch 0 step 3\nT = ")
    raw, used = series["float activation"], series["as used in forward"]
    assert raw.min() >= 0 and len(used.unique()) <= 16  # the float ReLU output and its 4-bit levels
    threshold = series["clip threshold T"][0]
    assert float(used.max()) <= threshold + 1e-6
    clipped = float((raw > threshold).float().mean())
    assert f"clips {100 * clipped:.2f} % of the values" in title


def test_histograms_share_their_bins() -> None:
    from gdrq_lightning.plots import common_bins

    edges = common_bins([torch.tensor([-1.0, 0.5]), torch.tensor([0.0, 3.0])], bins=8)
    assert edges.tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
