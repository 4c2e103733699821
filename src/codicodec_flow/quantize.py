"""Reduced-precision weights for generation: the transformer's linear layers as 8-bit integers on the CPU.

A cached pass evaluates only 8 tokens, so it reads every weight once for very little arithmetic: its
cost is memory traffic and the matrix kernels' efficiency at 8 rows. int8 weights with one scale per
output channel quarter the bytes, and PyTorch's dynamic quantization (fbgemm/x86 or qnnpack kernels)
quantizes each pass's activations on the fly, so the matrix products run in integer arithmetic.
Measured on a 2-core Xeon, one default-size Linear(768, 3456) at 8 tokens: fp32 682 us, int8 127 us.
bf16 has no fast kernels on such CPUs, and torchao's int8 paths were slower than fp32 there without
torch.compile, so this uses `torch.ao.quantization.quantize_dynamic`, deprecated but still shipped
and the fast path measured; on CUDA and MPS use their half-precision autocast instead.

What stays float: the input and output projections (64 channels in and out: precision where the
latents are read and written) and the time embedding and adaLN projections (their outputs are
computed once per time value and kept, so their bytes are not read per pass).
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn

from .errors import FlowError
from .model import FlowDiT
from .packing import MIN_PACKED_DIM, packed_copy, packing_available


def streamed_linears(model: FlowDiT) -> list[str]:
    """Names of the linear layers a cached pass reads per evaluation: attention and MLP of every block."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.startswith("blocks.") and ".ada." not in name]


def for_generation(model: FlowDiT, precision: str, device, pack: bool = True) -> FlowDiT:
    """`model` as generation runs it (the original is untouched): fp32 on an x86 CPU a copy sharing its weights
    whose streamed layers multiply through MKL-packed copies when the model is wide enough to gain (packing.py;
    pack=False, narrower models or elsewhere: the model itself), int8 a quantized copy."""
    if precision == "fp32":
        worth = pack and model.cfg.dim >= MIN_PACKED_DIM and packing_available(device)
        return packed_copy(model, streamed_linears(model)) if worth else model
    if precision != "int8":
        raise FlowError(f"unknown precision {precision!r}: use fp32 or int8")
    if torch.device(device).type != "cpu":
        raise FlowError(f"--precision int8 runs on the CPU only (asked for {device}); on CUDA or MPS the "
                        "half-precision autocast these devices use by default is their fast path")
    engines = torch.backends.quantized.supported_engines
    if not any(e in engines for e in ("x86", "fbgemm", "qnnpack")):
        raise FlowError(f"this PyTorch build has no int8 CPU kernels (engines: {engines}); use --precision fp32")
    qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
    spec = {name: qconfig for name in streamed_linears(model)}
    with warnings.catch_warnings():  # the eager API's deprecation notice: it is still the fast CPU path
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).cpu().eval(), spec, dtype=torch.qint8)
    return quantized
