"""The one way every task reads starting weights: a local file, or published weights by name.

A file is a plain ``state_dict`` of the network, or a Lightning checkpoint of a task
module, whose network entries are the ``model.*`` keys of its ``state_dict``. Quantizer
entries (``*_quantizer.*``) are ignored on both sides: starting weights are float
weights, and a quantized model's quantizer state starts fresh (resume a quantized run
with ``ckpt_path`` instead). The name ``imagenet`` instead of a path means published
ImageNet weights, downloaded once into the torch hub / Hugging Face cache (:mod:`tasks.hub`).
"""
from __future__ import annotations

import pickle
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from .hub import is_named, named_weights

KeyMap = Callable[[str], str | None]
Source = str | Path | Mapping[str, Tensor]


def resolve(spec: str, model: str, *, what: str = "pretrained") -> Source:
    """``spec`` as :func:`load_weights` reads it: a local path, or ``imagenet`` -> the weights of ``model``
    (a torchvision name or ``timm/<name>``), fetched into the hub cache if needed."""
    return named_weights(model, what=what) if is_named(spec) else spec


def read_state_dict(path: str | Path, what: str = "pretrained") -> dict[str, Tensor]:
    """The network tensors stored in ``path`` (``torch.load(weights_only=True)``).

    Args:
        path: a plain state dict, or a Lightning checkpoint (its ``model.`` prefix is removed).
        what: the option that named the file, for error messages (``pretrained_backbone`` ...).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: unreadable file, or not a state dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} weights file not found: {path} (local files only, nothing is downloaded)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as e:
        raise ValueError(f"{what} weights file {path} is truncated or not a PyTorch file ({str(e).splitlines()[0]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # a Lightning checkpoint
        state = {k[len("model."):]: v for k, v in state["state_dict"].items() if k.startswith("model.")}
        if not state:
            raise ValueError(f"{what} checkpoint {path} has no 'model.*' weights: not a checkpoint of a gdrq task module")
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{what} weights file {path} does not hold a state dict of tensors (got {type(state).__name__})")
    return state


def load_weights(
    net: nn.Module,
    path: Source,
    *,
    what: str = "pretrained",
    target: str = "the model",
    key_map: KeyMap | None = None,
    skip_mismatched: bool = False,
) -> None:
    """Load the float weights in ``path`` into ``net`` (quantized or not).

    Args:
        net: the network (or sub-network, e.g. a backbone) to load into.
        path: see :func:`read_state_dict`, or a state dict (e.g. from :func:`resolve`).
        what: the option that named the file, for messages.
        target: what ``net`` is, for messages (e.g. ``"fcn_resnet18 with num_classes=3"``).
        key_map: maps a file key to a key of ``net``, or None to drop it (e.g. a
            torchvision classifier's ``fc.*`` when loading a backbone).
        skip_mismatched: load the tensors whose name and shape fit, warn about the rest
            (fine-tuning to another number of classes); by default every tensor must fit.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: unreadable file, or weights that do not fit ``net`` (names the file).
    """
    if isinstance(path, Mapping):
        state, path = dict(path), "(downloaded ImageNet weights)"
    else:
        state = read_state_dict(path, what)
    if key_map is not None:
        state = {new: v for k, v in state.items() if (new := key_map(k)) is not None}
    state = {k: v for k, v in state.items() if "_quantizer." not in k}
    own = {k: v for k, v in net.state_dict().items() if "_quantizer." not in k}
    fits = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if skip_mismatched:
        skipped = sorted(set(state) - set(fits))
        if not fits:
            raise ValueError(f"{what} file {path} shares no tensor names/shapes with {target}")
        if skipped:
            warnings.warn(f"{what}: skipped {len(skipped)} tensors with other names or shapes, e.g. {skipped[:3]}", stacklevel=2)
    else:
        # BN counters may be absent (old torchvision files) or extra (FrozenBatchNorm2d has none)
        missing = sorted(k for k in own if k not in state and not k.endswith("num_batches_tracked"))
        unexpected = sorted(k for k in state if k not in own and not k.endswith("num_batches_tracked"))
        shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(state) if k in own and k not in fits]
        if missing or unexpected or shapes:
            raise ValueError(
                f"{what} {path} does not match {target}: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                f"shape mismatch {shapes[:3]}"
            )
    net.load_state_dict(fits, strict=False)
