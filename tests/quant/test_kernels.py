"""The fused ops of ``gdrq_lightning.quant.kernels`` on every backend and device they promise.

``test_fast_paths.py`` compares the default (inductor-compiled) kernels with the plain
composition bit for bit; here the same math run as ATen ops (``GDRQ_KERNELS=eager``, the
fallback where compiling fails), other dtypes and layouts, the one-byte masks, and what a
quantized network costs on the ``meta`` device: a stand-in for CUDA, where every ATen op is
a kernel launch and every saved byte is device memory.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gdrq_lightning import QuantConfig, quantize_model
from gdrq_lightning.quant import ActQuantizer, WeightQuantizer
from gdrq_lightning.quant import kernels as K
from gdrq_lightning.quant import ops as O
from gdrq_lightning.quant import primitives as P

from test_fast_paths import ALPHAS, bits_equal, hard_inputs, ref_signed, ref_unsigned


@pytest.mark.parametrize("case", list(ALPHAS))
@pytest.mark.parametrize("signed", [True, False])
def test_eager_backend_equals_the_reference_bit_for_bit(case: str, signed: bool) -> None:
    axis, make_alpha = ALPHAS[case]
    alpha, bits = make_alpha(), 4
    shape = (8, 6, 3, 3) if axis == 0 else (5, 8, 4, 4)
    x = hard_inputs(shape, alpha, axis, bits, signed)
    up = torch.randn(shape)
    fast_fn, ref_fn = (P.fake_quant_signed, ref_signed) if signed else (P.fake_quant_unsigned, ref_unsigned)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with K.use_backend("eager"):
        fast = fast_fn(xa, alpha, bits, axis)
        (fast * up).sum().backward()
    ref = ref_fn(xb, alpha, bits, axis)
    (ref * up).sum().backward()
    bits_equal(fast, ref)
    bits_equal(xa.grad, xb.grad)


def test_eager_backend_scale_clip_weights_equal_the_compiled_kernels() -> None:
    w = nn.Parameter(torch.randn(16, 8, 3, 3))
    with torch.no_grad():
        w[:4] = torch.tensor([0.5, -0.5, 0.0, 0.0]).repeat(72).reshape(4, 8, 3, 3)  # every weight on T = 0.5
    q = WeightQuantizer(QuantConfig(method="gdrq", weight_bits=4, groups=4, k_w=2.0), 16)
    up = torch.randn_like(w)
    compiled = q(w)
    (compiled * up).sum().backward()
    grad, w.grad = w.grad.clone(), None
    with K.use_backend("eager"):
        eager = q(w)
        (eager * up).sum().backward()
    bits_equal(compiled, eager)
    bits_equal(grad, w.grad)
    assert float(w.grad[0, 0, 0, 0]) == 0.25 * float(up[0, 0, 0, 0])  # two clamps at the same bound


def test_compiled_kernels_are_in_use_and_the_backend_is_validated() -> None:
    P.fake_quant_unsigned(torch.randn(7, 5).requires_grad_(), torch.tensor(1.0), 4).sum().backward()
    assert "cpu" not in K._broken  # no fallback to ATen ops happened on this machine
    assert any(key[0] is K._unsigned_body for key in K._kernels)
    with pytest.raises(ValueError, match="kernel backend 'fast' is not one of: auto, eager"):
        with K.use_backend("fast"):
            pass


def test_a_device_where_compiling_fails_falls_back_to_aten_ops_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_compiler(*args: object) -> None:
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(K, "_build", no_compiler)
    monkeypatch.setattr(K, "_kernels", {})
    monkeypatch.setattr(K, "_broken", set())
    x = torch.randn(6, 5)
    with pytest.warns(UserWarning, match="compiling for cpu failed .*no C\\+\\+ compiler.*running them as ATen ops"):
        out = P.fake_quant_unsigned(x, torch.tensor(1.0), 4)
    bits_equal(out, ref_unsigned(x, torch.tensor(1.0), 4, None))
    assert K._broken == {"cpu"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per device, not on every call
        P.fake_quant_unsigned(x, torch.tensor(1.0), 4)


def test_gdrq_kernels_environment_variable_is_checked() -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "GDRQ_KERNELS": "fast"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout first
    cmd = [sys.executable, "-c", "import gdrq_lightning as g; g.QuantConfig()"]
    res = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True)
    assert res.returncode != 0 and "GDRQ_KERNELS='fast' is not one of: auto, eager" in res.stderr


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_run_the_kernels_and_match_the_composition(dtype: torch.dtype) -> None:
    x = (torch.randn(4, 6, 5, 5) * 2).to(dtype)
    alpha = torch.tensor(1.37)
    x.view(-1)[:3] = alpha.to(dtype)  # ties on the bound, rounded to the input's dtype as clamp rounds it
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    up = torch.randn(x.shape).to(dtype)
    out = P.fake_quant_signed(xa, alpha, 4)
    ref = P._reference_fake_quant(xb, alpha, 4, None, signed=True)
    assert out.dtype == dtype
    assert torch.equal(out.view(torch.int16), ref.view(torch.int16))
    (out * up).sum().backward()
    (ref * up).sum().backward()
    assert torch.equal(xa.grad.view(torch.int16), xb.grad.view(torch.int16))


def test_learned_clip_op_equals_the_pact_composition_bit_for_bit() -> None:
    from gdrq_lightning.quant.methods.pact import pact_act

    def composition(x: torch.Tensor, alpha: torch.Tensor, bits: int) -> torch.Tensor:
        y = torch.where(x >= alpha, alpha, torch.relu(x))
        s = (alpha.detach() / (2**bits - 1)).clamp_min(1e-8)
        return y + (torch.round(y.detach() / s) * s - y.detach())

    x = torch.randn(4, 6, 5, 5) * 2
    x.view(-1)[:6] = torch.tensor([1.3, 1.3, 0.0, -0.0, 1.3 / 15 * 2.5, 5.0])  # on alpha, zeros, a half step
    up = torch.randn(x.shape)
    results = []
    for fn in (lambda v, a: pact_act(v, a, 4), lambda v, a: composition(v, a, 4)):
        xr, alpha = x.clone().requires_grad_(), nn.Parameter(torch.tensor([1.3]))
        out = fn(xr, alpha)
        (out * up).sum().backward()
        results.append((out, xr.grad, alpha.grad))
    for fused, ref in zip(*results):
        bits_equal(fused, ref)


def test_channels_last_activations_keep_their_layout() -> None:
    x = torch.randn(2, 8, 5, 5).to(memory_format=torch.channels_last).requires_grad_()
    y = x.detach().contiguous().requires_grad_()
    out_cl = P.relu_fake_quant(x, torch.tensor(1.1), 4)
    out = P.relu_fake_quant(y, torch.tensor(1.1), 4)
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    bits_equal(out_cl.contiguous(), out)
    up = torch.randn(out.shape)
    (out_cl * up).sum().backward()
    (out * up).sum().backward()
    bits_equal(x.grad.contiguous(), y.grad)


def test_fake_implementations_match_the_real_outputs() -> None:
    """Compiled graphs plan memory from the fake implementations: shapes, dtypes and strides must agree."""
    cases = [
        (O.fake_quant, (torch.randn(8, 3, 2, 2), torch.rand(4), 7, True, 0, K.HALF, True)),
        (O.fake_quant, (torch.randn(2, 8, 3, 3).to(memory_format=torch.channels_last), torch.tensor(1.0), 15, False, None, K.HALF, True)),
        (O.fake_quant, (torch.randn(2, 4, 3, 3), torch.rand(2), 15, False, 1, K.HALF, False)),
        (O.scale_clip_fake_quant, (torch.randn(8, 3, 3, 3), torch.tensor(2.0), 4, 7, True)),
        (O.hwgq, (torch.randn(2, 4, 3, 3), 0.5, 3, True, True)),
        (O.scaled_rows, (torch.randn(8, 3, 3, 3), torch.rand(8), True)),
        (O.learned_clip_fake_quant, (torch.randn(2, 4, 3, 3), torch.tensor([1.5]), 15, True)),
    ]
    for op, args in cases:
        real = op(*args)
        meta_args = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
        fake = op(*meta_args)
        for r, f in zip(real if isinstance(real, tuple) else (real,), fake if isinstance(fake, tuple) else (fake,)):
            assert (r.shape, r.dtype, r.stride()) == (f.shape, f.dtype, f.stride()), op


# --- the cost of quantization on the meta device (the non-CPU branch, as on CUDA) ------------

def _saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(sizes)


@pytest.mark.parametrize("method", ["gdrq", "group", "hwgq", "pact"])
def test_activation_quantizer_saves_a_byte_per_element_for_backward(method: str) -> None:
    x = torch.randn(8, 64, 56, 56, device="meta", requires_grad=True)
    cfg = QuantConfig(method=method, act_bits=2 if method == "hwgq" else 4, k_a=4.0)
    quantizer = ActQuantizer(cfg).to("meta").train()
    relu, saved = _saved_bytes(nn.ReLU(), x), _saved_bytes(quantizer, x)
    assert saved <= 1.25 * relu  # measured: 0.25 (one byte against ReLU's float32 output)
    assert x.numel() <= saved < x.numel() + 64  # the mask (and PACT's alpha, for its decay)


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.count += 1
        return func(*args, **(kwargs or {}))


def _ops_per_step(model: nn.Module) -> int:
    model = model.to("meta").train()
    x = torch.randn(4, 3, 64, 64, device="meta")
    model(x).sum().backward()  # the first step initialises statistics and auto clip factors
    with _CountOps() as counter:
        model(x).sum().backward()
    return counter.count


def test_quantized_resnet18_runs_at_most_two_and_a_half_times_the_float_ops() -> None:
    float_ops = _ops_per_step(torchvision.models.resnet18(num_classes=10))
    cfg = QuantConfig(method="gdrq", weight_bits=4, act_bits=4, groups=8)  # k_a: auto, calibrated on meta too
    quant_ops = _ops_per_step(quantize_model(torchvision.models.resnet18(num_classes=10), cfg))
    assert quant_ops <= 2.5 * float_ops, (quant_ops, float_ops)  # measured: 1.43x (36 quantizers, 1 op each way)
