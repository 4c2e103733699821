import pytest
import torch

from codicodec_flow.config import ModelConfig, SampleConfig
from codicodec_flow.generate import StreamGenerator, WindowRerunGenerator
from codicodec_flow.latents import LatentStats
from conftest import randomised_model

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, cond_dim=48, context_chunks=3)
STATS = LatentStats(torch.full((64,), 0.1), torch.full((64,), 0.9), 1)


@pytest.fixture(scope="module")
def model():
    return randomised_model(CFG)


def gen(model, cls=StreamGenerator, **kw):
    kw.setdefault("solver", "euler")
    kw.setdefault("nfe", 4)
    return cls(model, STATS, SampleConfig(**kw), "cpu")


def test_cached_generation_equals_window_rerun_while_history_fits(model):
    """Within the first W chunks the cache and the re-run-the-window reference see the same history:
    the streams must agree; the prompt's prefill goes through the same append path."""
    prompt = torch.randn(2, 8, 64)
    a, b = gen(model, num_samples=2, seed=3), gen(model, WindowRerunGenerator, num_samples=2, seed=3)
    a.prefill(prompt)
    b.prefill(prompt)
    za, zb = a.generate(1), b.generate(1)  # 2 prompt + 1 generated = 3 = W chunks of history
    torch.testing.assert_close(za, zb, atol=1e-4, rtol=0)


@pytest.mark.parametrize("prompt_noise", [0.0, 0.3])
def test_the_prompt_enters_at_its_own_noise_level(model, prompt_noise):
    """The prompt is real music: it becomes context at prompt_noise (default 0: exactly as it is), the model's own
    chunks at context_noise; the cache and the re-run reference agree on both levels, and the stream's noise does
    not depend on them (a prompt level equal to the context level is what generation did before)."""
    assert SampleConfig().prompt_noise == 0.0
    prompt = torch.randn(2, 8, 64)
    kw = dict(num_samples=2, seed=3, context_noise=0.1, prompt_noise=prompt_noise)
    a, b = gen(model, **kw), gen(model, WindowRerunGenerator, **kw)
    a.prefill(prompt)
    b.prefill(prompt)
    z = (prompt - STATS.mean) / STATS.std  # normalised
    noise = b.context - (1 - prompt_noise) * z  # prompt_noise * the noise drawn
    if prompt_noise == 0:
        torch.testing.assert_close(b.context, z.expand(2, -1, -1, -1))  # exactly the prompt
    else:
        assert noise.abs().mean() > 0.1
    assert b.levels == [(prompt_noise, False)] * 2  # (level, under the own-chunk mark: never without one)
    torch.testing.assert_close(a.generate(1), b.generate(1), atol=1e-4, rtol=0)
    assert b.levels == [(prompt_noise, False)] * 2 + [(0.1, False)]
    c, d = gen(model, **{**kw, "prompt_noise": 0.1}), gen(model, **kw)  # the levels change the context, not the
    c.prefill(prompt)  # noise drawn after it
    d.prefill(prompt)
    assert torch.equal(c._noise(), d._noise())


def test_constant_memory_and_flat_state_over_a_long_stream(model):
    g = gen(model, nfe=1)
    ptrs = (g.cache.k.data_ptr(), g.cache.v.data_ptr(), g.cache.k.shape)
    z = g.generate(3 * CFG.context_chunks + 2)
    assert z.shape == (1, 11, 8, 64) and torch.isfinite(z).all()
    assert g.cache.n == 10  # the last chunk waits to join the next pass ...
    g.flush()
    assert (g.cache.k.data_ptr(), g.cache.v.data_ptr(), g.cache.k.shape) == ptrs and g.cache.n == 11  # ... or now


class Unjoined(StreamGenerator):
    """Every context chunk in a pass of its own: the reference for the joined pass."""

    def _append(self, ctx, s, own):
        super()._append(ctx, s, own)
        self.flush()


@pytest.mark.parametrize("kw", [dict(solver="heun", nfe=4), dict(solver="midpoint", nfe=4, cfg_scale=2.0),
                                dict(solver="euler", nfe=2, temperature=0.7)])
def test_joined_context_pass_generates_the_same_stream(model, kw):
    """A finished chunk joining the cache in the next chunk's first pass (NFE passes per chunk, not NFE + 1)
    must not change what is generated, across the window's slide, with and without guidance."""
    a, b = gen(model, seed=4, **kw), gen(model, Unjoined, seed=4, **kw)
    prompt = torch.randn(2, 8, 64)
    a.prefill(prompt)
    b.prefill(prompt)
    za, zb = a.generate(7), b.generate(7)  # window 3: the ring wraps twice
    torch.testing.assert_close(za, zb, atol=1e-4, rtol=0)
    a.flush()
    assert a.cache.n == b.cache.n == 9


def test_seed_reproducible_and_samples_differ(model):
    a = gen(model, seed=5, num_samples=3).generate(2)
    b = gen(model, seed=5, num_samples=3).generate(2)
    c = gen(model, seed=6, num_samples=3).generate(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.allclose(a[0], a[1])  # the variations of one batch are not copies


def test_temperature_zero_is_noise_free(model):
    """Temperature scales the starting noise: at 0 the output does not depend on the seed's
    starting noise (only the small context noise differs, so compare the first chunk)."""
    a = gen(model, seed=1, temperature=0.0).generate(1)
    b = gen(model, seed=2, temperature=0.0).generate(1)
    torch.testing.assert_close(a, b)
    hot = gen(model, seed=1, temperature=2.0).generate(1)
    cold = gen(model, seed=1, temperature=0.5).generate(1)
    assert hot.std() > cold.std()


def test_guidance_blends_conditional_and_unconditional(model):
    prompt = torch.randn(2, 8, 64)
    outs = {}
    for scale in (0.0, 1.0, 2.0):
        g = gen(model, seed=1, cfg_scale=scale, nfe=1)
        g.prefill(prompt)
        outs[scale] = g.generate(1)
    g = gen(model, seed=1, nfe=1)  # no prompt: the unconditional branch alone ...
    g._noise(), g._noise()  # ... with the random stream where the prefill's two appends left it
    uncond = g.generate(1)
    torch.testing.assert_close(outs[0.0], uncond, atol=1e-5, rtol=0)
    # Euler with one step is linear in v: scale 2 = 2 * cond - uncond
    torch.testing.assert_close(outs[2.0], 2 * outs[1.0] - outs[0.0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("solver", ["euler", "heun", "midpoint", "rk4", "dpmpp", "pingpong"])
def test_every_solver_generates(model, solver):
    z = gen(model, solver=solver, nfe=4).generate(2)
    assert z.shape == (1, 2, 8, 64) and torch.isfinite(z).all()


def test_default_nfe_is_spent_in_whole_steps(model):
    default = SampleConfig().nfe
    assert gen(model, solver="heun", nfe=default).steps == default // 2
    assert gen(model, solver="rk4", nfe=default).steps == default // 4
    assert gen(model, solver="heun", nfe=5).evals == 6  # rounded to whole steps, halves up
    with pytest.raises(ValueError, match="nfe"):
        SampleConfig(nfe=0)


def test_the_models_own_chunks_go_in_marked_once_its_window_holds_no_real_music(model):
    """A model trained with --mark-own: the prompt and a performer's chunks go in as real music, and so do the model's
    first W chunks after them (teacher forcing's setting: the plain model's continuation); once the W chunks before
    one are all the model's own, it goes in under the mark. The cache and the re-run reference agree on that, the
    mark changes what follows (for a model without it, nothing), and a rewind takes the chunks' origins back too.
    (test_model checks the marked cache against the training forward.)"""
    from dataclasses import replace
    from codicodec_flow.latents import normalise
    from codicodec_flow.realtime.generator import LiveGenerator
    marked = randomised_model(replace(CFG, mark_own=True))  # W = 3
    prompt = torch.randn(2, 8, 64)
    a, b = gen(marked, num_samples=2, seed=3), gen(marked, WindowRerunGenerator, num_samples=2, seed=3)
    for g in (a, b):
        g.prefill(prompt)
    a.generate(6)
    b.generate(6)
    cn = SampleConfig().context_noise
    assert b.levels == [(cn, True)] * 3  # own chunks 4-6: the 3 before each were the model's
    assert [level for _, level in a._pending] == [(cn, True)]  # the 6th, waiting to join the next pass
    c = gen(marked, num_samples=2, seed=3)
    c.prefill(prompt)
    c.generate(4)
    assert [level for _, level in c._pending] == [(cn, True)]  # the 4th: its window holds chunks 1-3
    c.rewind(1)
    c.add_context(torch.zeros(2, 8, 64), own=False)  # real music in its place ...
    c.add_context(torch.zeros(2, 8, 64))
    assert c._pending[-1][1] == (cn, False)  # ... keeps the next own chunk unmarked

    def after_a_full_window(m, mark_last):
        g = gen(m, num_samples=2, seed=3)
        g.prefill(prompt)
        g.generate(3)
        g.add_context(normalise(g.next_chunk(as_context=False), STATS), own=mark_last)
        return g.generate(1)
    assert (after_a_full_window(marked, True) - after_a_full_window(marked, False)).abs().max() > 1e-2
    torch.testing.assert_close(after_a_full_window(model, True), after_a_full_window(model, False), atol=1e-5, rtol=0)
    live = gen(marked, LiveGenerator)
    live.generate(4)
    assert [level for _, level in live._pending] == [(cn, True)]
    live.add_context_latents(prompt[0])  # a performer's chunk: real music, and in view again
    live.generate(1)
    assert [level for _, level in live._pending] == [(cn, False)]
