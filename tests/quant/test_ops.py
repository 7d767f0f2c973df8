"""The two ways a fused kernel is called (``gdrq_lightning.quant.ops``): the custom op when traced
(compile, export, fake and meta tensors) and the body itself with the same autograd in eager mode.
Both must give the same values and gradients bit for bit, and eager calls must really skip the
dispatcher's custom-op path (what they are for)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gdrq_lightning import QuantConfig
from gdrq_lightning.quant import ActQuantizer, WeightQuantizer
from gdrq_lightning.quant import kernels as K
from gdrq_lightning.quant import ops as O
from gdrq_lightning.quant import primitives as P

from test_fast_paths import bits_equal


def identical(a: torch.Tensor, b: torch.Tensor) -> None:
    """Same shape, dtype and bits (floats compared as integers: ``-0.0`` differs from ``0.0``)."""
    if a.dtype == torch.float32:
        return bits_equal(a, b)
    assert a.dtype == b.dtype and torch.equal(a, b)

CASES = {  # name: (eager call, the same through the op, input shape)
    "signed per group": (
        lambda x: O.fake_quant(x, torch.tensor([0.7, 1.1]), 7, True, 0, K.HALF, True),
        lambda x: O._fake_quant_op(x, torch.tensor([0.7, 1.1]), 7, True, 0, K.HALF, True),
        (8, 3, 3, 3),
    ),
    "relu per tensor": (
        lambda x: O.fake_quant(x, torch.tensor(1.3), 15, False, None, K.HALF, True),
        lambda x: O._fake_quant_op(x, torch.tensor(1.3), 15, False, None, K.HALF, True),
        (4, 6, 5, 5),
    ),
    "clip only": (
        lambda x: O.fake_quant(x, torch.tensor(0.9), 0, True, None, K.HALF, True),
        lambda x: O._fake_quant_op(x, torch.tensor(0.9), 0, True, None, K.HALF, True),
        (4, 6, 5, 5),
    ),
    "scale-clip weights": (
        lambda w: O.scale_clip_fake_quant(w, torch.tensor(2.0), 4, 7, True),
        lambda w: O._scale_clip_fake_quant_op(w, torch.tensor(2.0), 4, 7, True),
        (8, 3, 3, 3),
    ),
    "hwgq": (
        lambda x: O.hwgq(x, 0.5, 3, True, True),
        lambda x: O._hwgq_op(x, 0.5, 3, True, True),
        (4, 6, 5, 5),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_eager_calls_equal_the_custom_ops_in_values_and_gradients(case: str) -> None:
    eager_fn, op_fn, shape = CASES[case]
    x = torch.randn(shape) * 1.5
    x.view(-1)[:3] = torch.tensor([0.0, -0.0, 1.3])  # zeros and a tie on the per-tensor bound
    up = torch.randn(shape)
    results = []
    for fn in (eager_fn, op_fn):
        xr = nn.Parameter(x.clone())  # weights are Parameters: they take the eager path too
        out, mask = fn(xr)
        (out * up).sum().backward()
        results.append((out, mask, xr.grad))
    for eager, traced in zip(*results):
        identical(eager, traced)


def test_eager_calls_skip_the_dispatcher_and_traced_calls_use_the_op() -> None:
    class OpNames(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    cfg = QuantConfig(method="gdrq", weight_bits=4, act_bits=4, groups=2, k_a=4.0)
    w, act = WeightQuantizer(cfg, 8), ActQuantizer(cfg).train()
    for device in ("cpu", "meta"):
        weight = nn.Parameter(torch.randn(8, 4, 3, 3, device=device))
        x = torch.randn(2, 8, 5, 5, device=device, requires_grad=True)
        act.to(device)(x)  # initialises the statistics
        with OpNames() as mode:
            (w(weight).sum() + act(x).sum()).backward()
        gdrq_ops = sorted({n for n in mode.names if n.startswith("gdrq.")})
        if device == "cpu":
            assert gdrq_ops == [], gdrq_ops
        else:  # meta tensors (and tracers) see one op per quantizer each way
            assert gdrq_ops == ["gdrq.fake_quant.default", "gdrq.masked_grad.default", "gdrq.relu_sum.default",
                                "gdrq.scale_clip_fake_quant.default"], gdrq_ops


def test_a_quantized_activation_may_be_modified_in_place_like_a_relu_output() -> None:
    """A residual ``out += identity`` after a quantizer: autograd forbids in-place ops on a view a
    custom Function returns, so the eager call must return tensors of their own."""
    q = ActQuantizer(QuantConfig(method="gdrq", act_bits=4, k_a=4.0)).train()
    x, identity = torch.randn(2, 4, 3, 3, requires_grad=True), torch.randn(2, 4, 3, 3)
    out = q(x)
    out += identity
    out.sum().backward()
    xr = x.detach().clone().requires_grad_()
    ref = P.fake_quant_unsigned(torch.relu(xr), q.threshold(), 4) + identity
    ref.sum().backward()
    bits_equal(out, ref)
    bits_equal(x.grad, xr.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relu_mean_is_the_float64_accumulated_mean_on_every_backend(dtype: torch.dtype) -> None:
    x = (torch.randn(16, 8, 33, 17) + 0.3).to(dtype)
    expected = torch.relu(x).double().mean().float().reshape(1)
    bits_equal(P.relu_mean(x), expected)
    with K.use_backend("eager"):
        bits_equal(P.relu_mean(x), expected)
    bits_equal(P.relu_mean(x.double()), expected)  # the reference path of other dtypes
    assert P.relu_mean(x.to("meta")).shape == (1,)
    assert torch.isnan(P.relu_mean(torch.empty(0, 3))).all()  # no batch: no number, as ``mean`` gives


@pytest.mark.parametrize("threads", [1, 4])
def test_weight_group_means_equal_atens_reduction_at_any_thread_count(threads: int) -> None:
    """Scale-Clip thresholds are ``k * w.abs().mean(dim=1)`` bit for bit: computing them two rows at a
    time (no |w| tensor of the whole layer) must not change the summation order."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for groups, length in [(8, 73728), (3, 40000), (5, 4608), (16, 1152), (2, 9), (1, 300)]:
            wv = torch.randn(groups, length) * 0.05
            identical(K.abs_mean_rows(wv), wv.abs().mean(dim=1))
        w = nn.Parameter(torch.randn(64, 32, 3, 3))
        q = WeightQuantizer(QuantConfig(method="gdrq", weight_bits=4, groups=8, k_w=2.0), 64)
        identical(q.threshold(w), 2.0 * w.detach().abs().reshape(8, -1).mean(dim=1))
    finally:
        torch.set_num_threads(before)
