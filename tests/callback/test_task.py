"""The task contract from the library's side (``gdrq_lightning.task``): a module that
implements :class:`QuantTask` is quantized through it, a plain LightningModule as a whole,
and the library never imports task code."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
from torch import Tensor, nn

from gdrq_lightning import GDRQCallback, QuantConfig, QuantTask, Schedule, quantized_layers
from gdrq_lightning.task import export_network, quant_network, resolve_config

REPO = Path(__file__).resolve().parents[2]
GDRQ_W4A4 = QuantConfig(method="gdrq", weight_bits=4, act_bits=4, groups=4)


class Plain(pl.LightningModule):
    """No contract: the network is an attribute whose name the library must not guess."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def test_a_contract_module_is_quantized_through_its_network(make_module, make_trainer, no_plots) -> None:
    module = make_module()
    assert isinstance(module, QuantTask)
    assert quant_network(module) is module.model and export_network(module) is module.model
    make_trainer([GDRQCallback(GDRQ_W4A4, Schedule())], max_epochs=1, limit_train_batches=1).fit(module)
    assert [n for n, _ in quantized_layers(module.model)] == ["2", "3", "5", "6", "8"]  # names relative to model


def test_a_plain_lightning_module_is_quantized_as_a_whole(make_module) -> None:
    plain = Plain(make_module().model)
    assert not isinstance(plain, QuantTask)
    assert quant_network(plain) is plain and export_network(plain) is plain
    assert resolve_config(GDRQ_W4A4, plain) == GDRQ_W4A4  # skip stays None: the library's default
    GDRQCallback(GDRQ_W4A4, Schedule()).setup(pl.Trainer(logger=False), plain, "fit")
    assert [n for n, _ in quantized_layers(plain)] == ["net.2", "net.3", "net.5", "net.6", "net.8"]
    assert type(plain.net[0]) is nn.Conv2d and type(plain.net[11]) is nn.Linear  # first conv, last linear: float


def test_the_task_default_skip_applies_only_when_skip_is_unset(make_module) -> None:
    class Skips(type(make_module())):
        def quant_skip_default(self) -> list[str] | None:
            return ["0", "3"]

    module = Skips()
    assert resolve_config(GDRQ_W4A4, module).skip == ["0", "3"]
    assert resolve_config(QuantConfig(method="gdrq", skip=["6"]), module).skip == ["6"]
    assert resolve_config(QuantConfig(method="gdrq", skip=[]), module).skip == []


def test_the_library_never_imports_task_code() -> None:
    code = (
        "import sys, gdrq_lightning, gdrq_lightning.cli, gdrq_lightning.callback, gdrq_lightning.checkpoint, "
        "gdrq_lightning.monitoring, gdrq_lightning.export.accuracy, gdrq_lightning.export.report\n"
        "bad = sorted(m for m in sys.modules if m == 'tasks' or m.startswith('tasks.'))\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_quantizer_finite_check_covers_every_float_tensor_of_every_quantizer(make_module) -> None:
    from gdrq_lightning import quantize_model
    from gdrq_lightning.training.guards import check_quantizers_finite

    module = make_module()
    quantize_model(module.model, GDRQ_W4A4)
    quantizer = module.model[5].act_quantizer
    floats = {n: t for n, t in (*quantizer.named_parameters(), *quantizer.named_buffers()) if t.is_floating_point()}
    assert floats
    for name, tensor in floats.items():
        saved = tensor.detach().clone()
        tensor.data.fill_(float("nan"))
        with pytest.raises(FloatingPointError, match=rf"5\.act_quantizer\.{name} at global step 7"):
            check_quantizers_finite(module.model, 7)
        tensor.data.copy_(saved)
    check_quantizers_finite(module.model, 8)
