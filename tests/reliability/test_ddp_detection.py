"""Two-process DDP on CPU (gloo) of a tiny quantized Faster R-CNN: COCOeval sees every
validation image once (each rank saw about half; the detections are gathered to rank 0
only), both ranks log the same mAP, and the backbone's activation-quantizer statistics stay
identical across ranks."""
from __future__ import annotations

import json
import textwrap

from tasks.detection import make_digits_coco

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import pytorch_lightning as pl
    import torch
    import torch.distributed as dist
    from gdrq_lightning import GDRQCallback, QuantConfig, Schedule
    from tasks.detection import COCODataModule, DetectionModule

    class Probe(pl.Callback):
        # Callback hooks run before the module's, so the evaluator still holds this epoch's detections.
        def on_validation_epoch_end(self, trainer, pl_module):
            self.local_images = len(pl_module.evaluator._dets)
            self.gathered_images = sorted(pl_module.evaluator._gathered())

        def on_train_end(self, trainer, pl_module):
            ema = torch.cat([v.reshape(-1) for k, v in pl_module.state_dict().items() if k.endswith("running_abs_mean")])
            mine = {"rank": trainer.global_rank, "local": self.local_images, "gathered": self.gathered_images,
                    "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
                    "ema": ema.tolist()}
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, mine)
            if trainer.is_global_zero:
                json.dump({"world": dist.get_world_size(), "ranks": ranks}, open(sys.argv[2], "w"))

    if __name__ == "__main__":
        pl.seed_everything(0)
        module = DetectionModule(
            arch="fasterrcnn_resnet18_fpn", num_classes=11, min_size=64, max_size=64, anchor_sizes=[8, 16, 32, 64, 128],
            fpn_channels=32, representation_size=64, box_batch_size_per_image=32, rpn_proposals_train=64,
            rpn_proposals_test=64, lr=0.01)
        data = COCODataModule(root=sys.argv[1], batch_size=2, hflip_prob=0.0)
        cb = GDRQCallback(QuantConfig(method="gdrq", groups=4), Schedule())
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2, logger=False,
                             enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                             num_sanity_val_steps=0, callbacks=[cb, Probe()])
        trainer.fit(module, data)
    """
)


def test_ddp_detection_evaluates_all_images_once_with_synced_quantizers(tmp_path, run_ddp):
    root = make_digits_coco(tmp_path / "coco", num_train=8, num_val=5, canvas=64, seed=0)
    val_ids = sorted(img["id"] for img in json.loads((root / "annotations/instances_val.json").read_text())["images"])
    result = run_ddp(SCRIPT, str(root))
    assert result["world"] == 2
    r0, r1 = result["ranks"]
    # each rank saw 3 of the 5 images (DistributedSampler pads with a repeat); COCOeval on rank 0 gets all 5 once
    assert r0["local"] < len(val_ids) and r1["local"] < len(val_ids)
    assert r0["gathered"] == val_ids and r1["gathered"] == []  # gathered to rank 0 only
    assert "val/mAP" in r0["metrics"] and r0["metrics"] == r1["metrics"]
    assert len(r0["ema"]) > 0 and any(v > 0 for v in r0["ema"])
    assert r0["ema"] == r1["ema"], "activation EMA thresholds differ between ranks"
