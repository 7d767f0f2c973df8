"""Smoke test of ``benchmarks/ort_inference.py --quick``: every variant gets a row with a size,
its integer kernels and timings (nothing here asserts a speed)."""
from __future__ import annotations

import pytest

from test_benchmarks import load, table_rows

pytest.importorskip("onnxruntime")


def test_ort_inference_quick_prints_every_variant(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load("ort_inference")
    rows = bench.main(["--quick", "--models", "resnet18"])
    out = capsys.readouterr().out
    assert "# ORT inference" in out and "### resnet18 at 64 px" in out
    assert [r.variant for r in rows] == ["fp32", "ort int8", "ours W8A8", "ours W4A4"]
    lines = table_rows(out)
    assert lines[0].startswith("| model | variant |") and len(lines) == 1 + len(rows)
    kernels = {r.variant: r.kernels["integer"] for r in rows}
    assert kernels == {"fp32": 0, "ort int8": 21, "ours W8A8": 19, "ours W4A4": 19}  # ours: stem and classifier float
    assert all(r.times["lat1"] and r.times["thr1"] for r in rows) and rows[0].size > 3.4 * rows[3].size
