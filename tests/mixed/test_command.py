"""``gdrq bits`` on tiny versions of the three digits quickstarts (classification, digits-VOC FCN,
digits-COCO Faster R-CNN): the written config carries the plan and builds the planned network;
``bits.csv`` and the PNG; errors in one line."""
from __future__ import annotations

import copy
import csv
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml

from gdrq_lightning import QuantConfig, quantize_model, quantized_layers
from gdrq_lightning.cli import main
from gdrq_lightning.mixed.command import build_task
from gdrq_lightning.task import quant_network, resolve_config

REPO = Path(__file__).resolve().parents[2]


def tiny_config(task: str, tmp_path: Path) -> Path:
    if task == "classification":
        raw = yaml.safe_load((REPO / "configs/classification/digits_gdrq_w4a4.yaml").read_text())
        raw["data"]["init_args"].update(image_size=16, batch_size=8)
    elif task == "segmentation":
        from tasks.segmentation import make_digits_voc

        root = make_digits_voc(tmp_path / "voc", num_train=4, num_val=2, canvas=32, min_size=10, max_size=16, seed=0)
        raw = yaml.safe_load((REPO / "configs/segmentation/digits_voc_fcn_gdrq_w4a4.yaml").read_text())
        raw["model"]["init_args"]["pretrained"] = None
        raw["data"]["init_args"].update(root=str(root), batch_size=2, crop_size=32, make_digits_if_missing=False)
    else:
        from tasks.detection import make_digits_coco

        root = make_digits_coco(tmp_path / "coco", num_train=4, num_val=2, canvas=64, seed=0)
        raw = yaml.safe_load((REPO / "configs/detection/digits_coco_gdrq_w4a4.yaml").read_text())
        raw["model"]["init_args"].update(pretrained=None, min_size=64, max_size=64, fpn_channels=32, representation_size=64,
                                         box_batch_size_per_image=32, rpn_proposals_train=64, rpn_proposals_test=64)
        raw["data"]["init_args"].update(root=str(root), batch_size=2, make_digits_if_missing=False)
    path = tmp_path / f"tiny_{task}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("task", ["classification", "segmentation", "detection"])
def test_gdrq_bits_writes_a_config_with_the_plan(task: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tiny_config(task, tmp_path)
    out = tmp_path / "out"
    main(["bits", "--config", str(config), "--budget", "avg_weight_bits=3", "--batches", "2", "--seed", "3",
          "--out", str(out)])
    printed = capsys.readouterr().out
    assert "uniform W3" in printed and "summed score" in printed
    mixed = out / f"{config.stem}.mixed.yaml"
    text = mixed.read_text()
    assert text.startswith("# gdrq bits: ") and "budget avg_weight_bits=3; method fisher; 2 training batches; seed 3" in text
    raw = yaml.safe_load(text)
    with open(out / "bits.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["layer", "params", "macs", "bits", "score_w2", "score_w3", "score_w4", "score_w8"]
    planned = {r["layer"]: int(r["bits"]) for r in rows}
    params = {r["layer"]: int(r["params"]) for r in rows}
    assert sum(params[n] * b for n, b in planned.items()) <= 3 * sum(params.values())
    assert all(int(r["macs"]) > 0 for r in rows)
    assert (out / "bits.png").stat().st_size > 10_000
    # the written config builds the planned network: every planned layer at its bits, the rest as before
    entry = raw["trainer"]["callbacks"][0]
    module, _ = build_task(copy.deepcopy(raw))
    qcfg = resolve_config(QuantConfig(**entry["init_args"]["config"]), module)
    network = quantize_model(quant_network(module), qcfg)
    bits = {n: m.weight_quantizer.bits for n, m in quantized_layers(network) if hasattr(m, "weight_quantizer")}
    assert bits == planned
    original = yaml.safe_load(config.read_text())
    entry["init_args"]["config"].pop("overrides")
    original["trainer"]["callbacks"][0]["init_args"]["config"].pop("overrides", None)  # detection: the heads' 8 bits
    assert raw == original  # nothing else changed


def run_main(args: list[str]) -> int:
    with mock.patch.object(sys, "argv", ["gdrq", *args]), pytest.raises(SystemExit) as info:
        main()
    return info.value.code


@pytest.mark.parametrize(("args", "message"), [
    (["--budget", "avg_bits=3"], "--budget 'avg_bits=3' must be KIND=NUMBER > 0 with KIND one of: avg_weight_bits, size_mb, bops"),
    (["--budget", "avg_weight_bits=1"], "budget avg_weight_bits=1 is unreachable with bits [2, 3, 4, 8]: the reachable range is 2 .. 8"),
    (["--budget", "size_mb=1", "--pin", "nothing*=8"], "pin pattern 'nothing*' matches no planned layer"),
])
def test_errors_are_one_line(args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tiny_config("classification", tmp_path)
    assert run_main(["bits", "--config", str(config), "--batches", "1", "--method", "mse", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err.splitlines()[0]


def test_a_config_without_the_callback_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fp32 = str(REPO / "configs/classification/digits_fp32.yaml")
    raw = yaml.safe_load(Path(fp32).read_text())
    raw["trainer"].pop("callbacks")
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert run_main(["bits", "--config", str(path), "--budget", "avg_weight_bits=3", "--out", str(tmp_path)]) == 2
    assert "has no gdrq_lightning.GDRQCallback in trainer.callbacks" in capsys.readouterr().err


def test_top_level_help_lists_bits(capsys: pytest.CaptureFixture) -> None:
    assert run_main(["--help"]) == 0
    assert "gdrq bits --config FILE --budget avg_weight_bits=3 --out DIR" in capsys.readouterr().out
