"""Every task test runs offline and with empty caches of its own.

Sockets may reach only this machine (loopback: the DDP tests' rendezvous), the Hugging Face
hub is in offline mode, and torch hub, the Hugging Face hub and the COCO annotation cache
point at empty temporary folders, so a download attempt or a machine's cached weights can
never make a test pass.
"""
from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _guarded(connect):
    def connect_locally(sock: socket.socket, address, *args, **kwargs):
        host = address[0] if isinstance(address, tuple) else address
        if sock.family in (socket.AF_INET, socket.AF_INET6) and host not in LOOPBACK:
            raise OSError(f"network access in a test: {address}")
        return connect(sock, address, *args, **kwargs)

    return connect_locally


def _local_lookup(getaddrinfo):
    def lookup(host, *args, **kwargs):
        if host not in LOOPBACK and host not in (None, "", socket.gethostname()):
            raise OSError(f"name lookup in a test: {host}")
        return getaddrinfo(host, *args, **kwargs)

    return lookup


@pytest.fixture(scope="session")
def offline_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("offline")
    return {name: root / name for name in ("torch_hub", "hf_hub", "gdrq")}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, offline_dirs: dict[str, Path]) -> Iterator[None]:
    from huggingface_hub import constants

    monkeypatch.setattr(socket.socket, "connect", _guarded(socket.socket.connect))
    monkeypatch.setattr(socket, "getaddrinfo", _local_lookup(socket.getaddrinfo))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(offline_dirs["hf_hub"]))
    monkeypatch.setenv("GDRQ_CACHE", str(offline_dirs["gdrq"]))
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(offline_dirs["torch_hub"]))
    yield
    torch.hub.set_dir(previous)
