"""Rotary position embedding: attention scores depend only on token offsets, so cached keys rotated once at
their own position stay valid for every later query."""
from __future__ import annotations

import torch


def rope_table(positions: torch.Tensor, head_dim: int, base: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation tables (L, head_dim) on `device` for integer positions, computed in float64 so that a position
    of millions (hours of stream) is as exact as position 0.

    Pairs of channels (2i, 2i + 1) turn by the same angle; the sine table carries the sign of each member
    (-sin for the even one, +sin for the odd one), so `apply_rope` is two products and a pair swap.
    """
    inv = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (hd/2,)
    angles = positions.detach().cpu().double()[:, None] * inv  # (L, hd/2)
    cos = torch.cos(angles).repeat_interleave(2, dim=-1)  # (L, hd): c0 c0 c1 c1 ...
    sin = torch.stack([-torch.sin(angles), torch.sin(angles)], dim=-1).flatten(-2)  # (L, hd): -s0 s0 -s1 s1 ...
    return cos.float().to(device), sin.float().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (even, odd) of x (..., L, hd) by tables from rope_table, broadcastable to (..., L, hd)."""
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (..., L, hd): x1 x0 x3 x2 ...
    return torch.addcmul(x * cos, swapped, sin).to(x.dtype)  # even: x0 c - x1 s; odd: x1 c + x0 s
