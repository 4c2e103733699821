"""Device and dtype choice shared by every command."""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

import torch

from ..errors import FlowError

log = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str = "auto") -> torch.device:
    """Map --device to a torch.device, refusing a backend this machine lacks."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FlowError("--device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu or auto")
    if name == "mps" and not mps_available():
        raise FlowError("--device mps was asked for but this PyTorch build has no MPS; use --device cpu or auto")
    if name.split(":")[0] not in DEVICE_CHOICES:
        raise FlowError(f"unknown device {name!r}: choose one of {', '.join(DEVICE_CHOICES)}")
    return torch.device(name)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor (noise drawn on the host) on `device`, without making the host wait for the device.

    A copy from ordinary (pageable) memory to a CUDA GPU first waits for the GPU's queue to empty: drawn after a
    chunk's graph was launched, the next noise would wait for that graph. From pinned memory the copy only joins the
    queue (PyTorch's pinned-memory cache keeps the buffer until the copy is done)."""
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype for --dtype on this device (None: plain fp32)."""
    if name == "fp32":
        return None
    if name not in ("auto", "bf16"):
        raise FlowError(f"unknown --dtype {name!r}: choose auto, bf16 or fp32")
    if name == "auto" and device.type == "cpu":
        return None  # bf16 autocast is slower than fp32 on most CPUs
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
        log.warning("this GPU has no native bf16 (before Ampere, e.g. a T4); using fp32")
        return None
    try:  # MPS gained bf16 autocast in recent PyTorch; probe instead of guessing from the version
        with torch.autocast(device.type, dtype=torch.bfloat16):
            (torch.ones(8, 8, device=device) @ torch.ones(8, 8, device=device)).sum().item()
    except Exception:
        log.warning(f"bf16 autocast is not available on {device} with torch {torch.__version__}; using fp32")
        return None
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """An autocast context for dtype, or a no-op for fp32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def flush_denormals() -> bool:
    """Treat subnormal floats (below 1.2e-38 in float32) as zero on the CPU, as audio software does; returns whether
    this CPU can (torch.set_flush_denormal: flush-to-zero and denormals-are-zero).

    An arithmetic operation that meets a subnormal operand or result takes a slow microcoded path. A fresh model
    meets them: adaLN-Zero starts its modulations at zero, so in the first steps one 256 x 2304 x 384 product of the
    small model's backward took 96 ms instead of 2 (bench, 2-core Xeon: the step 1.9 s, flushed 1.1 s). Values that
    small carry nothing a float32 network can use.
    """
    return torch.set_flush_denormal(True)


def live_threads() -> int:
    """torch's intra-op threads for live generation: half the CPU cores this process may use, 1 to 4.

    A live chunk is hundreds of small operators over 8 tokens, each ending at a barrier where every
    thread waits for the slowest. Beside a DAW or a synth that keeps cores busy, a descheduled thread
    stalls every operator (on 2 cores with one busy, 2 threads ran ~3x slower than 1), so half the
    cores are left to the other programs; more than 4 have little to split in 8 tokens.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores // 2))


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[int]:
    """Run the block with torch's intra-op thread count at n (None: as it is), restored afterwards; yields it."""
    before = torch.get_num_threads()
    if n is None:
        yield before
        return
    if n < 1:
        raise FlowError(f"--threads must be at least 1, got {n}")
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)
