"""Pretrained weights by name: ``imagenet`` instead of a file path.

``pretrained_backbone: imagenet`` (and a classifier's ``pretrained: imagenet``) means the
network's published ImageNet weights: torchvision's ``DEFAULT`` weight enum for torchvision
models, timm's default pretrained tag for ``timm/<name>`` models. They are downloaded when
the network is reachable and cached where torch hub (``$TORCH_HOME/hub/checkpoints``) or the
Hugging Face hub (``$HF_HOME/hub``) keep them; later runs read the cache. Without a network
and without the file, the error is one line that says where to put it.

Resolution only finds the weights; they still load in the task's ``load_pretrained()``
(``setup``) through :func:`tasks.weights.load_weights`, like a local file.
"""
from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor

IMAGENET = "imagenet"
TIMM_PREFIX = "timm/"


class PretrainedUnavailable(FileNotFoundError):
    """Named pretrained weights could not be fetched (offline, or no such weights); says where to put them."""


def is_named(spec: str | None) -> bool:
    """Whether ``spec`` names published weights (``imagenet``) rather than a local file."""
    return spec == IMAGENET


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def torchvision_weights_file(model: str, *, what: str = "pretrained_backbone") -> Path:
    """The cached file of torchvision's ``DEFAULT`` ImageNet weights of ``model``, downloaded if absent.

    Raises:
        ValueError: torchvision has no weights for ``model``.
        PretrainedUnavailable: not cached and the download failed (the message names the cache path).
    """
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(model).DEFAULT
    except (ValueError, KeyError):
        raise ValueError(f"{what}=imagenet: torchvision has no pretrained weights for {model!r}") from None
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(weights.url, str(path), progress=False)
    except Exception as e:  # offline (URLError), HTTP errors, interrupted or corrupt downloads
        raise PretrainedUnavailable(
            f"{what}=imagenet: cannot download torchvision's {model} ImageNet weights from {weights.url} "
            f"({_reason(e)}); offline? put that file at {path} (torch hub cache; TORCH_HOME moves it)"
        ) from None
    return path


def timm_state_dict(name: str, *, what: str = "pretrained_backbone") -> dict[str, Tensor]:
    """The state dict of timm's default pretrained weights of ``name`` (a plain timm model, with its head).

    Raises:
        ValueError: unknown timm model name.
        PretrainedUnavailable: not cached and the download failed (the message names the cache folder).
    """
    import timm

    if not timm.is_model(name):
        raise ValueError(f"{what}=imagenet: unknown timm model {name!r}; see timm.list_models()")
    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as e:  # offline (hub or URL), or no pretrained tag for this model
        cfg = timm.models.get_pretrained_cfg(name)
        source = getattr(cfg, "hf_hub_id", None) or getattr(cfg, "url", None) or "no published weights"
        raise PretrainedUnavailable(
            f"{what}=imagenet: cannot get timm's pretrained weights of {name} ({source}; {_reason(e)}); offline? "
            f"run once with network access or copy the cache to {_timm_cache(cfg)}"
        ) from None
    return model.state_dict()


def _timm_cache(cfg: object) -> str:
    if getattr(cfg, "hf_hub_id", None):
        from huggingface_hub import constants

        return f"{constants.HF_HUB_CACHE} (Hugging Face hub cache; HF_HOME moves it)"
    return f"{Path(torch.hub.get_dir()) / 'checkpoints'} (torch hub cache; TORCH_HOME moves it)"


def classifier_label(model: str) -> str:
    """``torchvision's resnet18`` / ``timm's resnet18``, for messages."""
    return f"timm's {model[len(TIMM_PREFIX):]}" if model.startswith(TIMM_PREFIX) else f"torchvision's {model}"


def named_weights(model: str, *, what: str = "pretrained_backbone") -> Path | dict[str, Tensor]:
    """ImageNet weights of a torchvision model name or ``timm/<name>``: a cached file or a state dict."""
    if model.startswith(TIMM_PREFIX):
        return timm_state_dict(model[len(TIMM_PREFIX):], what=what)
    return torchvision_weights_file(model, what=what)
