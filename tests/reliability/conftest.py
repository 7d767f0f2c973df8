"""Helpers for the multi-process tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest


def run_ddp_script(tmp_path: Path, source: str, *args: str) -> dict[str, Any]:
    """Run ``source`` as a script (it starts its own 2-process DDP trainer) with ``args``
    plus a result path as its last argument, and return the JSON it wrote there."""
    script = tmp_path / "ddp_script.py"
    script.write_text(source)
    out = tmp_path / "result.json"
    env = dict(os.environ, PYTHONPATH=os.getcwd(), OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    proc = subprocess.run([sys.executable, str(script), *args, str(out)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture
def run_ddp(tmp_path: Path) -> Callable[..., dict[str, Any]]:
    """``run_ddp(source, *args)``: :func:`run_ddp_script` in this test's ``tmp_path``."""
    return lambda source, *args: run_ddp_script(tmp_path, source, *args)
