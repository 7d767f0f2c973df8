"""DetectionModule: construction, quantization targets, one fit + validation on tiny data."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torchvision.models.detection.faster_rcnn import TwoMLPHead

import gdrq_lightning as G
from gdrq_lightning.task import resolve_config
from tasks.detection import COCODataModule, DetectionModule
from tasks.detection.evaluator import METRICS
from tasks.detection.module import HEAD_OVERRIDES


def _quantize(module: DetectionModule, skip=None, groups: int = 4) -> None:
    cfg = G.QuantConfig(method="gdrq", weight_bits=4, act_bits=4, groups=groups,
                        skip=module.quant_skip_default() if skip is None else skip)
    G.quantize_model(module.model, cfg)


def test_unknown_arch_lists_known_names() -> None:
    with pytest.raises(ValueError, match="fasterrcnn_mobilenet_v3_large_fpn.*fasterrcnn_resnet18_fpn.*fasterrcnn_resnet50_fpn"):
        DetectionModule(arch="yolo")


def test_backbone_uses_trainable_batchnorm_and_skip_defaults(tiny_module, tiny_kwargs) -> None:
    model = tiny_module.model
    norms = [m for m in model.backbone.body.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(type(m) is nn.BatchNorm2d for m in norms)
    assert not any("FrozenBatchNorm" in type(m).__name__ for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert tiny_module.quant_skip_default() == ["rpn.head.cls_logits", "rpn.head.bbox_pred", "rpn.head.conv.0.1",
                                                "roi_heads.box_predictor", "backbone.body.conv1"]
    frozen = DetectionModule(**{**tiny_kwargs, "norm": "frozen", "trainable_layers": 3})
    assert any(type(m).__name__ == "FrozenBatchNorm2d" for m in frozen.model.backbone.body.modules())
    assert not frozen.model.backbone.body.layer1[0].conv1.weight.requires_grad
    assert frozen.model.backbone.body.layer2[0].conv1.weight.requires_grad


def test_mobilenet_skip_default_names_its_stem(tiny_kwargs) -> None:
    m = DetectionModule(arch="fasterrcnn_mobilenet_v3_large_fpn", num_classes=3, min_size=64, max_size=64,
                        anchor_sizes=[16, 32, 64], fpn_channels=32, representation_size=32)
    assert m.quant_skip_default()[-1] == "backbone.body.0.0"
    assert isinstance(m.model.get_submodule("backbone.body.0.0"), nn.Conv2d)
    with pytest.raises(ValueError, match="5 feature levels"):
        DetectionModule(**{**tiny_kwargs, "anchor_sizes": [8, 16]})


def test_task_defaults_quantize_backbone_fpn_and_the_heads_hidden_layers(tiny_module, tiny_kwargs) -> None:
    config = resolve_config(G.QuantConfig(method="gdrq", groups=4), tiny_module)  # 8-bit heads: the task's default
    assert config.overrides == HEAD_OVERRIDES
    mine = resolve_config(G.QuantConfig(method="gdrq", overrides={"roi_heads.box_head": {"weight_bits": 6}}), tiny_module)
    assert mine.overrides["roi_heads.box_head"] == {"weight_bits": 6, "act_bits": 8}  # the config's own fields win
    assert resolve_config(mine, tiny_module) == mine  # resolving twice changes nothing (resume)
    G.quantize_model(tiny_module.model, config)
    layers = dict(G.quantized_layers(tiny_module.model))
    assert any(n.startswith("backbone.body.layer") for n in layers) and any(n.startswith("backbone.fpn.") for n in layers)
    heads = {n: m for n, m in layers.items() if n.startswith(("rpn", "roi_heads"))}
    assert sorted(heads) == ["roi_heads.box_head.fc6", "roi_heads.box_head.fc7", "roi_heads.box_head.relu6",
                             "roi_heads.box_head.relu7", "rpn.head.conv.0.0"]
    assert all(m.weight_quantizer.bits == 8 for n, m in heads.items() if "relu" not in n)
    assert all(m.act_quantizer.bits == 8 for n, m in heads.items() if "relu" in n)
    # the layers reading FPN outputs / RoI-pooled features quantize their input; fc7 reads relu6's codes
    assert all(heads[n].input_quantizer is not None for n in ("rpn.head.conv.0.0", "roi_heads.box_head.fc6"))
    assert heads["roi_heads.box_head.fc7"].input_quantizer is None
    assert "backbone.body.conv1" not in layers and type(tiny_module.model.backbone.body.conv1) is nn.Conv2d
    # the former default, backbone + FPN only
    other = DetectionModule(**tiny_kwargs)
    _quantize(other, skip=["backbone.body.conv1", "rpn", "roi_heads"])
    assert not any(n.startswith(("rpn", "roi_heads")) for n, _ in G.quantized_layers(other.model))
    # the box head's ReLUs are modules (torchvision's TwoMLPHead calls F.relu): same keys and outputs
    x = torch.randn(3, 32, 7, 7)
    torchvision_head = TwoMLPHead(32 * 49, 64)
    torchvision_head.load_state_dict(other.model.roi_heads.box_head.state_dict())
    assert torch.equal(torchvision_head(x), other.model.roi_heads.box_head(x))


def test_quantization_changes_the_output_and_switches_off(tiny_module, tiny_kwargs) -> None:
    torch.manual_seed(0)
    _quantize(tiny_module)
    model = tiny_module.model
    x = [torch.rand(3, 64, 64)]
    model.train()
    model.backbone(torch.stack(x))  # initialises the activation statistics (and moves BN statistics)
    float_model = DetectionModule(**tiny_kwargs).model
    result = float_model.load_state_dict(model.state_dict(), strict=False)
    assert not result.missing_keys and all("quantizer" in k for k in result.unexpected_keys)
    model.eval()
    float_model.eval()
    with torch.no_grad():
        q = model.backbone(torch.stack(x))
        G.set_quant_state(model, quant_weights=False, quant_acts=False, scale_clip=False)
        off = model.backbone(torch.stack(x))
        ref = float_model.backbone(torch.stack(x))
        G.set_quant_state(model, quant_weights=True, quant_acts=True, scale_clip=True)
        again = model.backbone(torch.stack(x))
    for key in q:
        assert not torch.allclose(q[key], off[key], atol=1e-3), key
        torch.testing.assert_close(off[key], ref[key])  # switched off = the float network
        torch.testing.assert_close(again[key], q[key], atol=0, rtol=0)
    # the whole detector runs quantized in eval mode
    with torch.no_grad():
        out = model(x)
    assert len(out) == 1 and {"boxes", "labels", "scores"} <= set(out[0])


def test_fit_and_validate_logs_coco_metrics(tiny_coco, tiny_module, tmp_path) -> None:
    _quantize(tiny_module)
    dm = COCODataModule(root=str(tiny_coco), batch_size=2)
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=1, limit_val_batches=1, log_every_n_steps=1, logger=pl.loggers.CSVLogger(tmp_path),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        accelerator="cpu",
    )
    trainer.fit(tiny_module, dm)
    metrics = trainer.callback_metrics
    for key in ["train/loss", "train/loss_classifier", "train/loss_box_reg", "train/loss_objectness",
                "train/loss_rpn_box_reg"] + [f"val/{k}" for k in METRICS]:
        assert key in metrics, key
    assert torch.isfinite(metrics["train/loss"])
    assert 0.0 <= float(metrics["val/mAP"]) <= 1.0
    csv = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "val/mAP" in csv and "val/AP50" in csv


def test_num_classes_checked_against_data(tiny_coco, tiny_kwargs) -> None:
    dm = COCODataModule(root=str(tiny_coco), batch_size=4)
    module = DetectionModule(**{**tiny_kwargs, "num_classes": 5})
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="num_classes=5.*10 categories"):
        trainer.fit(module, dm)


def test_non_finite_loss_stops_training(tiny_module) -> None:
    class NaNLoss(nn.Module):
        def forward(self, images, targets):
            return {"loss_classifier": torch.tensor(float("nan")), "loss_box_reg": torch.tensor(1.0)}

    tiny_module.model = NaNLoss()
    with pytest.raises(FloatingPointError, match="loss_classifier=nan"):
        tiny_module.training_step(((torch.zeros(3, 8, 8),), ({},)), 0)


def test_pretrained_weights_load_from_local_files(tiny_module, tmp_path, tiny_kwargs) -> None:
    path = tmp_path / "det.pt"
    torch.save(tiny_module.model.state_dict(), path)
    loaded = DetectionModule(**tiny_kwargs, pretrained=str(path))
    _quantize(loaded)  # as the callback does before setup: float weights into a quantized model
    loaded.load_pretrained()
    for key, value in tiny_module.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value, atol=0, rtol=0, msg=key)
    with torch.no_grad():
        next(loaded.model.parameters()).add_(1.0)
    before = next(loaded.model.parameters()).clone()
    loaded.load_pretrained()  # a second stage (fit, then test) does not reload
    torch.testing.assert_close(next(loaded.model.parameters()), before, atol=0, rtol=0)
    # construction never touches the file (a module rebuilt from a checkpoint elsewhere)
    missing = DetectionModule(**tiny_kwargs, pretrained=str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        missing.load_pretrained()
    with pytest.raises(ValueError, match="does not match"):
        DetectionModule(**{**tiny_kwargs, "num_classes": 4}, pretrained=str(path)).load_pretrained()


@pytest.mark.parametrize(("arch", "classifier"), [("fasterrcnn_resnet18_fpn", "resnet18"),
                                                  ("fasterrcnn_mobilenet_v3_large_fpn", "mobilenet_v3_large")])
def test_pretrained_backbone_loads_torchvision_classifier_weights_in_setup(tmp_path, tiny_kwargs, arch, classifier) -> None:
    import torchvision

    net = torchvision.models.get_model(classifier, weights=None)
    torch.save(net.state_dict(), tmp_path / "bb.pt")
    kwargs = {**tiny_kwargs, "arch": arch, "anchor_sizes": [16, 32, 64] if "mobilenet" in arch else tiny_kwargs["anchor_sizes"]}
    module = DetectionModule(**kwargs, pretrained_backbone=str(tmp_path / "bb.pt"))
    _quantize(module)
    module.setup("fit")
    body = module.model.backbone.body.state_dict()
    prefix = "" if "resnet" in arch else "features."
    for key, value in body.items():
        if "_quantizer." not in key:
            torch.testing.assert_close(value, net.state_dict()[prefix + key], atol=0, rtol=0, msg=key)
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pt")
    wrong = DetectionModule(**tiny_kwargs, pretrained_backbone=str(tmp_path / "r34.pt"))
    with pytest.raises(ValueError, match=r"pretrained_backbone .*r34\.pt does not match torchvision's resnet18"):
        wrong.load_pretrained()


def test_backbone_is_torchvision_resnet_with_its_keys(tiny_module) -> None:
    """Plain torchvision blocks: ``quantize_model`` gives each ReLU call site its own quantizer."""
    import torchvision
    from torchvision.models.resnet import BasicBlock

    body = tiny_module.model.backbone.body
    assert all(type(block) is BasicBlock for layer in ("layer1", "layer2", "layer3", "layer4")
               for block in body.get_submodule(layer))
    reference = torchvision.models.resnet18()
    assert set(body.state_dict()) == {k for k in reference.state_dict() if not k.startswith("fc.")}


def test_quantized_backbone_has_one_activation_per_call_site(tiny_module) -> None:
    """Each quantized ReLU keeps its own statistics: every activation module runs once per forward."""
    _quantize(tiny_module)
    body = tiny_module.model.backbone.body
    calls: dict[str, int] = {}
    for name, mod in G.quantized_layers(body):
        if getattr(mod, "act_quantizer", None) is not None:
            mod.register_forward_hook(lambda m, i, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    with torch.no_grad():
        body.eval()(torch.rand(1, 3, 64, 64))
    assert len(calls) == 1 + 2 * 8  # the stem's and two per BasicBlock
    assert set(calls.values()) == {1}
