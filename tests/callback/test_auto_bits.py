"""``GDRQCallback(auto_bits=...)``: one weight bit width per layer, planned when the full-precision
warm-up ends, kept in the checkpoint (a resumed run and the checkpoint's config get the same bits)."""
from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from gdrq_lightning import GDRQCallback, QuantConfig, Schedule, quantize_model, quantized_layers
from gdrq_lightning.training import bits as bits_job


SCHEDULE = Schedule(scale_clip="step:2", quant_weights="step:2", quant_acts="step:3", groups=None)
AUTO = {"budget": {"avg_weight_bits": 3}, "batches": 2, "bits": [2, 4, 8]}


def weight_bits(network: torch.nn.Module) -> dict[str, int]:
    return {n: m.weight_quantizer.bits for n, m in quantized_layers(network) if hasattr(m, "weight_quantizer")}


class BitsSeen(pl.Callback):
    def __init__(self) -> None:
        self.seen: list[dict[str, int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen.append(weight_bits(pl_module.model))


def test_the_plan_is_made_when_the_warm_up_ends_and_kept_on_resume(tmp_path: Path, make_trainer, make_module, no_plots,
                                                                  monkeypatch) -> None:
    every_step = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    gdrq, probe = GDRQCallback(QuantConfig(weight_bits=4), SCHEDULE, auto_bits=AUTO, calib_batches=2), BitsSeen()
    module = make_module()
    make_trainer([gdrq, every_step, probe], max_steps=4, max_epochs=-1, limit_train_batches=2,
                 enable_checkpointing=True).fit(module)
    plan = gdrq.bit_plan
    assert plan is not None and set(plan.weight_bits) == set(weight_bits(module.model))
    assert probe.seen[0] == probe.seen[1] == dict.fromkeys(plan.weight_bits, 4)  # the warm-up: uniform, as configured
    assert probe.seen[2] == probe.seen[3] == plan.weight_bits == weight_bits(module.model)
    assert plan.total_bits <= 3 * sum(plan.params.values())  # within the budget
    assert set(plan.weight_bits.values()) <= {2, 4, 8} and len(set(plan.weight_bits.values())) > 1

    state = torch.load(tmp_path / "step=3.ckpt", weights_only=True)["callbacks"]["GDRQCallback"]
    assert state["bit_plan"]["weight_bits"] == plan.weight_bits
    rebuilt = quantize_model(make_module().model, QuantConfig(**state["config"]))  # what gdrq export rebuilds
    assert weight_bits(rebuilt) == plan.weight_bits

    def no_second_plan(*args, **kwargs):
        raise AssertionError("a resumed run must reuse the checkpoint's plan")

    monkeypatch.setattr("gdrq_lightning.callback.plan_and_apply", no_second_plan)
    second, probe2 = GDRQCallback(QuantConfig(weight_bits=4), SCHEDULE, auto_bits=AUTO, calib_batches=2), BitsSeen()
    resumed = make_module()
    make_trainer([second, probe2], max_steps=5, max_epochs=-1, limit_train_batches=2).fit(
        resumed, ckpt_path=tmp_path / "step=3.ckpt")  # saved after the step in which the plan was made
    assert second.bit_plan.weight_bits == plan.weight_bits and probe2.seen == [plan.weight_bits] * 2


@pytest.mark.parametrize("value, message", [
    ({"budget": {"avg_weight_bits": 3}, "method": "hessian"}, "auto_bits.method='hessian' is not one of"),
    ({"budget": "watts=3"}, "auto_bits.budget 'watts=3' must be KIND=NUMBER"),
    ({"budget": {"avg_weight_bits": 3}, "batch": 4}, r"unknown field\(s\) \['batch'\]"),
    ({"budget": {"avg_weight_bits": 3}, "bits": [2, 9]}, "integer weight bit widths in 1..8"),
])
def test_bad_auto_bits_options_fail_at_construction(value, message) -> None:
    with pytest.raises(ValueError, match=message):
        GDRQCallback(QuantConfig(), auto_bits=value)


def test_a_budget_may_be_written_as_text() -> None:
    assert bits_job.AutoBits.parse({"budget": "size_mb=0.5"}).budget == {"size_mb": 0.5}
