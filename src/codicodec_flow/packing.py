"""Packed fp32 weights for generation on an x86 CPU: the same products, laid out once for MKL.

A cached pass multiplies 8 tokens (per stream) by every weight matrix once: each product is a
matrix-vector-like GEMM whose cost is how fast the kernel streams the weight. Intel MKL can re-lay a
weight matrix out once for a given number of rows (`cblas_sgemm_pack`) and then multiply against it
without the per-call re-blocking of a plain GEMM. PyTorch ships that pair as
`torch.ops.mkl._mkl_reorder_linear_weight` / `torch.ops.mkl._mkl_linear` (inductor's weight freezing
uses them). Measured on a 2-core Xeon, ten default-size Linear(768, 3456) at 8 rows: 8.6 ms plain,
5.7 ms packed; at 16-128 rows 1.3x; same float32 arithmetic, differences at the last bit (~1e-6).
Within a whole cached pass the gain held for the default model (dim 768) and not for the small one
(dim 384, where the weights are small next to the element-wise work), so only models of dim >=
MIN_PACKED_DIM are packed.

A pack is made for one row count: a PackedLinear packs lazily, per row count it meets a second time
(a prompt's one-off prefill stays plain), up to MAX_PACKS of them; other row counts run the plain
product. A StreamGenerator packs its steady passes' row counts when it is made (the new chunk alone,
and with the finished chunk that joins the cache in the same pass), so a live stream never stops to
pack. Each pack is a copy of the weight, so the default model holds ~250 MB more per row count. A
pack remembers the weight's version and is remade if the weight changes in place (a training step),
so it can never compute with stale weights. Where the build has no MKL (ARM, Apple silicon) or the
device is not the CPU, nothing is packed.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

MAX_PACKS = 3  # row counts packed per layer; more would each cost a copy of the weights
# Packing pays for wide models only: within a whole cached pass on the 2-core Xeon (interleaved, euler NFE 4/8,
# 32-chunk context) the default model (dim 768) ran 1.21-1.27x faster packed, the small one (dim 384) 0.95x.
MIN_PACKED_DIM = 512


def packing_available(device) -> bool:
    """Whether MKL's packed products exist for `device` in this PyTorch build."""
    if torch.device(device).type != "cpu" or not torch.backends.mkl.is_available():
        return False
    try:
        return hasattr(torch.ops.mkl, "_mkl_linear") and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")
    except RuntimeError:  # an op namespace this build never registered
        return False


def _cpu_autocast() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


class PackedLinear(nn.Module):
    """An nn.Linear (sharing its weight and bias) that multiplies through MKL-packed copies of the weight."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias  # shared with the original: no copy
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._packs: dict[int, tuple[int, torch.Tensor]] = {}  # rows -> (weight version, packed weight)
        self._seen: dict[int, int] = {}  # rows -> passes so far without a pack

    def prepack(self, rows: int) -> None:
        """Pack for `rows` now (if there is room), so the first pass with that many rows does not pay for it."""
        if rows not in self._packs and len(self._packs) < MAX_PACKS:
            self._make(rows)

    def _pack(self, rows: int) -> torch.Tensor | None:
        """The pack for `rows`: kept, remade if the weight changed, made on the count's second pass, or None."""
        held = self._packs.get(rows)
        if held is not None:
            return held[1] if held[0] == self.weight._version else self._make(rows)
        self._seen[rows] = self._seen.get(rows, 0) + 1
        if self._seen[rows] < 2 or len(self._packs) >= MAX_PACKS:
            return None  # a one-off pass (a prompt's prefill) is not worth a copy of the weights
        return self._make(rows)

    def _make(self, rows: int) -> torch.Tensor:
        with torch.no_grad():
            packed = torch.ops.mkl._mkl_reorder_linear_weight(self.weight.detach(), rows)
        self._packs[rows] = (self.weight._version, packed)
        return packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        plain = (x.dtype != torch.float32 or self.weight.dtype != torch.float32 or torch.is_grad_enabled()
                 or _cpu_autocast())  # packs are float32 products without gradients
        packed = None if plain else self._pack(rows)
        if packed is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkl._mkl_linear(x, packed, self.weight, self.bias, rows)

    def __deepcopy__(self, memo) -> "PackedLinear":
        """A copy with the weight and bias deep-copied as `memo` says (packed_copy shares them), without the
        packs: MKL's packed tensors cannot be copied, and a copy remakes them when it first runs."""
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        plain.weight = copy.deepcopy(self.weight, memo)
        if self.bias is not None:
            plain.bias = copy.deepcopy(self.bias, memo)
        return PackedLinear(plain)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed rows={sorted(self._packs)}"


def is_packed(model: nn.Module) -> bool:
    """Whether `model` multiplies through packed weights (for reports: bench says which path it timed)."""
    return any(isinstance(m, PackedLinear) for m in model.modules())


def prepack(model: nn.Module, rows: list[int]) -> None:
    """Pack every PackedLinear of `model` for these row counts ahead of time (a stream's steady passes), so no
    pass of a live stream stops to pack (~80 ms per row count for the default model on a 2-core Xeon)."""
    for m in model.modules():
        if isinstance(m, PackedLinear):
            for r in rows:
                m.prepack(r)


def packed_copy(model: nn.Module, names: list[str]) -> nn.Module:
    """A copy of `model` sharing every parameter and buffer, whose linear layers `names` are PackedLinear."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    out = copy.deepcopy(model, memo)  # new module objects, the same tensors
    for name in names:
        parent, _, leaf = name.rpartition(".")
        setattr(out.get_submodule(parent), leaf, PackedLinear(out.get_submodule(name)))
    return out
