"""Streaming generation: prefill a prompt into the cache, then one chunk at a time, at constant cost.

Per chunk: draw noise x(1) = temperature * eps, integrate the flow ODE to t = 0 evaluating only the
new chunk's 8 tokens against the cache, then add the finished chunk, lightly re-noised to
`context_noise` (a level the model was trained to expect on its context: it keeps a stream from feeding on
its own errors), to the cache as context. The prompt is real music and goes in at `prompt_noise` (0 by
default: exactly as it is, so a continuation keeps its prompt's character).
That addition rides along the next chunk's first evaluation (one pass, one read of the weights:
NFE passes per chunk instead of NFE + 1); `flush()` makes it at once. Memory and time per chunk stay
flat however long the stream runs. A cache made ready for rewinding (`reserve_rewind`) lets several context
chunks ride along one pass, and `rewind` takes the newest context chunks back (live lookahead replaces its
guesses with the performer's real chunks this way).

Temperature: the ODE starts from temperature * N(0, I) instead of N(0, I) (pingpong also scales the
noise it re-injects). Below 1 the output is more conservative, above 1 more varied.
Classifier-free guidance: v = v_uncond + cfg_scale * (v_cond - v_uncond), with the model's own
unconditional branch (the chunk attends only to itself), evaluated in the same pass as the conditional
one; cfg_scale = 1 skips it.
"""
from __future__ import annotations

import torch

from .config import SampleConfig
from .errors import FlowError
from .flow import per_token
from .graphs import ChunkGraphs, PassGraphs
from .latents import LatentStats, denormalise, normalise
from .model import Chunk, FlowDiT, clean_mask
from .packing import prepack
from .quantize import for_generation
from .solvers import integrate, spent_nfe, steps_for, time_value
from .util.devices import autocast, to_device

MAX_REWIND = 64  # context chunks a generator remembers the origin of beyond its window (rewind takes back fewer)


class StreamGenerator:
    """Generates chunk after chunk for a batch of streams against one KVCache."""

    def __init__(self, model: FlowDiT, stats: LatentStats, cfg: SampleConfig, device: torch.device,
                 amp: torch.dtype | None = None, pack: bool = True):
        model = for_generation(model, cfg.precision, device, pack)  # fp32: packed weights on x86; int8: quantized
        self.model, self.stats, self.cfg, self.device, self.amp = model, stats, cfg, torch.device(device), amp
        self.batch = cfg.num_samples
        self.steps = steps_for(cfg.solver, cfg.nfe)
        self.cache = model.new_cache(self.batch, self.device, next(model.parameters()).dtype)
        if cfg.cuda_graphs:
            if self.device.type != "cuda":
                raise FlowError(f"--cuda-graphs needs a CUDA device, not {self.device.type} (leave the flag out)")
            self.cache.graphs = PassGraphs(model, amp)
        self.chunk_graphs = ChunkGraphs(self, amp) if cfg.cuda_graphs else None  # whole chunks, once the ring is full
        self.generator = torch.Generator().manual_seed(cfg.seed)  # CPU: same noise on every device
        self.tokens = model.cfg.chunk_tokens
        chunk_rows = self.tokens * self.batch
        rows = chunk_rows * (2 if cfg.cfg_scale != 1.0 else 1)  # one pass of the new chunk (and its unguided twin)
        prepack(model, [rows, rows + chunk_rows])  # ... and with a finished chunk joining it
        self.chunks_done = 0
        self.last_noise: torch.Tensor | None = None  # x(1) of the latest chunk, (B, 8, 64)
        self._mods: dict[tuple[float, bool], tuple[torch.Tensor, ...]] = {}  # (time, own) -> adaLN modulations,
        # reused every chunk
        self._pending: list[tuple[torch.Tensor, tuple[float, bool]]] = []  # context chunks (B, 8, 64) waiting to
        # join the next pass, each with its (noise level, whether it goes in under the model's mark)
        self._origins: list[bool] = []  # whether each context chunk, oldest first, was the model's own (recent ones)

    @property
    def evals(self) -> int:
        """Model evaluations per chunk actually spent (before guidance doubles them)."""
        return spent_nfe(self.cfg.solver, self.cfg.nfe)

    def modulations(self, t: float, own: bool = False) -> tuple[torch.Tensor, ...]:
        """The model's conditioning for one time value, (1, 1, .) each; computed once per distinct time. `own`: under
        the mark of the model's own chunks (FlowDiT.conditioning; a model without the mark ignores it).

        The same schedule runs every chunk, so after the first chunk no time embedding or adaLN
        projection is recomputed: about a third of the small model's weights are not read again.
        """
        key = (round(t, 12), own)
        if key not in self._mods:
            if len(self._mods) >= 1024:  # stochastic or changing schedules: stay bounded
                self._mods.clear()
            self._mods[key] = self._conditioning(t, own)
        return self._mods[key]

    def _conditioning(self, t: float, own: bool) -> tuple[torch.Tensor, ...]:
        """What modulations() keeps for (t, own): the model's conditioning, (1, 1, .) each."""
        mark = torch.ones((1, 1), dtype=torch.bool, device=self.device) if own else None
        with torch.inference_mode(), autocast(self.device, self.amp):
            return self.model.conditioning(torch.full((1, 1), t, device=self.device), mark)

    def _noise(self) -> torch.Tensor:
        return to_device(torch.randn(self.batch, self.tokens, self.model.cfg.latent_dim, generator=self.generator),
                         self.device)

    @property
    def noise_generator(self) -> torch.Generator:
        """Where a stochastic solver draws the noise it re-injects inside a chunk."""
        return self.generator

    def _times(self, value: float) -> torch.Tensor:
        return torch.full((self.batch, self.tokens), value, device=self.device)

    def _to_context(self, x: torch.Tensor, s: float) -> torch.Tensor:
        """A finished, normalised chunk (B, 8, 64) lightly re-noised to level s, as training saw context (the noise
        is drawn at every level, 0 included, so the stream's noise does not depend on the levels)."""
        return (1 - s) * x + s * self._noise()

    @torch.inference_mode()
    def add_context(self, x: torch.Tensor, own: bool = True) -> torch.Tensor:
        """Make a finished, normalised chunk x (B, 8, 64) context: re-noise it to context_noise, run it into the cache.
        own=False for real music (a performer's audio) rather than the model's chunk. Returns the re-noised chunk,
        which add_noised_context puts back exactly (after a rewind)."""
        ctx = self._to_context(x, self.cfg.context_noise)
        self._append(ctx, self.cfg.context_noise, self._marked(own))
        return ctx

    @torch.inference_mode()
    def add_noised_context(self, ctx: torch.Tensor, own: bool = True) -> None:
        """A chunk add_context already re-noised (B, 8, 64), as the newest context again."""
        self._append(ctx, self.cfg.context_noise, self._marked(own))

    def _marked(self, own: bool) -> bool:
        """Whether a context chunk goes in under the mark of the model's own chunks (a model with the mark, from
        train's closing stage): when the model made it and the W chunks before it, all its window holds, are its own
        too. Until then a stream's chunks go in as real music does, as teacher forcing trained the model to continue: a
        continuation of a prompt, or of a performer still in view, is the plain model's. Records the chunk's origin."""
        W = self.model.cfg.context_chunks
        mark = self.model.cfg.mark_own and own and len(self._origins) >= W and all(self._origins[-W:])
        self._record_origins([own])
        return mark

    def _record_origins(self, origins: list[bool]) -> None:
        """Add context chunks' origins (True: the model's own), keeping the window's and what a rewind may take."""
        self._origins = (self._origins + origins)[-(self.model.cfg.context_chunks + MAX_REWIND):]

    def _append(self, ctx: torch.Tensor, s: float, mark: bool) -> None:
        """Queue a context chunk re-noised to level s (mark: under the model's own mark): it joins the cache in the
        next chunk's first pass (or at flush())."""
        if len(self._pending) >= max(1, self.cache.scratch - 2):  # room for the new chunk and its unguided twin
            self.flush()
        self._pending.append((ctx, (s, mark)))

    @property
    def context_length(self) -> int:
        """Context chunks so far, queued ones included: where a chunk appended now lands."""
        return self.cache.n + len(self._pending)

    def reserve_rewind(self, chunks: int) -> None:
        """Make the cache able to take back `chunks` context chunks (and to join that many in one pass); the
        context it holds is kept."""
        if chunks > self.cache.spare or chunks + 2 > self.cache.scratch:
            self.cache = self.cache.resized(spare=chunks, scratch=chunks + 2)

    def rewind(self, chunks: int) -> None:
        """Take back the newest `chunks` context chunks (queued or in the cache; at most what reserve_rewind made
        room for): the next context chunk goes where the first of them was."""
        queued = min(chunks, len(self._pending))
        del self._pending[len(self._pending) - queued:]
        del self._origins[max(0, len(self._origins) - chunks):]
        if chunks > queued:
            self.cache.rewind(chunks - queued)

    def _joining(self) -> list[Chunk]:
        """The queued context chunks as the leading chunks of a pass, and the queue emptied."""
        ctx, self._pending = self._pending, []
        return [Chunk(c, self._times(s), self.modulations(s, mark), "context") for c, (s, mark) in ctx]

    @torch.inference_mode()
    def flush(self) -> None:
        """Add the queued context chunks to the cache now, in a pass of their own (the cache then holds every chunk)."""
        join = self._joining()
        if join:
            with autocast(self.device, self.amp):
                self.model.append_chunks(join, self.cache)

    def _append_many(self, ctx: torch.Tensor, s: float) -> None:
        """Real context chunks (B, n, 8, 64), a prompt, at noise level s: one batched prefill pass into an empty
        cache, else one append each."""
        self.flush()
        if self.cache.n == 0:
            times = torch.full(ctx.shape[:2], s, device=self.device).repeat_interleave(self.tokens, 1)
            with autocast(self.device, self.amp):
                self.model.prefill(ctx.flatten(1, 2), times, self.cache)
        else:
            for k in range(ctx.shape[1]):
                self._append(ctx[:, k], s, False)

    @torch.inference_mode()
    def prefill(self, latents: torch.Tensor) -> None:
        """A prompt's raw codec latents (T, 8, 64) or (B, T, 8, 64): its last W chunks become the context."""
        if latents.ndim == 3:
            latents = latents.expand(self.batch, *latents.shape)
        z = normalise(latents.float().cpu(), self.stats).to(self.device)  # (B, T, 8, 64)
        first = max(0, z.shape[1] - self.model.cfg.context_chunks)
        s = self.cfg.prompt_noise
        self._record_origins([False] * (z.shape[1] - first))  # real music
        self._append_many(torch.stack([self._to_context(z[:, k], s) for k in range(first, z.shape[1])], dim=1), s)

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v(x, t) for the new chunk against the cache, with guidance when cfg_scale != 1."""
        mods = self.modulations(time_value(t))  # solvers give the whole chunk one time
        join = self._joining()  # the chunks before, if they still wait to become context
        with autocast(self.device, self.amp):
            if self.cfg.cfg_scale != 1.0:
                return self.model.forward_guided(x, t, self.cache, self.cfg.cfg_scale, mods=mods, join=join)
            return self.model.forward_cached(x, t, self.cache, mods=mods, join=join).float()

    def shape_output(self, x0: torch.Tensor) -> torch.Tensor:
        """What becomes of a finished normalised chunk (B, 8, 64) before it is kept and returned (live steering)."""
        return x0

    def _chunk_done(self) -> None:
        """Called once per generated chunk, after it is finished (live noise streams advance here)."""

    @torch.inference_mode()
    def next_chunk(self, as_context: bool = True) -> torch.Tensor:
        """Generate the next chunk as raw codec latents (B, 8, 64) on the CPU; as_context=False leaves the cache
        alone (with a live input the performer's audio, not the model's guess, becomes that moment's context)."""
        x1 = self.cfg.temperature * self._noise()  # (B, 8, 64)
        self.last_noise = x1
        return self._finish(x1, 1.0, as_context)

    @torch.inference_mode()
    def next_chunk_from(self, latents: torch.Tensor, t: float, as_context: bool = True) -> torch.Tensor:
        """The next chunk finished from given raw latents (B, 8, 64) noised to time t in (0, 1]: the model
        redraws them against the cache, keeping more of them the smaller t is (t = 1 is a fresh chunk).
        Rollout training's anchored chunks are made this way (rollout.py)."""
        z = normalise(latents.float().cpu(), self.stats).to(self.device)
        x_t = (1 - t) * z + t * self.cfg.temperature * self._noise()  # (B, 8, 64)
        return self._finish(x_t, t, as_context)

    def solve(self, x_t: torch.Tensor, t: float = 1.0) -> torch.Tensor:
        """A chunk integrated from x(t) (B, 8, 64) to x(0) against the cache; with --cuda-graphs and a full ring, as
        one graph (graphs.py: ChunkGraphs), else evaluation by evaluation."""
        if self.chunk_graphs is not None and self.chunk_graphs.ready():
            return self.chunk_graphs.run(x_t, t)
        return self.integrate(x_t, t)

    def integrate(self, x_t: torch.Tensor, t: float = 1.0) -> torch.Tensor:
        """solve()'s arithmetic: the solver's loop over velocity()."""
        return integrate(self.velocity, x_t, self.cfg.solver, self.steps, self.cfg.schedule, self.cfg.schedule_shift,
                         self.noise_generator, noise_scale=self.cfg.temperature, t_start=t)

    def _finish(self, x_t: torch.Tensor, t: float, as_context: bool) -> torch.Tensor:
        """Integrate a chunk from x(t) to 0 against the cache, keep it (as context unless told not to), and return
        it as raw codec latents (B, 8, 64) on the CPU."""
        x0 = self.shape_output(self.solve(x_t, t))
        if as_context:
            self.add_context(x0)
        self._chunk_done()
        self.chunks_done += 1
        return self.latents(x0)

    def latents(self, x0: torch.Tensor) -> torch.Tensor:
        """A finished normalised chunk (B, 8, 64) as raw codec latents on the CPU (scaled there: one copy from the
        device, not two more to it)."""
        return denormalise(x0.float().cpu(), self.stats)

    def generate(self, n_chunks: int, on_chunk=None) -> torch.Tensor:
        """n_chunks more chunks, (B, n, 8, 64); on_chunk(i, latents) is called after each."""
        out = []
        for i in range(n_chunks):
            out.append(self.next_chunk())
            if on_chunk is not None:
                on_chunk(i, out[-1])
        return torch.stack(out, dim=1) if out else torch.zeros(self.batch, 0, self.tokens, self.model.cfg.latent_dim)


class WindowRerunGenerator(StreamGenerator):
    """The reference approach the cache exists to beat: every evaluation re-runs the model over the
    whole window of past chunks plus the new one. Same model, same maths for the first W chunks;
    cost grows with the window instead of staying at 8 tokens. Its linear layers are plain ones, as in the
    original CoDiCodec-Flow code it stands for (MKL packing would make them ~1.2x faster at 264 rows)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs, pack=False)
        W, T, D = self.model.cfg.context_chunks, self.tokens, self.model.cfg.latent_dim
        self.context = torch.zeros(self.batch, 0, T, D, device=self.device)  # the last <= W clean chunks
        self.levels: list[tuple[float, bool]] = []  # their noise levels and whether they carry the own-chunk mark
        self.W = W

    def _append(self, ctx: torch.Tensor, s: float, mark: bool) -> None:
        self.context = torch.cat([self.context, ctx[:, None]], dim=1)[:, -self.W:]
        self.levels = (self.levels + [(s, mark)])[-self.W:]

    def _append_many(self, ctx: torch.Tensor, s: float) -> None:
        for k in range(ctx.shape[1]):
            self._append(ctx[:, k], s, False)

    @torch.inference_mode()
    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.cfg.cfg_scale != 1.0:
            raise FlowError("the window re-run reference does not implement guidance")
        n = self.context.shape[1] + 1
        seq = torch.cat([self.context.flatten(1, 2), x], dim=1)  # (B, n * 8, D)
        levels = torch.tensor([s for s, _ in self.levels], device=self.device).expand(self.batch, -1)  # (B, n - 1)
        marks = torch.tensor([mark for _, mark in self.levels] + [False], device=self.device).expand(self.batch, -1)
        times = torch.cat([per_token(levels, self.tokens), t], dim=1)  # (B, n * 8)
        with autocast(self.device, self.amp):
            out = self.model(seq, times, torch.arange(n * self.tokens), clean_mask(n, self.W, self.tokens, self.device),
                             per_token(marks, self.tokens))
        return out[:, -self.tokens:].float()
