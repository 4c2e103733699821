"""CUDA graphs of the cached pass and of whole chunks (graphs.py, --cuda-graphs): the graphed stream equals the
eager one.

On a CPU the graphs' static-buffer plumbing and the device positions run eagerly (capture=False) and must give
exactly the plain stream; on a CUDA GPU (the `gpu` tests, skipped elsewhere) the captured graphs are replayed and
checked against eager PyTorch, with no host synchronisation inside an evaluation or a steady-state chunk.
"""
from dataclasses import replace

import pytest
import torch

from codicodec_flow.commands.cli import main
from codicodec_flow.config import ModelConfig, SampleConfig
from codicodec_flow.errors import FlowError
from codicodec_flow.generate import StreamGenerator
from codicodec_flow.graphs import ChunkGraphs, PassGraphs
from codicodec_flow.latents import LatentStats
from codicodec_flow.solvers import _t, integrate, time_value
from conftest import randomised_model

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, cond_dim=48, context_chunks=3)
STATS = LatentStats(torch.full((64,), 0.1), torch.full((64,), 0.9), 1)
CUDA = torch.cuda.is_available()


def gpu(test):
    """A CUDA-only test: marked `gpu` (pytest -m gpu runs these) and skipped without a CUDA GPU."""
    return pytest.mark.gpu(pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (graphs are captured and replayed "
                                                               "only there)")(test))


def _pair(model, device, amp=None, chunks=False, generator=StreamGenerator, **kw):
    """A plain generator and one whose passes go through PassGraphs and, with `chunks`, whose steady-state chunks
    go through ChunkGraphs (captured on CUDA, eager on the CPU)."""
    kw = dict(dict(solver="euler", nfe=4, seed=4), **kw)
    plain = generator(model, STATS, SampleConfig(**kw), device, amp)
    graphed = generator(model, STATS, SampleConfig(**kw), device, amp)
    capture = torch.device(device).type == "cuda"
    graphed.cache.graphs = PassGraphs(graphed.model, amp, capture=capture)
    if chunks:
        graphed.chunk_graphs = ChunkGraphs(graphed, amp, capture=capture)
    return plain, graphed


def _script(g: StreamGenerator, prompt: torch.Tensor) -> torch.Tensor:
    """A stream that meets every layout: a filling window, the ring wrapping, a cache resized for rewinding,
    a rewind, and several context chunks joining one pass."""
    g.prefill(prompt)
    out = [g.generate(5)]  # window 3: masks while it fills, then the steady state, the ring wrapping
    g.reserve_rewind(2)  # a new cache: the graphs must be captured again over its buffers
    out.append(g.generate(7))  # ... and the ring fills again (5 slots)
    kept = [g.add_context(torch.randn(g.batch, 8, 64, generator=torch.Generator().manual_seed(k)).to(g.device))
            for k in range(2)]
    g.rewind(2)
    for ctx in kept:  # both ride the next chunk's first pass
        g.add_noised_context(ctx)
    out.append(g.generate(3))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("kw", [dict(), dict(solver="heun", nfe=4, num_samples=2), dict(solver="midpoint", nfe=4,
                                                                                       cfg_scale=2.0)])
def test_graph_buffers_give_exactly_the_plain_stream(kw):
    """The static buffers (tokens and modulations copied in every pass, mask and rotation tables at every new
    chunk) compute exactly what the plain pass does, through every layout of a stream."""
    model = randomised_model(CFG)
    plain, graphed = _pair(model, "cpu", **kw)
    prompt = torch.randn(2, 8, 64)
    a, b = _script(plain, prompt), _script(graphed, prompt)
    assert torch.equal(a, b)
    graphs = graphed.cache.graphs
    assert graphs is not None and 1 <= len(graphs._entries) <= 4  # a few layouts since the resize, not one per chunk
    assert max(e.runs for e in graphs._entries.values()) >= 8  # buffers reused across chunks


@pytest.mark.parametrize("kw,cfg", [(dict(), CFG), (dict(solver="heun", nfe=4, num_samples=2), CFG),
                                    (dict(solver="midpoint", nfe=4, cfg_scale=2.0), CFG),
                                    (dict(), replace(CFG, mark_own=True))])
def test_whole_chunks_at_device_positions_give_exactly_the_plain_stream(kw, cfg):
    """A whole chunk run at the cache's device position (one replay a chunk on CUDA) computes exactly the plain
    chunk at every ring position, through a resize, rewinds, a context window narrowed mid-stream and the rotation tables'
    window moving on; with the own-chunk mark, whose joining chunks' marks are part of a layout."""
    model = randomised_model(cfg)
    plain, graphed = _pair(model, "cpu", chunks=True, **kw)
    prompt = torch.randn(2, 8, 64)
    a, b = _script(plain, prompt), _script(graphed, prompt)
    for g in (plain, graphed):
        g.cache.set_active(2)
    a, b = torch.cat([a, plain.generate(70)], 1), torch.cat([b, graphed.generate(70)], 1)  # rotation tables move on
    assert torch.equal(a, b)
    runs = {key[1]: entry.runs for key, entry in graphed.chunk_graphs._entries.items()}  # by context window
    assert runs[None] >= 5 and runs[2] == 69  # one layout per window since the resize: every steady chunk but the
    #                                          layout's first (run pass by pass: it may never come back) through it
    if cfg.mark_own:  # the stream's own chunks joined under the mark once its window held only them
        assert any(mark for key in graphed.chunk_graphs._entries for _, mark in key[0])


def test_chunk_graph_layouts_stay_bounded():
    """A guidance knob swept through many values (each held two chunks) keeps at most MAX_CHUNK_GRAPHS layouts."""
    from codicodec_flow.graphs import MAX_CHUNK_GRAPHS
    model = randomised_model(CFG)
    _, g = _pair(model, "cpu", chunks=True, nfe=1)
    g.prefill(torch.randn(3, 8, 64))
    for k in range(MAX_CHUNK_GRAPHS + 8):
        g.cfg = replace(g.cfg, cfg_scale=1.5 + k / 10)
        g.generate(2)
    assert 1 <= len(g.chunk_graphs._entries) <= MAX_CHUNK_GRAPHS
    assert all(e.runs == 1 for e in g.chunk_graphs._entries.values())  # the second chunk of each value


def test_live_chunks_with_steering_go_through_chunk_graphs():
    """The live generator drafts through the same solve: steered and crossfaded chunks equal the plain ones."""
    from codicodec_flow.realtime.generator import LiveGenerator
    from codicodec_flow.realtime.state import Controls
    model = randomised_model(CFG)
    plain, graphed = _pair(model, "cpu", chunks=True, generator=LiveGenerator)
    prompt = torch.randn(3, 8, 64)
    outs = []
    for g in (plain, graphed):
        g.configure(Controls(solver="euler", nfe=4, seed=4, context_chunks=3, channel_scale=(1.1,) * 64,
                             token_bias=(0.1,) * 8))
        g.prefill(prompt)
        first = g.generate(4)
        g.configure(Controls(solver="euler", nfe=4, seed=5, context_chunks=3))  # a new seed crossfades
        outs.append(torch.cat([first, g.generate(4)], 1))
    assert torch.equal(*outs)
    # the prompt filled the ring; the first chunk (nothing joins) and the next (the layout's first) run pass by pass
    assert sum(e.runs for e in graphed.chunk_graphs._entries.values()) == 6


def test_cuda_graphs_are_refused_off_cuda(capsys):
    model = randomised_model(CFG)
    with pytest.raises(FlowError, match="needs a CUDA device"):
        StreamGenerator(model, STATS, SampleConfig(cuda_graphs=True), "cpu")
    if not CUDA:
        with pytest.raises(FlowError, match="CUDA GPU"):
            PassGraphs(model)
        with pytest.raises(FlowError, match="CUDA GPU"):
            ChunkGraphs(StreamGenerator(model, STATS, SampleConfig(), "cpu"))
    assert main(["bench", "--device", "cpu", "--sizes", "small", "--backends", "torch,cuda-graphs", "--codec", "none",
                 "--long-chunks", "0", "--train-steps", "0"]) == 2
    assert "needs --device cuda" in capsys.readouterr().err


def test_solver_times_carry_their_value():
    """A velocity reads its time as the float the solver made it from, without touching the tensor (a meta tensor
    has no values: reading one would fail)."""
    seen = []

    def velocity(x, t):
        seen.append(time_value(t))
        return torch.zeros_like(x)

    integrate(velocity, torch.zeros(1, 8, 64, device="meta"), "heun", 2)
    assert seen == [1.0, 0.5, 0.5, 0.0]
    assert time_value(torch.full((1, 8), 0.25)) == 0.25  # a plain tensor: read from its values


@gpu
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_cuda_graphs_equal_eager(amp):
    model = randomised_model(CFG).cuda()
    plain, graphed = _pair(model, "cuda", amp, solver="midpoint", nfe=4, num_samples=2)
    prompt = torch.randn(2, 8, 64)
    a, b = _script(plain, prompt), _script(graphed, prompt)
    tol = 1e-5 if amp is None else 2e-2
    torch.testing.assert_close(b, a, atol=tol, rtol=tol)
    assert graphed.cache.graphs.captured >= 2


@gpu
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_whole_chunk_graphs_equal_eager(amp):
    """The generator's own --cuda-graphs: per-pass graphs while the ring fills, then one replay a chunk."""
    model = randomised_model(CFG).cuda()
    kw = dict(solver="heun", nfe=4, num_samples=2, seed=4)
    plain = StreamGenerator(model, STATS, SampleConfig(**kw), "cuda", amp)
    graphed = StreamGenerator(model, STATS, SampleConfig(cuda_graphs=True, **kw), "cuda", amp)
    prompt = torch.randn(2, 8, 64)
    a, b = _script(plain, prompt), _script(graphed, prompt)
    tol = 1e-5 if amp is None else 2e-2
    torch.testing.assert_close(b, a, atol=tol, rtol=tol)
    assert graphed.chunk_graphs.captured >= 1 and max(e.runs for e in graphed.chunk_graphs._entries.values()) >= 5


@gpu
def test_a_steady_graphed_chunk_does_not_synchronise():
    """Once the ring is full, a chunk is its noise, a fill, a replay and its re-noising: nothing waits for the GPU
    until the chunk is copied back (the noise goes through pinned memory)."""
    model = randomised_model(CFG).cuda()
    g = StreamGenerator(model, STATS, SampleConfig(solver="euler", nfe=2, cuda_graphs=True), "cuda")
    g.prefill(torch.randn(3, 8, 64))
    g.generate(4)  # captured
    with torch.inference_mode():
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                g.add_context(g.solve(g.cfg.temperature * g._noise()))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert g.chunk_graphs.captured == 1 and torch.isfinite(g.cache.k).all()


@gpu
def test_a_graphed_evaluation_does_not_synchronise():
    """Inside a chunk, an evaluation copies its inputs and replays its graph: nothing waits for the GPU."""
    model = randomised_model(CFG).cuda()
    g = StreamGenerator(model, STATS, SampleConfig(solver="euler", nfe=4, cuda_graphs=True), "cuda")
    g.prefill(torch.randn(3, 8, 64))
    g.generate(4)
    x = torch.randn(1, 8, 64, device="cuda")
    with torch.inference_mode():
        g.flush()
        g.velocity(x, _t(1.0, x))  # the chunk's first evaluation builds its mask and tables on the host
        torch.cuda.set_sync_debug_mode("error")
        try:
            for t in (0.75, 0.5, 0.25):
                x = x - 0.25 * g.velocity(x, _t(t, x))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(x).all()


@gpu
def test_bench_times_cuda_graphs_beside_eager(capsys):
    assert main(["bench", "--device", "cuda", "--sizes", "small", "--solvers", "euler", "--nfes", "2",
                 "--backends", "torch,cuda-graphs", "--long-chunks", "0", "--train-steps", "0",
                 "--measure-chunks", "2", "--rerun-chunks", "1", "--codec", "spectral", "--realtime-chunks", "20"]) == 0
    out = capsys.readouterr().out
    assert "cuda-graphs vs eager torch" in out and "realtime engine with CUDA graphs: sustained" in out
