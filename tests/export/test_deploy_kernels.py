"""The deploy form against ONNX Runtime's fused kernels, code by code.

Every ``QuantizeLinear`` output of the exported file is added as an extra graph output; in ORT's
default session those tensors are what the fused kernels write (``QLinearConv``, ``QLinearAdd``:
the optimized graph, saved through ``SessionOptions.optimized_model_filepath``, says which op
produced each). They are compared with the integer codes of the PyTorch deploy form on the same
images (a ResNet-18 at 32 px whose BatchNorms have random affine parameters and statistics of a
train-mode pass, so biases, negative BN factors and residual grids are all in play):

* ``QLinearConv``: no mismatch at all. The deploy form accumulates the same integer codes exactly
  and requantizes with the very float32 multiplier ORT computes, ``f32(f32(s_x · s_w) / s_y)``.
* ``QLinearAdd``: ORT adds in its own float arithmetic (scale ratios, FMAs), so a sum that lies on
  a rounding boundary may round the other way. A mismatch counts as a tie when PyTorch's sum, in
  float64 and in code units, lies within 1e-4 of a ``.5`` boundary (both float32 evaluations are
  within 2e-5 code units of the exact sum at codes <= 255) and the two codes differ by one.
"""
from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

from gdrq_lightning.export import optimized_op_counts, run_onnxruntime, simulate_deploy, to_onnx

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


LAYOUT_OPS = ("Transpose", "ReorderInput", "ReorderOutput")


def _module_path(node_name: str) -> str:
    """``/layer1/layer1.0/downsample/downsample.0/output_act/QuantizeLinear`` ->
    ``layer1.0.downsample.0.output_act``: the exporter's scopes name a Sequential's child ``<attr>.<index>``."""
    parts: list[str] = []
    for part in node_name.strip("/").split("/")[:-1]:
        if parts and part.startswith(parts[-1] + "."):
            parts[-1] = part
        else:
            parts.append(part)
    return ".".join(parts)


def kernel_outputs(path: Path, x: torch.Tensor, tmp: Path) -> dict[str, tuple[str, torch.Tensor]]:
    """Module path -> (the op that wrote it in ORT's optimized graph, uint8 codes) for every ``QuantizeLinear``."""
    model = onnx.load(str(path))
    quantized = {n.output[0]: _module_path(n.name) for n in model.graph.node if n.op_type == "QuantizeLinear"}
    for name in quantized:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.UINT8, None))
    extended, optimized = tmp / "extended.onnx", tmp / "optimized.onnx"
    onnx.save(model, str(extended))
    options = ort.SessionOptions()  # the defaults, plus where to save the graph it runs
    options.optimized_model_filepath = str(optimized)
    session = ort.InferenceSession(str(extended), options, providers=["CPUExecutionProvider"])
    names = list(quantized)
    values = session.run(names, {"input": x.numpy()})
    producer = {o: n for n in onnx.load(str(optimized)).graph.node for o in n.output}

    def origin(name: str) -> str:  # through the layout changes ORT adds around NHWC kernels
        node = producer[name]
        return origin(node.input[0]) if node.op_type in LAYOUT_OPS else node.op_type

    return {quantized[n]: (origin(n), torch.from_numpy(v.astype("int64"))) for n, v in zip(names, values)}


def deploy_codes(model: nn.Module, x: torch.Tensor, paths: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module path -> (uint8 codes the PyTorch deploy form computes there, the pre-rounding value in code units)."""
    found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = []
    for path in paths:
        own_grid = path.endswith(".output_act")
        module = model.get_submodule(path.removesuffix(".output_act"))
        d = module.deploy
        scale, zero = (d.out_scale, d._zero) if own_grid else (d.scale.reshape(()), 0 if d._range[0] >= 0 else 128)

        def hook(_m, args, out, path=path, scale=scale, zero=zero):  # noqa: ANN001, ANN202
            exact = args[0].double() / scale.double() + zero  # an activation's input: PyTorch's float sum
            found[path] = (torch.round(out.double() / scale.double()).long() + zero, exact)

        hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return found


def _vnni() -> bool:
    """8-bit activations times 8-bit weights: ORT's u8s8 kernels saturate int16 pair sums without VNNI."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


BITS = {"w4a4": 4, "w8a8": 8}  # w8a8: sums pass 2^24 in float32, so the deploy form accumulates in float64


@pytest.fixture(scope="module", params=list(BITS))
def deployed(models, request) -> tuple[nn.Module, torch.Tensor]:
    bits = BITS[request.param]
    if bits == 8 and not _vnni():
        pytest.skip("8-bit activations: ORT's u8s8 kernels saturate without VNNI (its documented limit)")
    model = copy.deepcopy(models.resnet18(method="gdrq", weight_bits=bits, act_bits=bits, groups=4))
    gen = torch.Generator().manual_seed(5)
    simulate_deploy(model, [torch.randn(8, 3, 32, 32, generator=gen)])
    return model, torch.randn(8, 3, 32, 32, generator=gen)


def test_every_fused_kernel_writes_the_codes_of_the_pytorch_deploy_form(deployed, tmp_path) -> None:
    model, x = deployed
    path = to_onnx(model, x[:1], tmp_path / "r.onnx")
    outputs = kernel_outputs(path, x, tmp_path)
    ops = Counter(op for op, _ in outputs.values())
    # 19 integer convs (16 in blocks, 3 downsample) and 8 residual adds fused; the stem's quantizer (after the pool) alone
    assert ops == {"QLinearConv": 19, "QLinearAdd": 8, "QuantizeLinear": 1}
    assert optimized_op_counts(path)["QLinearConv"] == 19  # the file as written, without the extra outputs, too
    ours = deploy_codes(model, x, [p for p, (op, _) in outputs.items() if op != "QuantizeLinear"])
    conv_codes = ties = 0
    for p, (op, theirs) in outputs.items():
        if op == "QuantizeLinear":
            continue
        mine, exact = ours[p]
        wrong = mine != theirs
        if op == "QLinearConv":
            assert not wrong.any(), f"{p}: {int(wrong.sum())} of {wrong.numel()} codes differ"
            conv_codes += mine.numel()
        else:
            at_tie = (exact - exact.floor() - 0.5).abs() < 1e-4
            assert (wrong <= at_tie).all() and ((mine - theirs).abs() <= 1).all(), p
            ties += int(wrong.sum())
    assert conv_codes > 100_000 and ties <= 5  # measured: 0 ties on these images


def test_onnxruntime_reproduces_the_deploy_form_s_logits(deployed, tmp_path) -> None:
    model, x = deployed
    path = to_onnx(model, x[:1], tmp_path / "r.onnx")
    with torch.no_grad():
        expected = model.eval()(x)
    got = run_onnxruntime(path, x)  # ORT's default session
    error = (got - expected).abs().amax(1) / expected.abs().amax(1)
    assert float(error.max()) <= 1e-5  # float rounding of the float stem and classifier only (measured 2.8e-7)


def test_onnxruntime_requantizes_with_the_deploy_forms_multiplier(tmp_path) -> None:
    """A QDQ conv on zero inputs, so each channel's output is its int32 bias alone: ``round(b · M)``.
    The biases are picked where the float32 multipliers one might write round differently, so
    ORT's own kernel tells them apart: it uses the deploy form's, ``f32(f32(s_x · s_w) / s_y)``."""
    from onnx import TensorProto, helper, numpy_helper

    from gdrq_lightning.quant.deploy import requant_multiplier

    gen = torch.Generator().manual_seed(0)
    channels, s_x, s_y = 64, torch.tensor(0.0371), torch.tensor(0.9137)
    s_w = torch.empty(channels).uniform_(1e-3, 1e-2, generator=gen)
    lattice = s_x * s_w
    ours = requant_multiplier(lattice, s_y)
    others = [s_x * (s_w / s_y), lattice * (1 / s_y)]  # the same number in exact arithmetic
    candidates = torch.arange(1, 2**20, dtype=torch.float32)
    bias = torch.zeros(channels, dtype=torch.int32)
    for c in range(channels):
        u = candidates * ours[c]
        apart = (u < 254) & torch.stack([torch.round(candidates * m[c]) != torch.round(u) for m in others]).any(0)
        bias[c] = int(candidates[apart][0]) if apart.any() else int(candidates[c])
    weights = torch.randint(-127, 128, (channels, 4, 1, 1), generator=gen, dtype=torch.int8)
    inits = [numpy_helper.from_array(t.numpy(), n) for n, t in {
        "sx": s_x, "zx": torch.tensor(0, dtype=torch.uint8), "w": weights, "sw": s_w, "b": bias, "sb": lattice,
        "sy": s_y, "zy": torch.tensor(0, dtype=torch.uint8)}.items()]
    nodes = [helper.make_node("DequantizeLinear", ["x", "sx", "zx"], ["xf"]),
             helper.make_node("DequantizeLinear", ["w", "sw"], ["wf"], axis=0),
             helper.make_node("DequantizeLinear", ["b", "sb"], ["bf"], axis=0),
             helper.make_node("Conv", ["xf", "wf", "bf"], ["yf"]), helper.make_node("QuantizeLinear", ["yf", "sy", "zy"], ["y"])]
    graph = helper.make_graph(nodes, "requant", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 4, 1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "q.onnx"))
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), options, providers=["CPUExecutionProvider"])
    assert "QLinearConv" in {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    got = torch.from_numpy(session.run(None, {"x": torch.zeros(1, 4, 1, 1, dtype=torch.uint8).numpy()})[0]).reshape(-1).long()
    codes = lambda m: torch.clamp(torch.round(bias.float() * m), 0, 255).long()  # noqa: E731
    assert torch.equal(codes(ours), got)
    assert [int((codes(m) != got).sum()) for m in others] == [22, 15]  # of 64 channels: either would be caught
