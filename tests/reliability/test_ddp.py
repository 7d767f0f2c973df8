"""Two-process DDP on CPU (gloo): quantizer statistics stay identical across ranks."""
from __future__ import annotations

import textwrap

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import pytorch_lightning as pl
    import torch
    import torch.distributed as dist
    from gdrq_lightning import GDRQCallback, QuantConfig, Schedule
    from tasks.classification import ClassificationModule, DigitsDataModule

    class Gather(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            buffers = {k: v for k, v in pl_module.state_dict().items() if k.endswith("running_abs_mean")}
            stacked = torch.cat([v.reshape(-1) for v in buffers.values()])
            gathered = [torch.zeros_like(stacked) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, stacked)
            if trainer.is_global_zero:
                json.dump({"world": dist.get_world_size(), "equal": all(torch.equal(gathered[0], g) for g in gathered),
                           "nonzero": bool((gathered[0] > 0).all()), "n": len(buffers),
                           "acc_logged": "val/acc1" in trainer.callback_metrics}, open(sys.argv[1], "w"))

    if __name__ == "__main__":
        pl.seed_everything(0)
        cb = GDRQCallback(QuantConfig(method="gdrq", groups=4), Schedule())
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, limit_val_batches=2,
                             logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                             num_sanity_val_steps=0, val_check_interval=3, callbacks=[cb, Gather()])
        trainer.fit(ClassificationModule("resnet18", num_classes=10), DigitsDataModule(image_size=16, batch_size=8))
    """
)


def test_ddp_two_cpu_processes_share_quantizer_statistics(run_ddp):
    result = run_ddp(SCRIPT)
    assert result["world"] == 2
    assert result["n"] > 0 and result["nonzero"]
    assert result["equal"], "EMA thresholds differ between ranks"
    assert result["acc_logged"]
