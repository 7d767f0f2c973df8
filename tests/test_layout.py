"""The code layout the project promises (issue: one home per quantization method)."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "gdrq_lightning"


def test_pact_lives_in_its_method_module_and_the_enum() -> None:
    naming = sorted(str(p.relative_to(ROOT)) for p in LIBRARY.rglob("*.py") if "pact" in p.read_text().lower())
    assert naming == ["gdrq_lightning/quant/config.py", "gdrq_lightning/quant/methods/pact.py"]


def test_no_library_or_task_file_over_450_lines() -> None:
    files = [*LIBRARY.rglob("*.py"), *(ROOT / "tasks").rglob("*.py")]
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > 450}
    assert not long
