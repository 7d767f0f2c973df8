"""Integer model file: bit packing round trip, weights_only loading, size vs FP32."""
from __future__ import annotations

import copy

import pytest
import torch

from gdrq_lightning.export import load_integer, pack_bits, to_integer, unpack_bits
from gdrq_lightning.export.integer import container_width, decode_codes, encode_codes, fp32_bytes, save_integer


@pytest.mark.parametrize("width", [1, 2, 4, 8])
@pytest.mark.parametrize("numel", [1, 7, 64])
def test_pack_bits_round_trip(width, numel):
    values = torch.randint(0, 2**width, (numel,), generator=torch.Generator().manual_seed(width))
    packed = pack_bits(values, width)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-numel * width // 8)
    torch.testing.assert_close(unpack_bits(packed, width, numel), values.to(torch.uint8), rtol=0, atol=0)


def test_nibbles_are_low_first():
    assert pack_bits(torch.tensor([1, 2, 15]), 4).tolist() == [0x21, 0x0F]
    with pytest.raises(ValueError, match="do not fit 4"):
        pack_bits(torch.tensor([16]), 4)


@pytest.mark.parametrize(
    ("bits", "encoding", "lo", "hi"),
    [(2, "signed", -1, 1), (3, "signed", -3, 3), (4, "signed", -7, 7), (8, "signed", -127, 127),
     (1, "odd", -1, 1), (4, "odd", -15, 15), (8, "odd", -255, 255)],
)
def test_code_round_trip(bits, encoding, lo, hi):
    """Signed codes as two's complement, odd codes 2k - n as k; DoReFa 8-bit (±255) fits uint8."""
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(lo, hi + 1, (5, 3, 3, 3), generator=gen)
    if encoding == "odd":
        codes = codes - (codes - lo) % 2  # same parity as n
    codes[0, 0, 0, :2] = torch.tensor([lo, hi])
    dtype = torch.int16 if hi > 127 else torch.int8
    stored = encode_codes(codes, bits, encoding)
    assert stored.element_size() == 1 and stored.numel() == -(-codes.numel() * container_width(bits) // 8)
    meta = {"bits": bits, "encoding": encoding, "shape": list(codes.shape), "dtype": str(dtype).replace("torch.", "")}
    decoded = decode_codes(stored, meta)
    assert decoded.dtype == dtype
    torch.testing.assert_close(decoded, codes.to(dtype), rtol=0, atol=0)


def test_integer_file_round_trip(models, tmp_path, capsys):
    ref = models.resnet18(method="gdrq", weight_bits=4, act_bits=4, groups=4)
    folded = to_integer(ref, tmp_path / "int.pt")
    payload = torch.load(tmp_path / "int.pt", weights_only=True)
    assert payload["format"] == "gdrq-integer" and payload["layers"]["layer1.0.conv1"]["folded_into"] == "layer1.0.bn1"
    assert payload["state_dict"]["layer1.0.conv1.codes"].numel() == 64 * 64 * 9 // 2  # nibbles
    # a skeleton of the same architecture (codes and BNs wiped here) takes the unpacked state dict
    skeleton = copy.deepcopy(folded)
    for tensor in skeleton.state_dict().values():
        tensor.zero_()
    skeleton.load_state_dict(load_integer(tmp_path / "int.pt"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(skeleton(x), folded(x), rtol=0, atol=0)
    sizes = save_integer(folded, tmp_path / "again.pt")
    ratio = fp32_bytes(ref) / sizes["payload_bytes"]
    with capsys.disabled():
        print(f"\nresnet18 W4 (first conv, fc float): fp32 {fp32_bytes(ref)} B, integer {sizes['payload_bytes']} B, "
              f"file {sizes['file_bytes']} B, ratio {ratio:.2f}x")
    assert 6.0 < ratio < 8.0  # 4-bit codes vs 32-bit floats, minus the float first conv, fc and BNs


def test_dorefa_8bit_codes(models, tmp_path):
    ref = models.tiny(method="dorefa", weight_bits=8, act_bits=4)
    folded = to_integer(ref, tmp_path / "d.pt")
    codes = folded.features[0].codes
    assert codes.dtype == torch.int16 and int(codes.abs().max()) > 127
    assert torch.load(tmp_path / "d.pt", weights_only=True)["state_dict"]["features.0.codes"].dtype == torch.uint8
    torch.testing.assert_close(load_integer(tmp_path / "d.pt")["features.0.codes"], codes, rtol=0, atol=0)


def test_not_an_integer_file(tmp_path):
    torch.save({"weight": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a gdrq-integer"):
        load_integer(tmp_path / "x.pt")
