"""The quickstart is deterministic for a seed (issue 27): two ``gdrq fit`` runs of the same
config and seed, on the same machine and thread count, end with identical weights and
quantizer state; another seed does not. (A different thread count changes the order of
float reductions and therefore the numbers; the README says which settings matter.)"""
from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import torch
import yaml

from gdrq_lightning.cli import main

REPO = Path(__file__).resolve().parents[2]


def fit_state(tmp_path: Path, name: str, seed: int) -> dict[str, torch.Tensor]:
    """A tiny fit of the digits quickstart whose phases all begin within its 4 steps."""
    config = yaml.safe_load((REPO / "configs" / "classification" / "digits_gdrq_w4a4.yaml").read_text())
    callback = config["trainer"]["callbacks"][0]["init_args"]
    callback["schedule"] = {"scale_clip": "step:1", "quant_weights": "step:2", "quant_acts": "step:2", "groups": "step:3",
                            "freeze_bn": "step:3"}
    callback.update(calib_batches=2, bn_recalib_batches=2)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    args = ["gdrq", "fit", "--config", str(path), "--seed_everything", str(seed), "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "1", "--data.image_size", "16",
            "--data.batch_size", "4", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--out", str(tmp_path / name)]
    with mock.patch.object(sys, "argv", args):
        main()
    return torch.load(tmp_path / name / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def test_same_seed_same_weights(tmp_path: Path) -> None:
    first, again = fit_state(tmp_path, "a", 0), fit_state(tmp_path, "b", 0)
    assert first.keys() == again.keys() and any("act_quantizer" in k for k in first)
    assert [k for k in first if not torch.equal(first[k], again[k])] == []
    # the weights moved from their seeded start, through every phase (BatchNorm re-estimated, then frozen)
    assert float(first["model.layer1.0.conv1.weight_quantizer.quant_on"]) == 1.0
