"""Device and dtype choice shared by every command."""
from __future__ import annotations

import torch

from .errors import FlowError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str = "auto") -> torch.device:
    """Map --device to a torch.device, refusing a backend this machine lacks."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FlowError("--device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu or auto")
    if name == "mps" and not mps_available():
        raise FlowError("--device mps was asked for but this PyTorch build has no MPS; use --device cpu or auto")
    if name not in DEVICE_CHOICES:
        raise FlowError(f"unknown device {name!r}: choose one of {', '.join(DEVICE_CHOICES)}")
    return torch.device(name)


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())
