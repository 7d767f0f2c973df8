"""Two-process DDP on CPU (gloo) of a tiny quantized FCN: the mIoU confusion matrix counts
every labelled validation pixel once (the ranks split an odd number of images 3 + 2, with no
padding repeat), both ranks log the same mIoU, and the activation-quantizer statistics stay
identical across ranks."""
from __future__ import annotations

import textwrap

import numpy as np
from PIL import Image

from tasks.segmentation import make_digits_voc

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import pytorch_lightning as pl
    import torch
    import torch.distributed as dist
    from gdrq_lightning import GDRQCallback, QuantConfig, Schedule
    from tasks.segmentation import SegmentationModule, VOCSegmentationDataModule

    class Probe(pl.Callback):
        # Callback hooks run before the module's, which computes and resets the confusion matrix.
        def on_validation_epoch_end(self, trainer, pl_module):
            self.counted = int(pl_module.val_confmat.compute().sum())  # summed over ranks

        def on_train_end(self, trainer, pl_module):
            ema = torch.cat([v.reshape(-1) for k, v in pl_module.state_dict().items() if k.endswith("running_abs_mean")])
            mine = {"counted": self.counted, "mIoU": float(trainer.callback_metrics["val/mIoU"]), "ema": ema.tolist(),
                    "local_batches": trainer.num_val_batches[0]}
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, mine)
            if trainer.is_global_zero:
                json.dump({"world": dist.get_world_size(), "ranks": ranks}, open(sys.argv[2], "w"))

    if __name__ == "__main__":
        pl.seed_everything(0)
        module = SegmentationModule(arch="fcn_resnet18", num_classes=11, num_vis=0)
        data = VOCSegmentationDataModule(root=sys.argv[1], num_classes=11, batch_size=2, val_batch_size=1,
                                         num_workers=0, crop_size=32, hflip=False)
        cb = GDRQCallback(QuantConfig(method="gdrq", groups=4), Schedule())
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=1, logger=False,
                             enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                             num_sanity_val_steps=0, callbacks=[cb, Probe()])
        trainer.fit(module, data)
    """
)


def test_ddp_segmentation_counts_every_val_pixel_once_with_synced_quantizers(tmp_path, run_ddp):
    root = make_digits_voc(tmp_path / "voc", num_train=4, num_val=5, canvas=32, min_size=10, max_size=16, seed=0)
    names = (root / "ImageSets/Segmentation/val.txt").read_text().split()
    labelled = sum(int((np.asarray(Image.open(root / "SegmentationClass" / f"{n}.png")) != 255).sum()) for n in names)
    result = run_ddp(SCRIPT, str(root))
    assert result["world"] == 2
    r0, r1 = result["ranks"]
    assert sorted([r0["local_batches"], r1["local_batches"]]) == [2, 3]  # 5 images, none repeated
    assert r0["counted"] == r1["counted"] == labelled  # the matrix holds all of them, once
    assert r0["mIoU"] == r1["mIoU"]
    assert len(r0["ema"]) > 0 and any(v > 0 for v in r0["ema"]) and r0["ema"] == r1["ema"]
