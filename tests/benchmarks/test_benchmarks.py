"""Smoke tests of the benchmark scripts: each runs its ``--quick`` mode and prints its table.

Benchmarks are scripts, not tests: nothing here asserts a timing or an accuracy. The
scripts are imported (not run in subprocesses) so torch and Lightning load once.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def load(name: str) -> ModuleType:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def table_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("|---")]


def test_step_overhead_quick_prints_every_variant(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load("step_overhead")
    bench.main(["--quick", "--models", "mobilenet_v3_small", "--groups", "8"])
    out = capsys.readouterr().out
    assert "# step overhead: device=cpu" in out and "### mobilenet_v3_small" in out
    rows = table_rows(out)
    labels = list(bench.baselines.step_variants(8))
    assert rows[0].startswith("| variant |") and len(rows) == 1 + len(labels)
    for label, row in zip(labels, rows[1:]):
        assert row.startswith(f"| {label} |") and row.endswith("x |")
    assert "| FP32 |" in rows[1] and "1.00x" in rows[1]


def test_step_overhead_compiled_bf16_rows(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from torch import nn

    from gdrq_lightning import QuantConfig, quantize_model

    bench = load("step_overhead")

    def tiny(name: str) -> nn.Module:  # the rows' mechanics without compiling a whole ResNet
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    variants = {"FP32": tiny, "ours GDRQ": lambda n: quantize_model(tiny(n), QuantConfig(method="gdrq", k_a=4.0))}
    monkeypatch.setattr(bench.baselines, "step_variants", lambda groups: variants)
    bench.main(["--quick", "--models", "resnet18", "--compile", "both", "--backend", "aot_eager", "--precision", "bf16-mixed"])
    out = capsys.readouterr().out
    assert "precision=bf16-mixed, compile=both (aot_eager)" in out
    rows = table_rows(out)
    assert rows[0].endswith("| vs FP32 eager |")
    assert [r.split(" | ")[0][2:] for r in rows[1:]] == ["FP32", "ours GDRQ", "FP32 (compiled)", "ours GDRQ (compiled)"]
    assert "| 1.00x | 1.00x |" in rows[1] and rows[3].split(" | ")[3] == "1.00x"  # compiled rows against FP32 compiled


def test_step_overhead_notes_a_variant_that_cannot_run_a_model(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bench = load("step_overhead")
    real = bench.baselines.step_variants

    def unavailable(name: str) -> torch.nn.Module:
        raise ValueError(f"no quantizable torchvision model for {name!r}")

    monkeypatch.setattr(bench.baselines, "step_variants", lambda groups: {"FP32": real(groups)["FP32"], "other tool": unavailable})
    bench.main(["--quick", "--models", "mobilenet_v3_small"])
    out = capsys.readouterr().out
    assert "note: other tool skipped on mobilenet_v3_small: ValueError: no quantizable" in out
    assert [r.split(" | ")[0][2:] for r in table_rows(out)[1:]] == ["FP32"]


def test_step_overhead_cuda_defaults_and_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = load("step_overhead")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = bench.parse_args(["--device", "cuda"])
    assert (args.models, args.batch, args.size, args.precision, args.compile) == (["resnet18", "resnet50"], 128, 224, "bf16-mixed", "both")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cuda"])


def test_fake_quant_throughput_quick_prints_both_tables(capsys: pytest.CaptureFixture[str]) -> None:
    load("fake_quant_throughput").main(["--quick"])
    out = capsys.readouterr().out
    assert "### weights" in out and "### activations" in out
    rows = table_rows(out)
    assert sum(r.startswith("| op ") for r in rows) == 2
    assert any(r.startswith("| ours WeightQuantizer") for r in rows)
    assert any(r.startswith("| ours ActQuantizer") for r in rows)
    assert sum(r.startswith("| ours, kernels as ATen ops (GDRQ_KERNELS=eager)") for r in rows) == 2
    assert any(r.startswith("| torch fake_quantize_per_channel_affine") for r in rows)


def test_accuracy_digits_quick_prints_its_table(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bench = load("accuracy_digits")
    plain = "Brevitas W4A4" if bench.baselines.brevitas_available() else "torch.ao"
    out_file = tmp_path / "acc.jsonl"
    bench.main(["--quick", "--methods", "GDRQ W4A4 (G=4)", plain, "--out", str(out_file)])
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert rows[0].startswith("| method | top-1 %")
    assert len(rows) == 3 and rows[1].startswith("| GDRQ W4A4") and "± 0.0 | 1 |" in rows[1]
    assert len(out_file.read_text().splitlines()) == 2  # one JSON line per finished run
    bench.main(["--quick", "--methods", "GDRQ W4A4 (G=4)", "--out", str(out_file)])  # resumes: nothing to run
    assert "seed 0: top-1" not in capsys.readouterr().out
    bench.main(["--quick", "--table-only", "--methods", "GDRQ W4A4 (G=4)", "LSQ W4A4", "--out", str(out_file)])
    out = capsys.readouterr().out
    assert "seed 0: top-1" not in out and "| LSQ W4A4 | (not run) | 0 |" in out


def test_accuracy_digits_fine_tune_protocol_pretrains_once_per_seed(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import json

    bench = load("accuracy_digits")
    argv = ["--quick", "--pretrain-epochs", "1", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "ft.jsonl")]
    bench.main([*argv, "--methods", "GDRQ W4A4 (G=4)", "FP32 (plain loop)"])
    out = capsys.readouterr().out
    assert "from FP32 trained 1 epochs" in out and "lr 0.005" in out
    assert out.count("pretrained FP32 seed 0") == 1  # shared by the Lightning row and the plain loop
    records = [json.loads(line) for line in (tmp_path / "ft.jsonl").read_text().splitlines()]
    assert [(r["pretrain"], r["lr"]) for r in records] == [(1, 0.005), (1, 0.005)]
    bench.main([*argv, "--methods", "LSQ W4A4"])  # a later process reuses the cached model
    assert "pretrained FP32" not in capsys.readouterr().out
    bench.main(["--quick", "--out", str(tmp_path / "ft.jsonl"), "--methods", "GDRQ W4A4 (G=4)"])
    assert "seed 0: top-1" in capsys.readouterr().out  # a from-scratch run does not count fine-tune records
    bench.main(["--quick", "--lr", "0.01", "--out", str(tmp_path / "ft.jsonl"), "--methods", "GDRQ W4A4 (G=4)"])
    assert "seed 0: top-1" in capsys.readouterr().out  # nor records of another learning rate


def test_accuracy_digits_rows_do_not_shadow_the_library_method_enum() -> None:
    import gdrq_lightning

    bench = load("accuracy_digits")
    assert not hasattr(bench, "Method")  # `Method` is gdrq_lightning's enum of quantization methods
    assert all(isinstance(row, bench.Row) for row in bench.ROWS)
    ours = [row for row in bench.ROWS if row.kind == "ours"]
    assert {gdrq_lightning.Method(row.config["method"]) for row in ours} >= {gdrq_lightning.Method("gdrq")}


def test_accuracy_digits_selects_exact_labels_and_stages_gdrq() -> None:
    bench = load("accuracy_digits")
    labels = [m.label for m in bench.selected(bench.parse_args(["--methods", "GDRQ W2A4 (G=4)"]))]
    assert labels == ["GDRQ W2A4 (G=4)"]  # an exact label does not also pick "..., all at once"
    labels = [m.label for m in bench.selected(bench.parse_args(["--methods", "GDRQ W2A4", "--skip", "once"]))]
    assert labels == ["GDRQ W2A4 (G=4)", "GDRQ W2A4 (G=4), auto"]
    args = bench.parse_args(["--epochs", "8", "--warmup-epochs", "1"])
    rows = {m.label: m for m in bench.ROWS}
    staged = bench.schedule_for(rows["GDRQ W4A4 (G=4)"], args)
    at_once = bench.schedule_for(rows["GDRQ W4A4 (G=4), all at once"], args)
    assert (staged.scale_clip, staged.quant_weights, staged.quant_acts, staged.groups) == (1, 2, 2, 2)
    assert (at_once.scale_clip, at_once.quant_weights, at_once.groups) == (1, 1, 1)
    assert bench.schedule_for(rows["PACT W4A4"], args).quant_weights == 1
    assert staged.freeze_bn is None


def test_accuracy_digits_tune_holdout_sets_training_images_aside() -> None:
    bench = load("accuracy_digits")
    plain, held = bench.DigitsDataModule(), bench.HoldoutDigits(0.2)
    plain.setup("fit")
    held.setup("fit")
    assert len(held.holdout_set) == round(0.2 * len(plain.train_set)) and not held.holdout_set.train
    together = torch.cat([held.train_set.images, held.holdout_set.images])
    assert sorted(map(bytes, together.numpy())) == sorted(map(bytes, plain.train_set.images.numpy()))
    assert torch.equal(held.val_set.images, plain.val_set.images)  # reported on the same, untouched split


def test_accuracy_digits_tune_knobs_and_choice() -> None:
    bench = load("accuracy_digits")
    args = bench.parse_args(["--tune-holdout", "0.2", "--lr", "0.01"])
    rows = {m.label: m for m in bench.selected(args)}
    assert "FP32" in rows and "HWGQ W1A2" not in rows  # the compared rows and the reference
    assert all(len(m.knob.values) == 3 and m.knob.default in m.knob.values for m in rows.values() if m.knob)
    gdrq, _ = bench.with_setting(rows["GDRQ W2A4 (G=4)"], args, 6.0)
    assert gdrq.config["k_a"] == 6.0 and rows["GDRQ W2A4 (G=4)"].config["k_a"] == 4.0  # the row itself is untouched
    _, lsq_args = bench.with_setting(rows["LSQ W2A4"], args, 2.0)
    assert lsq_args.lr == pytest.approx(0.02) and args.lr == 0.01
    assert bench.choose({1.5: 96.0, 2.0: 97.0, 3.0: 97.5}, 2.0) == 3.0
    assert bench.choose({1.5: 97.5, 2.0: 97.5, 3.0: 90.0}, 2.0) == 2.0  # a tie goes to the default


def test_accuracy_digits_tune_runs_every_setting_and_reports_the_chosen_one(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import json

    bench = load("accuracy_digits")
    out_file = tmp_path / "tuned.jsonl"
    bench.main(["--quick", "--tune-holdout", "0.2", "--methods", "GDRQ W2A4 (G=4)", "--out", str(out_file)])
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [(r["knob"], r["setting"]) for r in records] == [("k_a", 4.0), ("k_a", 6.0), ("k_a", 8.0)]
    assert all(0 <= r["holdout_acc"] <= 1 and r["holdout"] == 0.2 for r in records)
    best = max(records, key=lambda r: (r["holdout_acc"], r["setting"] == 4.0))
    row = next(r for r in table_rows(capsys.readouterr().out) if r.startswith("| GDRQ W2A4"))
    assert f"| k_a={best['setting']:g} | {100 * best['acc']:.1f} ± 0.0 | 1 |" in row
    bench.main(["--quick", "--table-only", "--methods", "GDRQ W2A4 (G=4)", "--out", str(out_file)])
    assert "| GDRQ W2A4 (G=4) | (not run) |" in capsys.readouterr().out  # never mixed with whole-split runs


def test_clip_mse_quick_finds_the_clip_each_distribution_wants(capsys: pytest.CaptureFixture[str]) -> None:
    load("clip_mse").main(["--quick"])
    out = capsys.readouterr().out
    assert "### weights" in out and "### activations" in out and "k=2*" in out and "k=4*" in out
    best = {tuple(r.split(" | ")[:2]): float(r.split(" | ")[-2]) for r in table_rows(out) if not r.startswith("| input")}
    assert best[("| U(-1, 1)", "4")] == 2.0  # k_w = 2 is right once Scale-Clip has made weights uniform
    assert best[("| N(0, 1)", "4")] == 3.0
    assert best[("| ReLU(N(0, 1))", "4")] in (6.0, 7.0, 8.0)  # well above the default k_a = 4


def test_missing_brevitas_drops_its_rows_with_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    baselines = load("baselines")
    monkeypatch.setattr(baselines, "brevitas_available", lambda: False)
    assert not any("Brevitas" in label for label in baselines.step_variants(4))
    assert "not installed" in baselines.BREVITAS_MISSING


def test_profile_step_quick_prints_the_op_table(capsys: pytest.CaptureFixture[str]) -> None:
    load("profile_step").main(["--quick", "--model", "mobilenet_v3_small", "--top", "5"])
    out = capsys.readouterr().out
    assert "# profile: mobilenet_v3_small" in out and "ours GDRQ W4A4 G=8" in out
    rows = table_rows(out)
    assert rows[0].startswith("| op |") and len(rows) == 1 + 5


def test_profile_step_rejects_an_unknown_variant() -> None:
    with pytest.raises(SystemExit):
        load("profile_step").main(["--quick", "--variant", "no such tool"])


def test_accuracy_digits_leaves_lightning_logging_as_it_was(tmp_path: Path) -> None:
    import logging

    logger = logging.getLogger("pytorch_lightning")
    before = logger.level
    load("accuracy_digits").main(["--quick", "--methods", "GDRQ W4A4", "--out", str(tmp_path / "acc.jsonl")])
    assert logger.level == before  # later tests read Lightning's INFO messages


def test_accuracy_tasks_rows_skip_finished_runs_and_table(tmp_path, monkeypatch) -> None:
    at = load("accuracy_tasks")
    labels = [r.label for r in at.rows("voc")]
    assert labels[0] == "FP32" and "GDRQ auto W4A4" in labels and "LSQ W2A4" in labels
    assert [r.label for r in at.rows("coco")] == ["FP32", "GDRQ defaults W4A4", "GDRQ k_a auto W4A4", "GDRQ auto W4A4", "PACT W4A4",
                                                 "DoReFa W4A4", "LSQ W4A4", "GDRQ k_a auto W4A4, heads float"]
    auto = next(r for r in at.rows("voc") if r.label == "GDRQ auto W2A4")
    assert auto.config == {"method": "gdrq", "k_w": "auto", "k_a": "auto", "weight_bits": 2, "act_bits": 4}
    calls: list[tuple[str, int]] = []
    monkeypatch.setattr(at, "run", lambda task, row, seed, args: calls.append((row.label, seed)) or 0.5 + 0.01 * seed)
    out = tmp_path / "acc.jsonl"
    out.write_text(json.dumps({"task": "coco", "row": "FP32", "seed": 0, "metric": 0.6, "seconds": 1}) + "\n")
    at.main(["--task", "coco", "--seeds", "0", "1", "--rows", "FP32", "PACT W4A4", "--out", str(out)])
    assert calls == [("PACT W4A4", 0), ("FP32", 1), ("PACT W4A4", 1)]  # FP32 seed 0 was already there
    text = at.table("coco", at.done_runs(str(out)), [0, 1])
    assert "| PACT W4A4 | 50.50 ± 0.71 | 50.00, 51.00 | -5.00 |" in text
