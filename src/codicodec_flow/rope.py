"""Rotary position embedding: attention scores depend only on token offsets, which lets the cache
use window-relative positions that stay small however long a stream runs."""
from __future__ import annotations

import torch


def rope_table(positions: torch.Tensor, head_dim: int, base: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (L, head_dim/2) on `device` for integer CPU positions, computed in float64 for accuracy."""
    inv = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (hd/2,)
    angles = positions.detach().cpu().double()[:, None] * inv  # (L, hd/2)
    return torch.cos(angles).float().to(device), torch.sin(angles).float().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (even, odd) of x (..., L, hd) by the angles of tables broadcastable to (..., L, hd/2)."""
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (..., L, hd/2, 2)
    return out.flatten(-2).to(x.dtype)
