"""The two-stream training layout, and attention over it that skips what its mask hides.

A training batch is one sequence of L' = (n + K) * 8 tokens: a clean stream of a crop's n chunks, then a
noisy stream of K of those chunks (all n, in order, unless `train --noisy-chunks` keeps fewer). Who sees whom:

    clean chunk j  -> clean chunks j-W..j
    noisy chunk i  -> clean chunks i-W..i-1 (none if it is unconditional) and itself
    a link to a padded chunk (not valid) is cut, except inside a chunk, so no token sees nothing

`TwoStreams.mask` writes this out as the dense (B, 1, L', L') boolean mask: the reference. Three quarters
of it are False for a 32-chunk crop at W = 32, and SDPA's CPU kernel computes the masked scores anyway
(with a mask or is_causal alike). `AttentionPlan` cuts the queries into blocks instead: the clean tokens
of S consecutive chunks together with the noisy tokens of those chunks. A block attends, in one SDPA
call, to the keys it can see and hardly more: the clean chunks from W before its first chunk to its
last, and its own noisy chunks, under the dense mask's rows and columns for them. Softmax normalises
each query over its own keys, and every key a query may see is in its block's set, so the result
equals the dense one while the scores computed fall to 44 % (32 chunks, S = 8). `FlexPlan` states the
same rule as a FlexAttention mask_mod. Which one runs is `TwoStreams.kernel`, by default the one
measured fastest on the device (KERNEL_AUTO).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

BLOCK_CHUNKS = 8  # clean chunks per query block: smaller blocks skip more, each SDPA call costs a fixed overhead;
#                  8 ran fastest of 4, 8, 16 for small at batch 4 x 256 on a 2-core CPU

# The kernel "auto" picks per device type; "blocks" where none is named. On an H200 (torch 2.11, small and default
# presets, batch 4 x 256 to 32 x 768, fp32 and bf16) the training step is bound by kernel launches, not arithmetic:
# one SDPA under the dense mask ran 1.0-1.6x faster than the blocks (their extra launches and small masks) and
# 2.1-2.4x faster than compiled FlexAttention (a block mask built per batch). On a CPU, whose SDPA kernel computes
# every masked score, the blocks win. MPS is not measured.
KERNEL_AUTO: dict[str, str] = {"cuda": "dense"}


def sees(lag: torch.Tensor, q_noisy: torch.Tensor, k_noisy: torch.Tensor, same_slot: torch.Tensor,
         key_valid: torch.Tensor, q_uncond: torch.Tensor, window: int) -> torch.Tensor:
    """The rule of the module docstring, element-wise (any broadcastable shapes): whether a query sees a key.

    lag: query chunk - key chunk; same_slot: both in the same noisy-stream chunk (meaningful for noisy keys);
    key_valid: the key's chunk holds data; q_uncond: the query's noisy chunk is unconditional.
    """
    clean_q = ~k_noisy & (lag >= 0) & (lag <= window) & (key_valid | (lag == 0))
    past = ~k_noisy & (lag >= 1) & (lag <= window) & key_valid & ~q_uncond
    return torch.where(q_noisy, past | (k_noisy & same_slot), clean_q)


@dataclass(frozen=True)
class TwoStreams:
    """The layout of a two-stream batch: everything its attention mask follows from, without the mask."""
    n_chunks: int  # n: chunks per crop (the clean stream)
    window: int  # W: past chunks a chunk sees
    chunk_tokens: int = 8
    valid: torch.Tensor | None = None  # (B, n) chunks holding data; None: all
    uncond: torch.Tensor | None = None  # (B, K) noisy-stream chunks that see no context; None: none
    kept: torch.Tensor | None = None  # (K,) CPU, ascending: the crop's chunks the noisy stream holds; None: all n
    block_chunks: int = BLOCK_CHUNKS  # S of the attention plan (it changes the speed, never the result)
    kernel: str = "auto"  # "blocks" (SDPA per query block), "flex" (FlexAttention), "dense" (one SDPA under the
    #                       dense mask); "auto": KERNEL_AUTO's choice for the device

    @property
    def noisy_chunks(self) -> torch.Tensor:
        """(K,) CPU: which chunk of the crop each noisy-stream chunk is."""
        return torch.arange(self.n_chunks) if self.kept is None else self.kept

    @property
    def tokens(self) -> int:
        return (self.n_chunks + len(self.noisy_chunks)) * self.chunk_tokens

    def positions(self) -> torch.Tensor:
        """(L',) CPU: every token's position in the crop (a noisy chunk sits where its clean twin does)."""
        chunks = torch.cat([torch.arange(self.n_chunks), self.noisy_chunks])
        return (chunks[:, None] * self.chunk_tokens + torch.arange(self.chunk_tokens)).flatten()

    def to(self, device) -> "TwoStreams":
        move = lambda x: None if x is None else x.to(device, non_blocking=True)  # noqa: E731
        return replace(self, valid=move(self.valid), uncond=move(self.uncond))

    def _device(self, device):
        if device is not None:
            return torch.device(device)
        held = self.valid if self.valid is not None else self.uncond
        return held.device if held is not None else torch.device("cpu")

    def _slots(self, device) -> "_Tokens":
        """Every token of the layout as (chunk, noisy, slot) rows; slot numbers the noisy chunks 0..K-1."""
        T, n, K = self.chunk_tokens, self.n_chunks, len(self.noisy_chunks)
        chunk = torch.cat([torch.arange(n), self.noisy_chunks]).repeat_interleave(T)
        noisy = torch.arange(n + K).repeat_interleave(T) >= n
        slot = (torch.arange(n + K) - n).clamp_min(0).repeat_interleave(T)
        return _Tokens(chunk.to(device), noisy.to(device), slot.to(device))

    def links(self, q: "_Tokens", k: "_Tokens") -> torch.Tensor:
        """(B|1, Q, Kk) bool: whether query token q[i] sees key token k[j] (`sees`, for every pair)."""
        yes = torch.ones((), dtype=torch.bool, device=q.chunk.device)
        key_valid = yes if self.valid is None else self.valid[:, k.chunk][:, None, :]  # (B, 1, Kk)
        q_uncond = ~yes if self.uncond is None else self.uncond[:, q.slot][:, :, None]  # (B, Q, 1)
        seen = sees(q.chunk[:, None] - k.chunk[None, :], q.noisy[:, None], k.noisy[None, :],
                    q.slot[:, None] == k.slot[None, :], key_valid, q_uncond, self.window)
        B = next((x.shape[0] for x in (self.valid, self.uncond) if x is not None), 1)
        return seen.expand(B, -1, -1)  # (B, Q, Kk)

    def mask(self, device=None) -> torch.Tensor:
        """The dense (B|1, 1, L', L') boolean mask of the layout, on `device` (default: where valid/uncond are)."""
        streams = self if device is None else self.to(device)
        tokens = streams._slots(streams._device(device))
        return streams.links(tokens, tokens)[:, None]

    def plan(self, device=None) -> "AttentionPlan | FlexPlan | torch.Tensor":
        """How the layers attend: built once per forward, used by every layer."""
        device = self._device(device)
        kernel = self.kernel if self.kernel != "auto" else KERNEL_AUTO.get(device.type, "blocks")
        if kernel == "dense":
            return self.mask(device)
        if kernel == "flex":
            if not flex_available():
                raise RuntimeError(f"FlexAttention needs torch >= 2.5, this is {torch.__version__}")
            return FlexPlan(self, device)
        return AttentionPlan(self, device)


@dataclass
class _Tokens:
    chunk: torch.Tensor  # (N,) chunk index in the crop
    noisy: torch.Tensor  # (N,) bool: in the noisy stream
    slot: torch.Tensor  # (N,) which noisy-stream chunk (0 for clean tokens)

    def __getitem__(self, index) -> "_Tokens":
        return _Tokens(self.chunk[index], self.noisy[index], self.slot[index])


class AttentionPlan:
    """Block-sparse attention over a TwoStreams layout (module docstring): the same result as the dense mask."""

    def __init__(self, streams: TwoStreams, device: torch.device):
        T, n, W, S = streams.chunk_tokens, streams.n_chunks, streams.window, streams.block_chunks
        bounds = list(range(0, n, S)) + [n]  # clean chunk c lies in block c // S
        slots = torch.searchsorted(streams.noisy_chunks, torch.tensor(bounds)).tolist()  # noisy slots per block
        self.clean_sizes = [T * (c1 - c0) for c0, c1 in zip(bounds, bounds[1:])]
        self.noisy_sizes = [T * (j1 - j0) for j0, j1 in zip(slots, slots[1:])]
        self.first_key_block = [max(0, c0 - W) // S for c0 in bounds[:-1]]  # the oldest clean block a block sees
        tokens = streams._slots(device)
        clean_start = [0] + torch.tensor(self.clean_sizes).cumsum(0).tolist()
        noisy_start = [n * T + s for s in [0] + torch.tensor(self.noisy_sizes).cumsum(0).tolist()]
        self.masks = []
        for b, lo in enumerate(self.first_key_block):
            clean_q = torch.arange(clean_start[b], clean_start[b + 1])
            noisy_rows = torch.arange(noisy_start[b], noisy_start[b + 1])
            keys = torch.cat([torch.arange(clean_start[lo], clean_start[b + 1]), noisy_rows]).to(device)
            queries = torch.cat([clean_q, noisy_rows]).to(device)
            self.masks.append(streams.links(tokens[queries], tokens[keys])[:, None])  # (B|1, 1, Q, Kk)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v (B, H, L', hd) in the layout's token order -> attention output (B, L', H, hd)."""
        sizes = self.clean_sizes + self.noisy_sizes
        nb = len(self.clean_sizes)
        # split, not slicing: its backward is one cat instead of a zero-filled full-size gradient per slice
        qs, ks, vs = (x.split(sizes, dim=2) for x in (q, k, v))
        clean_out, noisy_out = [], []
        for b, (lo, mask) in enumerate(zip(self.first_key_block, self.masks)):
            mine = (nb + b,) if self.noisy_sizes[b] else ()  # the block's own noisy chunks, if it has any
            qq = _cat([qs[j] for j in (b, *mine)])  # (B, H, Q, hd)
            kk = _cat([ks[j] for j in (*range(lo, b + 1), *mine)])  # (B, H, Kk, hd)
            vv = _cat([vs[j] for j in (*range(lo, b + 1), *mine)])
            y = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask).transpose(1, 2)  # (B, Q, H, hd)
            yc, yn = y.split([self.clean_sizes[b], self.noisy_sizes[b]], dim=1)
            clean_out.append(yc)
            noisy_out.append(yn)
        return torch.cat(clean_out + noisy_out, dim=1)  # (B, L', H, hd)


def _cat(xs: list[torch.Tensor]) -> torch.Tensor:
    return xs[0] if len(xs) == 1 else torch.cat(xs, dim=2)


def flex_available() -> bool:
    """Whether this torch has FlexAttention (2.5 and later)."""
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


_COMPILED_FLEX = None


def _flex():
    """flex_attention compiled once per process: uncompiled it materialises every score (and has no CPU backward)."""
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


class FlexPlan:
    """FlexAttention over a TwoStreams layout: the rule `sees`, as a mask_mod whose block mask lets the kernel skip
    every fully masked 128 x 128 tile."""

    def __init__(self, streams: TwoStreams, device: torch.device, compiled: bool = True):
        from torch.nn.attention.flex_attention import create_block_mask
        tok = streams._slots(device)
        W, n, K = streams.window, streams.n_chunks, len(streams.noisy_chunks)
        B = next((x.shape[0] for x in (streams.valid, streams.uncond) if x is not None), 1)
        valid = streams.valid if streams.valid is not None else torch.ones(B, n, dtype=torch.bool, device=device)
        uncond = streams.uncond if streams.uncond is not None else torch.zeros(B, K, dtype=torch.bool, device=device)

        def mask_mod(b, h, qi, ki):
            return sees(tok.chunk[qi] - tok.chunk[ki], tok.noisy[qi], tok.noisy[ki], tok.slot[qi] == tok.slot[ki],
                        valid[b, tok.chunk[ki]], uncond[b, tok.slot[qi]], W)

        L = streams.tokens
        self.block_mask = create_block_mask(mask_mod, B, None, L, L, device=device)
        self.compiled = compiled

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v (B, H, L', hd) -> attention output (B, L', H, hd)."""
        from torch.nn.attention.flex_attention import flex_attention
        fn = _flex() if self.compiled else flex_attention
        return fn(q, k, v, block_mask=self.block_mask).transpose(1, 2)
