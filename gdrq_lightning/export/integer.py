"""The integer model file: packed codes plus everything else of the folded model.

On-disk format (``torch.save`` of plain containers, so ``torch.load(path,
weights_only=True)`` reads it)::

    {"format": "gdrq-integer", "version": 1,
     "state_dict": {...},   # the folded model's state_dict; "<layer>.codes" packed
     "layers": {"<layer>": {"kind", "method", "bits", "groups", "encoding",
                            "folded_into", "shape", "dtype", "width"}}}

A ``b``-bit code tensor is stored in a container of ``width`` bits, the smallest of
1, 2, 4, 8 holding ``b``; ``8 // width`` codes share a byte, first code in the low
bits (so 3-4 bit weights pack two per byte as nibbles). ``encoding="signed"`` codes
in ``[-n, n]`` are stored two's complement; ``"odd"`` codes ``Z = 2k - n`` (binary,
weights without a zero level) are stored as ``k`` in ``[0, 2**b - 1]``. :func:`load_integer` undoes it,
giving a state_dict for ``fold_groups_into_bn(quantize_model(build(), cfg))``.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .fold import fold_groups_into_bn
from .layers import INTEGER_LAYER_TYPES

FORMAT, VERSION = "gdrq-integer", 1


def container_width(bits: int) -> int:
    """Bits per stored code: 1, 2, 4 or 8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} is out of range (allowed: 1..8)")
    return next(w for w in (1, 2, 4, 8) if w >= bits)


def pack_bits(values: Tensor, width: int) -> Tensor:
    """Pack unsigned ``values < 2**width`` (any shape) into a flat uint8 tensor, low bits first."""
    flat = values.reshape(-1).to(torch.int32)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << width):
        raise ValueError(f"values in [{int(flat.min())}, {int(flat.max())}] do not fit {width} unsigned bits")
    if width == 8:
        return flat.to(torch.uint8)
    per_byte = 8 // width
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % per_byte)]).reshape(-1, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int32) * width
    return (flat << shifts).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: Tensor, width: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` unsigned values as uint8."""
    if width == 8:
        return packed.reshape(-1)[:numel].to(torch.uint8)
    per_byte = 8 // width
    shifts = torch.arange(per_byte, dtype=torch.int32) * width
    values = (packed.to(torch.int32).reshape(-1, 1) >> shifts) & ((1 << width) - 1)
    return values.reshape(-1)[:numel].to(torch.uint8)


def encode_codes(codes: Tensor, bits: int, encoding: str) -> Tensor:
    """Integer codes -> packed uint8 (or int8 for 8-bit signed codes)."""
    width = container_width(bits)
    z = codes.to(torch.int32)
    if encoding == "odd":
        u = (z + (2**bits - 1)) // 2
    elif encoding == "signed":
        if width == 8:
            return z.to(torch.int8).reshape(-1)
        u = z & ((1 << width) - 1)
    else:
        raise ValueError(f"unknown code encoding {encoding!r} (known: signed, odd)")
    return pack_bits(u, width)


def decode_codes(stored: Tensor, meta: dict[str, Any]) -> Tensor:
    """Stored codes + layer metadata -> codes shaped and typed as in the folded model."""
    bits, shape = int(meta["bits"]), [int(s) for s in meta["shape"]]
    width, numel = container_width(bits), int(torch.Size(shape).numel())
    if meta["encoding"] == "signed" and width == 8:
        z = stored.reshape(-1)[:numel].to(torch.int32)
    else:
        u = unpack_bits(stored, width, numel).to(torch.int32)
        if meta["encoding"] == "odd":
            z = 2 * u - (2**bits - 1)
        else:
            z = torch.where(u >= 1 << (width - 1), u - (1 << width), u)
    return z.reshape(shape).to(getattr(torch, meta["dtype"]))


def tensor_bytes(state: dict[str, Any]) -> int:
    """Bytes of all tensors in a (nested) state dict."""
    return sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, Tensor))


def fp32_bytes(model: nn.Module) -> int:
    """Size of the model's weights as an FP32 checkpoint (floating tensors at 4 bytes each)."""
    return sum(v.numel() * 4 for v in model.state_dict().values() if v.is_floating_point())


def integer_payload(folded: nn.Module) -> dict[str, Any]:
    """The on-disk dict (see module docstring) of a folded model."""
    state = {k: v.detach().clone() for k, v in folded.state_dict().items()}
    layers: dict[str, Any] = {}
    for name, layer in folded.named_modules():
        if isinstance(layer, INTEGER_LAYER_TYPES):
            meta = layer.meta()
            meta["width"] = container_width(layer.bits)
            state[f"{name}.codes"] = encode_codes(layer.codes, layer.bits, layer.encoding)
            layers[name] = meta
    return {"format": FORMAT, "version": VERSION, "state_dict": state, "layers": layers}


def save_integer(folded: nn.Module, path: str | os.PathLike) -> dict[str, int]:
    """Write the integer model file; returns ``{"payload_bytes", "file_bytes"}``."""
    payload = integer_payload(folded)
    torch.save(payload, path)
    return {"payload_bytes": tensor_bytes(payload["state_dict"]), "file_bytes": Path(path).stat().st_size}


def load_integer(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read an integer model file (``weights_only``) and return the unpacked state_dict.

    Raises:
        ValueError: the file is not a ``gdrq-integer`` file of a known version.
    """
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or payload.get("version") != VERSION:
        raise ValueError(f"{path}: not a {FORMAT} v{VERSION} file")
    state = dict(payload["state_dict"])
    for name, meta in payload["layers"].items():
        state[f"{name}.codes"] = decode_codes(state[f"{name}.codes"], meta)
    return state


def to_integer(model: nn.Module, path: str | os.PathLike | None = None, *, inplace: bool = False) -> nn.Module:
    """The model with integer-code weights (int8 buffers, steps folded into BNs), optionally saved.

    Args:
        model: a fake-quant model (folded by :func:`fold_groups_into_bn` first) or an
            already folded one.
        path: where to write the packed integer file (format in the module docstring).
        inplace: fold ``model`` itself instead of a copy.
    """
    if any(isinstance(m, INTEGER_LAYER_TYPES) for m in model.modules()):
        folded = model if inplace else copy.deepcopy(model)
    else:
        folded = fold_groups_into_bn(model, inplace=inplace)
    if path is not None:
        save_integer(folded, path)
    return folded
