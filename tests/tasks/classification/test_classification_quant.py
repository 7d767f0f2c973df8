"""Quantization-aware training of ResNet-18 on digits, one short run per method; the
optimizer sees quantizer parameters; ``load_quantized_module`` rebuilds a checkpoint."""
from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.testing import assert_close

from gdrq_lightning import QuantConfig, quantized_layers, set_quant_state
from gdrq_lightning.checkpoint import CheckpointError, load_quantized_module
from gdrq_lightning.quant import QuantConv2d, QuantReLU
from gdrq_lightning.schedule import PHASES
from tasks.classification import ClassificationModule

METHODS = {
    "gdrq": dict(weight_bits=4, act_bits=4, groups=4),
    "scale_clip": dict(weight_bits=4, act_bits=4),
    "group": dict(weight_bits=3, act_bits=4, groups=8),
    "hwgq": dict(weight_bits=1, act_bits=2),
    "dorefa": dict(weight_bits=4, act_bits=4),
    "pact": dict(weight_bits=4, act_bits=4),
    "lsq": dict(weight_bits=4, act_bits=4),
}
ALL_OFF = dict(scale_clip=False, quant_weights=False, quant_acts=False, groups=False)


class QuantParams(pl.Callback):
    """Quantizer parameters (PACT alpha, LSQ steps) after the first optimizer step."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 1:
            self.after_first = {n: p.detach().clone() for n, p in pl_module.named_parameters() if "quantizer" in n}


@pytest.mark.parametrize("method", list(METHODS))
def test_two_epoch_digits_run_trains_with_active_quantizers(method: str, fit_digits, digits_x, no_plots) -> None:
    params = QuantParams()
    config = QuantConfig(method=method, **METHODS[method])
    module, gdrq, trainer = fit_digits(config, callbacks=(params,), max_epochs=2, limit_train_batches=1)
    assert trainer.state.finished and trainer.current_epoch == 2 and trainer.global_step == 2
    assert gdrq.done == list(PHASES[:4])
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
    layers = dict(quantized_layers(module.model))
    assert "conv1" not in layers and "fc" not in layers  # the task's default skip: stem and classifier
    assert sum(isinstance(m, QuantConv2d) for m in layers.values()) == 19
    assert sum(isinstance(m, QuantReLU) for m in layers.values()) == 17  # one per call site

    model = module.model.eval()
    with torch.no_grad():
        quantized = model(digits_x)
        assert_close(model(digits_x), quantized, atol=0, rtol=0)  # eval is deterministic (no statistics move)
        set_quant_state(model, quant_weights=False)
        weights_float = model(digits_x)
        set_quant_state(model, quant_weights=True, quant_acts=False)
        acts_float = model(digits_x)
        set_quant_state(model, **ALL_OFF)
        full_precision = model(digits_x)
    assert torch.isfinite(quantized).all() and torch.isfinite(full_precision).all()
    for name, other in (("weights", weights_float), ("activations", acts_float), ("everything", full_precision)):
        assert not torch.allclose(quantized, other, rtol=1e-4, atol=1e-4), f"{method}: switching {name} off changed nothing"

    # quantizer parameters are trained: in the optimizer, without weight decay, and moving
    learned = {n: p for n, p in module.named_parameters() if "quantizer" in n}
    assert (len(learned) > 0) == (method in ("pact", "lsq"))
    if method == "pact":
        assert all(n.endswith("act_quantizer.alpha") for n in learned) and len(learned) == 17
    if method == "lsq":
        assert sum(n.endswith("weight_quantizer.step") for n in learned) == 19
    optimizer = trainer.optimizers[0]
    no_decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    for name, p in learned.items():
        assert id(p) in no_decay, f"{name} is not in the optimizer's undecayed group"
        assert not torch.equal(p.detach(), params.after_first[name]), f"{name} did not change in step 2"


# -- checkpoint rebuild -----------------------------------------------------------------
def test_load_quantized_module_reproduces_the_trained_module(gdrq_checkpoint, digits_x) -> None:
    path, logits = gdrq_checkpoint
    module = load_quantized_module(str(path))
    assert isinstance(module, ClassificationModule) and not module.training
    conv = module.model.layer1[0].conv1
    assert isinstance(conv, QuantConv2d) and conv.weight_quantizer.quant_groups == 4
    assert conv.weight_quantizer.is_on("quant_on") and conv.weight_quantizer.is_on("groups_on")
    with torch.no_grad():
        assert_close(module(digits_x), logits, atol=0, rtol=0)


def test_rebuild_does_not_need_the_starting_weights_file(gdrq_checkpoint, digits_x, tmp_path: Path) -> None:
    """A fine-tuned checkpoint names its starting weights (``pretrained``); export on another
    machine must not need that file, as the checkpoint's own weights replace them."""
    path, logits = gdrq_checkpoint
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["pretrained"] = str(tmp_path / "gone" / "fp32.ckpt")
    moved = tmp_path / "finetuned.ckpt"
    torch.save(ckpt, moved)
    with torch.no_grad():
        assert_close(load_quantized_module(str(moved))(digits_x), logits, atol=0, rtol=0)


def test_truncated_checkpoint_is_a_checkpoint_error_naming_the_file(gdrq_checkpoint, tmp_path: Path) -> None:
    data = gdrq_checkpoint[0].read_bytes()
    bad = tmp_path / "truncated.ckpt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{bad}.*truncated"):
        load_quantized_module(str(bad))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(num_classes=5), r"does not match tasks\.classification.*ClassificationModule.*size mismatch"),
        (dict(model="resnet34"), r"does not match .*missing keys \['model\.layer1\.2"),
    ],
)
def test_checkpoint_of_another_model_is_a_checkpoint_error(gdrq_checkpoint, tmp_path: Path, change: dict, match: str) -> None:
    ckpt = torch.load(gdrq_checkpoint[0], weights_only=True)
    ckpt["hyper_parameters"].update(change)
    path = tmp_path / "other.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=match) as info:
        load_quantized_module(str(path))
    assert str(path) in str(info.value)


def test_checkpoint_without_gdrq_state_or_state_dict(gdrq_checkpoint, tmp_path: Path) -> None:
    ckpt = torch.load(gdrq_checkpoint[0], weights_only=True)
    del ckpt["callbacks"]
    torch.save(ckpt, tmp_path / "plain.ckpt")
    with pytest.raises(CheckpointError, match=r"no GDRQCallback state"):
        load_quantized_module(str(tmp_path / "plain.ckpt"))
    torch.save({"weight": torch.zeros(3)}, tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match=r"tensor\.pt has no 'state_dict'"):
        load_quantized_module(str(tmp_path / "tensor.pt"))
    with pytest.raises(FileNotFoundError, match=r"missing\.ckpt"):
        load_quantized_module(str(tmp_path / "missing.ckpt"))
