"""Every method under two-process DDP (gloo, CPU) with its phased schedule and no
``find_unused_parameters``; a NaN on one rank stops both; bf16 precisions train every method."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import pytorch_lightning as pl
import torch

from gdrq_lightning import GDRQCallback, Method, QuantConfig, Schedule
from tasks.classification import ClassificationModule, DigitsDataModule

METHODS = [m.value for m in Method if m != Method.none]

PHASED = textwrap.dedent(
    """
    import json, sys
    import pytorch_lightning as pl
    import torch
    import torch.distributed as dist
    from gdrq_lightning import GDRQCallback, QuantConfig, Schedule
    from tasks.classification import ClassificationModule, DigitsDataModule

    class Gather(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            state = {k: v for k, v in pl_module.state_dict().items() if "quantizer" in k and v.is_floating_point()}
            mine = torch.cat([v.reshape(-1).float() for v in state.values()]) if state else torch.zeros(1)
            ranks = [torch.zeros_like(mine) for _ in range(2)]
            dist.all_gather(ranks, mine)
            self.result = {"equal": torch.equal(ranks[0], ranks[1]), "n": len(state), "done": list(cb.done),
                           "steps": trainer.global_step}

    if __name__ == "__main__":
        results = {}
        for method in sys.argv[1].split(","):
            pl.seed_everything(0)
            bits = 1 if method == "hwgq" else 4
            cb = GDRQCallback(QuantConfig(method=method, weight_bits=bits, act_bits=2 if method == "hwgq" else 4, groups=2,
                                          skip=["conv1"]),  # the fc too: DoReFa/PACT's w_scale (no BN after it)
                              Schedule(scale_clip="step:1", quant_weights="step:2", quant_acts="step:3", groups="step:4",
                                       freeze_bn="step:5"), calib_batches=2, bn_recalib_batches=2)
            gather = Gather()
            trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=6, limit_val_batches=1,
                                 logger=False, enable_progress_bar=False, enable_model_summary=False,
                                 enable_checkpointing=False, num_sanity_val_steps=0, callbacks=[cb, gather])
            trainer.fit(ClassificationModule("resnet18", num_classes=10, small_input=True),
                        DigitsDataModule(image_size=16, batch_size=8))
            results[method] = gather.result
        if int(__import__("os").environ.get("LOCAL_RANK", 0)) == 0:
            json.dump(results, open(sys.argv[2], "w"))
    """
)


def test_every_method_crosses_its_phases_under_ddp_with_identical_replicas(run_ddp) -> None:
    results = run_ddp(PHASED, ",".join(METHODS))
    assert sorted(results) == sorted(METHODS)
    for method, r in results.items():
        assert r["steps"] == 6 and r["done"] == ["scale_clip", "quant_weights", "quant_acts", "groups", "freeze_bn"], method
        assert r["equal"], f"{method}: quantizer parameters/buffers differ between ranks"
        assert r["n"] > 0 or method in ("dorefa", "hwgq"), method


NAN_MODULE = textwrap.dedent(
    """
    import os, time
    import torch
    from tasks.classification import ClassificationModule

    class NaNOnRank1(ClassificationModule):
        def training_step(self, batch, batch_idx):
            if self.global_rank == 1 and self.global_step == 2:
                open(os.environ["NAN_STAMP"], "w").write(str(time.time()))
                batch = (batch[0] * float("nan"), batch[1])
            return super().training_step(batch, batch_idx)
    """
)


def test_a_nan_on_rank_1_stops_both_ranks_with_the_one_line_error(tmp_path) -> None:
    (tmp_path / "nanmod.py").write_text(NAN_MODULE)
    stamp = tmp_path / "nan_at"
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.getcwd()}", OMP_NUM_THREADS="1",
               WANDB_MODE="disabled", NAN_STAMP=str(stamp))
    args = [
        sys.executable, "-m", "gdrq_lightning.cli", "fit", "--config",
        os.path.join(os.getcwd(), "configs/classification/digits_pact_w4a4.yaml"),
        "--model.class_path=nanmod.NaNOnRank1", "--trainer.devices=2", "--trainer.strategy=ddp",
        "--trainer.accelerator=cpu", "--trainer.max_epochs=1", "--trainer.limit_train_batches=6",
        "--trainer.limit_val_batches=1", "--trainer.logger=false", "--data.init_args.image_size=16",
        f"--trainer.default_root_dir={tmp_path}", f"--checkpoint.dirpath={tmp_path / 'ckpt'}",
    ]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    ended = time.time()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert stamp.is_file() and ended - float(stamp.read_text()) < 60
    errors = [line for line in proc.stderr.splitlines() if line.startswith("gdrq: error:")]
    assert len(errors) == 2, proc.stderr[-3000:]  # one line per rank
    assert "gdrq: error: FloatingPointError: non-finite loss at global step 2: loss=nan" in errors  # rank 1 names it
    assert any("non-finite loss on another rank at global step 2" in e for e in errors)


# bf16-true: gdrq and lsq cover the statistics and learned-step paths here (every method: tests/quant)
@pytest.mark.parametrize("method, precision", [(m, "bf16-mixed") for m in METHODS] + [("gdrq", "bf16-true"), ("lsq", "bf16-true")])
def test_every_method_trains_in_bf16(method: str, precision: str, tmp_path) -> None:
    pl.seed_everything(0)
    bits = 1 if method == "hwgq" else 4
    cb = GDRQCallback(QuantConfig(method=method, weight_bits=bits, act_bits=2 if method == "hwgq" else 4),
                      Schedule(scale_clip="step:1", quant_weights="step:1", quant_acts="step:2", groups="step:2"),
                      calib_batches=1)
    module = ClassificationModule("resnet18", num_classes=10, small_input=True)
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=3, limit_val_batches=1,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0, callbacks=[cb], default_root_dir=tmp_path)
    trainer.fit(module, DigitsDataModule(image_size=16, batch_size=8))
    assert trainer.global_step == 3 and torch.isfinite(trainer.callback_metrics["train/loss"])
    stats = [v for k, v in module.state_dict().items() if k.endswith(("running_abs_mean", "running_max", ".k"))]
    assert all(v.dtype == torch.float32 for v in stats)
