"""FlowDiT: a block-causal diffusion transformer over codec latent tokens, predicting flow velocity.

Attention is bidirectional inside a chunk of 8 tokens, causal across chunks and limited to a
sliding window of `context_chunks` past chunks. `forward` runs any token layout under an explicit
boolean mask (training uses two streams, see flow.py); `forward_cached` evaluates one new chunk
against a KVCache, and `append_context` runs a finished chunk into the cache as context (`prefill`
does so for up to W chunks at once; `forward_cached(join=...)` and `forward_guided` carry a joining
chunk or the unguided branch in the same pass). They compute the same function: rotary positions make
attention depend only on token offsets, so the cache can use window-relative positions.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cache import KVCache
from .config import ModelConfig
from .rope import apply_rope, rope_table
from .streams import AttentionPlan, FlexPlan, TwoStreams


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(shift, x, 1 + scale)  # x * (1 + scale) + shift, one kernel


_FUSED_RMS_NORM = hasattr(F, "rms_norm")  # torch >= 2.4
# the own-chunk mark is stored divided by this: Adam moves each stored value by about the learning rate a step, and
# the mark must reach the time embedding's scale (about 1 a channel) within a closing stage of a few hundred steps
MARK_GAIN = 30.0


class RMSNorm(nn.Module):
    def __init__(self, dim: int, affine: bool = True, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _FUSED_RMS_NORM:  # one kernel instead of six: at 8 tokens per pass the launches are the cost
            # the weight in x's dtype: under bf16 autocast a float32 weight makes torch fall back to the unfused path
            weight = None if self.weight is None else self.weight.to(x.dtype)
            return F.rms_norm(x, x.shape[-1:], weight, self.eps)
        y = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps).to(x.dtype)
        return y * self.weight if self.weight is not None else y


class TimeEmbedding(nn.Module):
    """Per-token time t in [0, 1] -> conditioning vector (sinusoidal features + MLP)."""

    def __init__(self, freq_dim: int, cond_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = 1000.0 * t.float()[..., None] * freqs  # (B, L, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, L, freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))  # (B, L, cond_dim)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.dim // cfg.n_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.q_norm, self.k_norm = RMSNorm(self.head_dim), RMSNorm(self.head_dim)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, L, D) -> q, k (normalised, not yet rotated), v, each (B, H, L, hd)."""
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, hd)
        return self.q_norm(q), self.k_norm(k), v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | AttentionPlan | FlexPlan) -> torch.Tensor:
        """q (B, H, Lq, hd) over k, v (B, H, Lk, hd) where mask (B, 1, Lq, Lk) is True, or as a two-stream
        plan lets them (streams.py) -> (B, Lq, D)."""
        if isinstance(mask, (AttentionPlan, FlexPlan)):
            return self.out(mask.attend(q, k, v).flatten(2))  # (B, Lq, H, hd) -> (B, Lq, D)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, Lq, hd)
        return self.out(y.transpose(1, 2).flatten(2))  # (B, Lq, D)


class Block(nn.Module):
    """adaLN-Zero transformer block: per-token shift/scale/gate from the time embedding."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = 64 * math.ceil(cfg.mlp_ratio * cfg.dim / 64)
        self.norm1, self.norm2 = RMSNorm(cfg.dim, affine=False), RMSNorm(cfg.dim, affine=False)
        self.attn = Attention(cfg)
        self.w12 = nn.Linear(cfg.dim, 2 * hidden, bias=False)  # SwiGLU gate and value
        self.w3 = nn.Linear(hidden, cfg.dim, bias=False)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cfg.cond_dim, 6 * cfg.dim))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)

    def forward(self, x, mod, rope, attend) -> torch.Tensor:
        """x (B, L, D); mod = ada(time embedding), per token (B|1, L|1, 6D) or per chunk (B, G, 1, 6D) for G chunks
        of L / G tokens each; `attend(q, k, v)` may reach beyond this call (the cache)."""
        shape, grouped = x.shape, mod.dim() == 4  # views only when grouped: the exported cached step has none
        if grouped:  # a chunk's tokens share its modulation: broadcast it instead of copying it 8 times
            x = x.view(shape[0], mod.shape[1], -1, shape[-1])  # (B, G, T, D)
        sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=-1)  # 6 x (B, L, D) or (B, G, 1, D)
        a = modulate(self.norm1(x), sh1, sc1)
        q, k, v = self.attn.project(a.view(shape) if grouped else a)
        cos, sin = rope
        y = attend(apply_rope(q, cos, sin), k, v)  # (B, L, D)
        x = torch.addcmul(x, g1, y.view(x.shape) if grouped else y)  # x + g1 * attention
        x = torch.addcmul(x, g2, self.mlp(modulate(self.norm2(x), sh2, sc2)))  # x + g2 * mlp
        return x.view(shape) if grouped else x


class FlowDiT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.head_dim = cfg.dim // cfg.n_heads
        self.proj_in = nn.Linear(cfg.latent_dim, cfg.dim)
        self.time = TimeEmbedding(cfg.time_freq_dim, cfg.cond_dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm_out = RMSNorm(cfg.dim, affine=False)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(cfg.cond_dim, 2 * cfg.dim))
        self.proj_out = nn.Linear(cfg.dim, cfg.latent_dim)
        # added (times MARK_GAIN) to the time embedding of context chunks the model generated itself (cfg.mark_own);
        # zero at first, so a model that gains it computes what it did until training moves it
        self.own_mark = nn.Parameter(torch.zeros(cfg.cond_dim)) if cfg.mark_own else None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier linears; adaLN modulations and the output projection start at zero (adaLN-Zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.time.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.ada[1].weight)
            nn.init.zeros_(block.ada[1].bias)
        for layer in (self.ada_out[1], self.proj_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def conditioning(self, t: torch.Tensor, own: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """adaLN modulations for times t (B, L): (B, L, 6D) per block, then the head's (B, L, 2D). `own` (B, L), where
        True, marks context the model generated itself (cfg.mark_own; ignored by a model without the mark).

        They depend on t (and the mark) alone, so a generator may compute them once per distinct time and reuse them.
        """
        c = self.time(t)  # (B, L, C)
        if own is not None and self.own_mark is not None:
            c = c + own.to(c.dtype)[..., None] * (MARK_GAIN * self.own_mark).to(c.dtype)
        elif self.own_mark is not None and self.training:  # no marked chunk: the mark takes part all the same (zero
            c = c + 0.0 * self.own_mark.to(c.dtype)  # gradient), as data-parallel training needs of every parameter
        return tuple(block.ada(c) for block in self.blocks) + (self.ada_out(c),)

    def _head(self, h: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        """h (B, L, D) and the head's modulation, per token (B|1, L|1, 2D) or per chunk (B, G, 1, 2D) -> (B, L, 64)."""
        shift, scale = mod.chunk(2, dim=-1)
        if mod.dim() == 3:
            return self.proj_out(modulate(self.norm_out(h), shift, scale))  # (B, L, latent_dim)
        B, L, D = h.shape
        h = h.view(B, mod.shape[1], -1, D)  # (B, G, T, D)
        return self.proj_out(modulate(self.norm_out(h), shift, scale)).view(B, L, -1)  # (B, L, latent_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, pos: torch.Tensor,
                mask: torch.Tensor | TwoStreams, own: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity for tokens x (B, L, 64) at per-token times t (B, L), CPU positions pos (L,), under `mask`; `own`
        (B, L), if given, marks the tokens of context chunks the model generated itself (conditioning):

        a dense boolean (B|1, 1, L, L), True where a query sees a key; or the TwoStreams layout of a training
        batch (streams.py), whose attention then skips the blocks its mask would hide, and whose times are read
        once per chunk (flow.py gives all tokens of a chunk one time) so that adaLN runs per chunk, not per token.
        """
        h = self.proj_in(x)  # (B, L, D)
        rope = rope_table(pos, self.head_dim, self.cfg.rope_base, x.device)
        if isinstance(mask, TwoStreams):
            B, L, _ = x.shape
            per_chunk = lambda a: a.view(B, L // self.cfg.chunk_tokens, -1)[:, :, 0]  # noqa: E731 (B, G): one a chunk
            own_chunk = None if own is None else per_chunk(own)
            mods = [m.unsqueeze(2) for m in self.conditioning(per_chunk(t), own_chunk)]  # (B, G, 1, .) each
            mask = mask.plan(x.device)
        else:
            mods = self.conditioning(t, own)  # (B, L, .) each
        for block, mod in zip(self.blocks, mods):
            h = block(h, mod, rope, lambda q, k, v, blk=block: blk.attn.attend(q, apply_rope(k, *rope), v, mask))
        return self._head(h, mods[-1])

    def new_cache(self, batch: int, device=None, dtype=None) -> KVCache:
        """An empty cache for `batch` streams, preallocated for the model's window."""
        p = next(self.parameters())
        return KVCache.empty(self.cfg, batch, device or p.device, dtype or p.dtype)

    def prefill(self, x: torch.Tensor, t: torch.Tensor, cache: KVCache) -> None:
        """Commit n <= W clean chunks x (B, n * 8, 64) at times t (B, n * 8) into an empty cache in one pass (real
        music, a prompt: no own-chunk mark).

        One masked forward instead of n append_context passes, with the same keys and values: chunk j sees
        chunks j-W..j either way, because the cache holds nothing older.
        """
        T, W = self.cfg.chunk_tokens, self.cfg.context_chunks
        n = x.shape[1] // T
        if not 1 <= n <= W or x.shape[1] != n * T:
            raise ValueError(f"prefill needs 1..{W} whole chunks, got {x.shape[1]} tokens")
        h, mods = self.proj_in(x), self.conditioning(t)  # (B, L, D), per-block modulations
        rope = rope_table(torch.arange(n * T), self.head_dim, self.cfg.rope_base, x.device)
        mask = clean_mask(n, W, T, x.device)
        for i, block in enumerate(self.blocks):
            def attend(q, k, v, i=i):
                k = apply_rope(k, *rope)
                cache.store_prefix(i, k, v)  # chunk j lands in ring slot j, rotated at its own positions
                return self.blocks[i].attn.attend(q, k, v, mask)
            h = block(h, mods[i], rope, attend)
        cache.mark_prefilled(n)

    def forward_cached(self, x: torch.Tensor, t: torch.Tensor, cache: KVCache, use_context: bool = True,
                       mods: tuple[torch.Tensor, ...] | None = None,
                       join: "Chunk | Sequence[Chunk] | None" = None) -> torch.Tensor:
        """Velocity for one new chunk x (B, 8, 64) at times t (B, 8) against the cached past.

        use_context=False ignores the past (the unconditional branch for classifier-free guidance).
        `mods`: precomputed conditioning(t), e.g. (1, 1, .) modulations of the chunk's single time, reused across chunks.
        `join`: finished chunks (one, or several in order, as many as the cache's scratch leaves room for) that
        become context first, in the same pass (they are appended to the cache, and the new chunk is evaluated
        as the chunk after them): one read of the weights serves all. Without `join` the ring is only read.
        """
        chunks = _joined(join) + [Chunk(x, t, mods, "cond" if use_context else "uncond")]
        return self._run_chunks(chunks, cache)

    def forward_guided(self, x: torch.Tensor, t: torch.Tensor, cache: KVCache, scale: float,
                       mods: tuple[torch.Tensor, ...] | None = None,
                       join: "Chunk | Sequence[Chunk] | None" = None) -> torch.Tensor:
        """Classifier-free guided velocity v_u + scale * (v_c - v_u) for x (B, 8, 64), the conditional and the
        unconditional branch evaluated in one pass (the weights are read once for both)."""
        chunks = _joined(join) + [Chunk(x, t, mods, "cond"), Chunk(x, t, mods, "uncond")]
        v_c, v_u = self._run_chunks(chunks, cache).float().chunk(2, dim=1)  # 2 x (B, 8, 64)
        return v_u + scale * (v_c - v_u)

    def append_context(self, x: torch.Tensor, t: torch.Tensor, cache: KVCache,
                       mods: tuple[torch.Tensor, ...] | None = None) -> None:
        """Run a finished chunk x (B, 8, 64), at its context-noise times t (B, 8), into the cache as the newest context."""
        self._run_chunks([Chunk(x, t, mods, "context")], cache)

    def append_chunks(self, chunks: Sequence[Chunk], cache: KVCache) -> None:
        """Run finished chunks (role "context", oldest first) into the cache in one pass."""
        self._run_chunks(list(chunks), cache)

    def _run_chunks(self, chunks: list[Chunk], cache: KVCache) -> torch.Tensor | None:
        """One pass over a few chunks against the cache (roles: KVCache.group); returns the velocities of the
        chunks that are not context, (B, k * 8, 64), and appends the leading context chunks to the cache.

        The arithmetic is `_pass`, or a CUDA graph of it where the cache carries one (graphs.py)."""
        roles = tuple(c.role for c in chunks)
        mask, rope = cache.group(roles)
        mods = [c.mods if c.mods is not None else self.conditioning(c.t) for c in chunks]
        run = cache.graphs.run if cache.graphs is not None else self._pass
        out = run([c.x for c in chunks], mods, roles, mask, rope, cache)
        joining = roles.count("context")  # group() checked that they lead
        if joining:
            cache.append_scratch(joining)  # the finished chunks' keys and values move into the ring
        return out

    def _pass(self, xs: list[torch.Tensor], mods: list[tuple[torch.Tensor, ...]], roles: tuple[str, ...],
              mask: torch.Tensor | None, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache) -> torch.Tensor | None:
        """The arithmetic of one cached pass: chunks xs (B, 8, 64) each with its modulations, under the group's mask
        and rotation tables; their keys and values land in the cache's scratch slots. Static shapes for given roles
        and batch, and nothing read back to the host: a CUDA graph can hold it. Returns the velocities of the
        chunks that are not context (B, k * 8, 64), or None when all are context."""
        T = self.cfg.chunk_tokens
        if len(xs) == 1:
            per_block = mods[0]  # (B|1, 8|1, .) each, broadcast over the chunk
        else:
            B = xs[0].shape[0]
            per_block = tuple(torch.cat([m[i].expand(B, T, -1) for m in mods], dim=1)  # (B, G * 8, .)
                              for i in range(len(self.blocks) + 1))
        h = self.proj_in(torch.cat(xs, dim=1))  # (B, G * 8, D)
        for i, block in enumerate(self.blocks):
            def attend(q, k, v, i=i):
                keys, values = cache.stage(i, k, v, rope)  # scratch slots hold these chunks' k (rotated), v
                return self.blocks[i].attn.attend(q, keys, values, mask)
            h = block(h, per_block[i], rope, attend)
        skip = T * roles.count("context")
        if skip == h.shape[1]:
            return None  # nothing to predict: a context chunk's own velocity is never used
        head = per_block[-1] if per_block[-1].shape[1] == 1 else per_block[-1][:, skip:]
        return self._head(h[:, skip:], head)  # (B, k * 8, 64)


def _joined(join: "Chunk | Sequence[Chunk] | None") -> list["Chunk"]:
    """forward_cached's `join` as a list: none, one chunk, or several."""
    return [] if join is None else [join] if isinstance(join, Chunk) else list(join)


@dataclass
class Chunk:
    """One chunk of a cached pass: tokens x (B, 8, 64), times t (B, 8) or precomputed modulations, and its role
    (KVCache.group: "context" joins the cache, "cond" sees it, "uncond" sees only itself)."""
    x: torch.Tensor
    t: torch.Tensor | None
    mods: tuple[torch.Tensor, ...] | None = None
    role: str = "context"


def stream_mask(n_chunks: int, window: int, chunk_tokens: int = 8, uncond: torch.Tensor | None = None,
                valid: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """Attention mask (B, 1, 2L, 2L) for a clean stream followed by a noisy stream of the same n chunks.

    Clean chunk j sees clean chunks j-W..j; noisy chunk i sees clean chunks i-W..i-1 (none where
    uncond[b, i]) and itself; clean never sees noisy. Cross-chunk links to chunks that are not
    valid[b, j] (padding) are cut; every token still sees its own chunk, so no row is empty.
    """
    return TwoStreams(n_chunks, window, chunk_tokens, valid, uncond).mask(device if device is not None else "cpu")


def clean_mask(n_chunks: int, window: int, chunk_tokens: int = 8, device=None) -> torch.Tensor:
    """Mask (1, 1, L, L) for a clean stream alone: chunk j sees chunks j-W..j."""
    ci = torch.arange(n_chunks * chunk_tokens, device=device) // chunk_tokens
    lag = ci[:, None] - ci[None, :]
    return ((lag >= 0) & (lag <= window))[None, None]
