"""Smoke test of ``benchmarks/data_throughput.py --quick``: the generated COCO-2017-shaped set is
what the task loaders and torchvision's references read, and every row is printed. Nothing
here asserts a speed."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "data_throughput.py"


def test_quick_run_prints_every_task_and_the_evaluation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("bench_data_throughput", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    results = bench.main(["--quick", "--data", str(tmp_path / "data"), "--workers", "0", "--out", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    loaders = out.split("# COCO evaluation")[0]
    rows = [line for line in loaders.splitlines() if line.startswith("| ") and not line.startswith("|---")]
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| classification"] * 3 + ["| detection"] * 3 + ["| segmentation"] * 3
    assert {r.split(" | ")[2] for r in rows[1:]} == {"ours (loader)", "ours + host normalisation", "torchvision reference"}
    assert "pycocotools (evaluate + accumulate + summarize)" in out and "ours, 2 process(es)" in out
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(results))
    root = tmp_path / "data" / "quick"
    ann = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    assert len(ann["images"]) == 24 and len(ann["categories"]) == 80 and max(c["id"] for c in ann["categories"]) == 90
