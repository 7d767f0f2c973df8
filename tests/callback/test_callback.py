"""``GDRQCallback``: argument checks, ``state_dict`` round trip, stages, summary metric and
transition log lines (docs/methods.md#schedule, #public-interface); the contract it quantizes through (``gdrq_lightning.task``)."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from gdrq_lightning import GDRQCallback, QuantConfig, Schedule, quantize_model, quantized_layers
from gdrq_lightning.callback import STATE_VERSION
from gdrq_lightning.quant import named_quantizers

GDRQ_W4A4 = QuantConfig(method="gdrq", weight_bits=4, act_bits=4, groups=4)


def switch_values(model: torch.nn.Module) -> set[bool]:
    return {bool(getattr(q, name)) for _, q in named_quantizers(model) for name in q.switch_names}


@pytest.fixture
def lightning_log() -> Iterator[list[str]]:
    """Messages sent through Lightning's logger (it does not propagate to the root logger)."""
    messages: list[str] = []

    class ListHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = ListHandler(level=logging.INFO)
    logger = logging.getLogger("pytorch_lightning")
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)


# -- arguments -------------------------------------------------------------------------
def test_dict_arguments_become_config_and_schedule() -> None:
    cb = GDRQCallback({"method": "pact", "act_bits": 3}, {"scale_clip": "step:4", "quant_weights": None})
    assert cb.config == QuantConfig(method="pact", act_bits=3)
    assert cb.schedule == Schedule(scale_clip="step:4", quant_weights=None)
    assert cb.done == [] and cb.phase == "fp"
    default = GDRQCallback()
    assert default.config == QuantConfig() and default.schedule == Schedule()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(config="gdrq"), TypeError, r"config=.*QuantConfig or a dict.*str"),
        (dict(schedule=[1, 2]), TypeError, r"schedule=.*Schedule or a dict.*list"),
        (dict(config={"weight_bits": 9}), ValueError, r"QuantConfig\.weight_bits=9"),
        (dict(schedule={"groups": "week:3"}), ValueError, r"Schedule\.groups='week:3'"),
    ],
)
def test_bad_arguments_fail_in_init(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        GDRQCallback(**kwargs)


# -- state -----------------------------------------------------------------------------
def test_state_dict_round_trips_through_a_weights_only_file(tmp_path: Path) -> None:
    cb = GDRQCallback(QuantConfig(method="hwgq", weight_bits=1, act_bits=2, skip=["stem"]), Schedule(quant_acts=2, groups=None))
    cb.done = ["scale_clip", "quant_weights"]
    cb.phase_metrics = {"fp": 0.5, "scale_clip": 0.75}
    state = cb.state_dict()
    assert set(state) == {"version", "done", "phase_metrics", "config", "module", "bit_plan"}
    assert state["version"] == STATE_VERSION
    torch.save(state, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)  # plain values only: no enums, no dataclasses
    assert loaded == state
    assert QuantConfig(**loaded["config"]) == cb.config
    other = GDRQCallback(cb.config, cb.schedule)
    other.load_state_dict(loaded)
    assert other.done == ["scale_clip", "quant_weights"] and other.phase == "quant_weights"
    assert other.phase_metrics == {"fp": 0.5, "scale_clip": 0.75}
    assert other.state_dict() == state
    other.done.append("quant_acts")  # no aliasing with the loaded dict
    assert loaded["done"] == ["scale_clip", "quant_weights"]


@pytest.mark.parametrize("version", [STATE_VERSION + 1, 0, None, "1"])
def test_load_state_dict_rejects_other_versions(version: object) -> None:
    state = GDRQCallback().state_dict()
    state["version"] = version
    with pytest.raises(ValueError, match=rf"version {version!r} is not supported"):
        GDRQCallback().load_state_dict(state)


def test_load_state_dict_rejects_unknown_phases() -> None:
    state = {**GDRQCallback().state_dict(), "done": ["scale_clip", "prune"]}
    cb = GDRQCallback()
    with pytest.raises(ValueError, match=r"unknown phases \['prune'\]"):
        cb.load_state_dict(state)
    assert cb.done == []


# -- stages ----------------------------------------------------------------------------
def test_fit_on_a_prequantized_module_still_starts_in_fp(make_trainer, make_module, no_plots) -> None:
    module = make_module()
    quantize_model(module.model, GDRQ_W4A4)  # everything on, as quantize_model returns it
    assert switch_values(module.model) == {True}
    seen: list[set[bool]] = []

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            seen.append(switch_values(pl_module.model))

    gdrq = GDRQCallback(GDRQ_W4A4, Schedule(scale_clip=1, quant_weights=1, quant_acts=1, groups=1))
    make_trainer([gdrq, Probe()], max_epochs=1, limit_train_batches=1).fit(module)
    assert gdrq.done == [] and seen == [{False}]


def test_validate_quantizes_with_everything_on_and_later_stages_do_not_reswap(make_trainer, make_module, no_plots) -> None:
    module = make_module()
    gdrq = GDRQCallback(GDRQ_W4A4, Schedule(scale_clip=1, quant_weights=1, quant_acts=1, groups=1))
    trainer = make_trainer([gdrq], limit_val_batches=1)
    trainer.validate(module, verbose=False)
    layers = quantized_layers(module.model)
    assert len(layers) == 5 and switch_values(module.model) == {True}  # a fresh model evaluates quantized
    trainer = make_trainer([gdrq], max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(module)
    assert [(n, id(m)) for n, m in quantized_layers(module.model)] == [(n, id(m)) for n, m in layers]
    assert gdrq.done == [] and switch_values(module.model) == {False}
    trainer.validate(module, verbose=False)  # stage 'validate' after fit keeps the fit's switches
    assert switch_values(module.model) == {False}


def test_summary_metric_per_phase_and_logged_transitions(make_trainer, make_module, no_plots, lightning_log) -> None:
    schedule = Schedule(scale_clip=1, quant_weights=2, quant_acts=None, groups=None)
    gdrq = GDRQCallback(GDRQ_W4A4, schedule, summary_metric="val/acc")
    trainer = make_trainer([gdrq], max_epochs=3, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=1)
    trainer.fit(make_module())
    assert list(gdrq.phase_metrics) == ["fp", "scale_clip", "quant_weights"]
    assert all(0.0 <= v <= 1.0 for v in gdrq.phase_metrics.values())
    assert gdrq.phase_metrics["quant_weights"] == pytest.approx(float(trainer.callback_metrics["val/acc"]))
    assert any(m.startswith("[gdrq] quantized 5 layers (gdrq W4A4)") for m in lightning_log)
    assert "[gdrq] epoch 1 step 1: phase 'scale_clip' begins" in lightning_log
    assert "[gdrq] epoch 2 step 2: phase 'quant_weights' begins" in lightning_log
    assert any(m.startswith("[gdrq] val/acc at the end of each phase -> fp: ") for m in lightning_log)


def test_summary_metric_skips_the_sanity_check(make_trainer, make_module, no_plots) -> None:
    gdrq = GDRQCallback(GDRQ_W4A4, Schedule(), summary_metric="val/acc")
    make_trainer([gdrq], max_epochs=1, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=1).fit(make_module())
    assert list(gdrq.phase_metrics) == ["groups"]  # the sanity check ran in fp; it is not a result
