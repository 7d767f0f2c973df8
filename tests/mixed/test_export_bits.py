"""A mixed-precision network exports each layer at its own bits: the integer file's containers,
the report's per-layer ``bits``, and INT4 ONNX codes for the layers of <= 4 bits only."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from gdrq_lightning import QuantConfig, quantize_model
from gdrq_lightning.export import export_model
from gdrq_lightning.mixed import BitPlan, with_plan

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

PLAN = {"features.3": 2, "features.6": 3, "features.9": 8, "fc": 5}


def network() -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for i, (cin, cout) in enumerate([(3, 8), (8, 8), (8, 8), (8, 8)]):
        layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    return _Net(nn.Sequential(*layers))


class _Net(nn.Module):
    def __init__(self, features: nn.Sequential) -> None:
        super().__init__()
        self.features = features
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(self.features(x).mean((2, 3)))))


def test_each_layer_exports_at_its_planned_bits(tmp_path) -> None:
    n = len(PLAN)
    plan = BitPlan(weight_bits=PLAN, params=dict.fromkeys(PLAN, 1), macs=dict.fromkeys(PLAN, 1), act_bits=dict.fromkeys(PLAN, 4))
    config = with_plan(QuantConfig(method="gdrq", weight_bits=4, act_bits=4, groups=2), plan)
    model = quantize_model(network(), config)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    model.train()(x)  # activation statistics
    model.eval()
    report = export_model(model, x[:1], tmp_path / "int8", calibration=[x])
    bits = {r["name"]: r["bits"] for r in report["layers"] if r["kind"] != "act"}
    assert bits == PLAN and len(bits) == n
    payload = torch.load(report["files"]["integer"], weights_only=True)
    assert {k: v["width"] for k, v in payload["layers"].items()} == {"features.3": 2, "features.6": 4, "features.9": 8, "fc": 8}
    report4 = export_model(model, x[:1], tmp_path / "int4", weight_format="int4", calibration=[x])
    proto = onnx.load(report4["files"]["onnx"])
    int4 = sorted(i.name.rsplit(".", 1)[0] for i in proto.graph.initializer
                  if i.data_type == onnx.TensorProto.INT4 and i.name.endswith(".codes"))
    assert int4 == ["features.3", "features.6"]  # 2 and 3 bits; the 8- and 5-bit layers keep int8 codes
    assert {r["name"]: r["bits"] for r in report4["layers"] if r["kind"] != "act"} == PLAN
