import itertools

import pytest
import torch

from codicodec_flow.cache import KVCache
from codicodec_flow.config import MODEL_PRESETS, ModelConfig
from codicodec_flow.model import Chunk, FlowDiT, clean_mask, stream_mask

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, cond_dim=48, context_chunks=3)


def randomised(cfg=CFG, seed=0) -> FlowDiT:
    """A model whose zero-initialised layers are not zero, so every path carries signal."""
    torch.manual_seed(seed)
    m = FlowDiT(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def expected_link(q: int, k: int, n: int, W: int, T: int, uncond: set, valid: set, b: int = 0) -> bool:
    """The mask rule written out token by token: the reference the vectorised mask must equal."""
    q_noisy, k_noisy = q >= n * T, k >= n * T
    qc, kc = (q % (n * T)) // T, (k % (n * T)) // T
    if not q_noisy:
        if k_noisy:
            return False  # clean never sees noisy
        return qc == kc or (0 < qc - kc <= W and (b, kc) in valid)
    if k_noisy:
        return qc == kc  # a noisy chunk sees itself, never other noisy chunks
    return 0 < qc - kc <= W and (b, kc) in valid and (b, qc) not in uncond


def test_stream_mask_exhaustive():
    n, W, T = 5, 2, 2
    uncond = torch.zeros(2, n, dtype=torch.bool)
    uncond[1, 3] = True
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[0, 4] = False
    mask = stream_mask(n, W, T, uncond, valid)
    assert mask.shape == (2, 1, 2 * n * T, 2 * n * T)
    u = {(b, c) for b, c in zip(*torch.nonzero(uncond, as_tuple=True)) for b, c in [(int(b), int(c))]}
    v = {(b, c) for b in range(2) for c in range(n) if valid[b, c]}
    for b, q, k in itertools.product(range(2), range(2 * n * T), range(2 * n * T)):
        assert bool(mask[b, 0, q, k]) == expected_link(q, k, n, W, T, u, v, b), (b, q, k)
    assert mask.any(-1).all(), "every query must see at least one key"


def test_clean_mask_matches_clean_block_of_stream_mask():
    n, W = 6, 2
    L = n * 8
    assert torch.equal(clean_mask(n, W)[0, 0], stream_mask(n, W)[0, 0, :L, :L])


@pytest.mark.parametrize("preset,low,high", [("default", 90e6, 105e6), ("small", 18e6, 22e6)])
def test_preset_sizes(preset, low, high):
    assert low < FlowDiT(MODEL_PRESETS[preset]).num_params() < high


def test_zero_init_predicts_zero_velocity():
    m = FlowDiT(CFG)
    x = torch.randn(1, 16, 64)
    out = m(x, torch.rand(1, 16), torch.arange(16), clean_mask(2, 3))
    assert torch.equal(out, torch.zeros_like(out))


def test_cached_path_equals_full_forward_after_window_slides():
    """The central invariant: append clean chunks one by one, evaluate noisy chunks against the cache,
    and get what the two-stream training forward computes, also after the window has slid."""
    m = randomised()
    n, L, B = 8, 64, 2  # 8 chunks > window 3 + 1
    g = torch.Generator().manual_seed(1)
    clean, noisy = torch.randn(B, L, 64, generator=g), torch.randn(B, L, 64, generator=g)
    s = torch.full((B, L), 0.02)
    t = torch.rand(B, n, generator=g).repeat_interleave(8, 1)
    uncond = torch.zeros(B, n, dtype=torch.bool)
    full = m(torch.cat([clean, noisy], 1), torch.cat([s, t], 1), torch.arange(L).repeat(2), stream_mask(n, 3, 8, uncond))
    full_uncond = m(torch.cat([clean, noisy], 1), torch.cat([s, t], 1), torch.arange(L).repeat(2),
                    stream_mask(n, 3, 8, ~uncond))
    cache = m.new_cache(B)
    k_shape = cache.k.shape
    with torch.no_grad():
        for i in range(n):
            sl = slice(8 * i, 8 * i + 8)
            for _ in range(2):  # evaluating twice must not disturb the cache
                v = m.forward_cached(noisy[:, sl], t[:, sl], cache)
                torch.testing.assert_close(v, full[:, L + 8 * i: L + 8 * i + 8], atol=1e-4, rtol=0)
            vu = m.forward_cached(noisy[:, sl], t[:, sl], cache, use_context=False)
            torch.testing.assert_close(vu, full_uncond[:, L + 8 * i: L + 8 * i + 8], atol=1e-4, rtol=0)
            vc = m.forward_cached(clean[:, sl], s[:, sl], cache)  # the clean chunk as the full forward sees it ...
            torch.testing.assert_close(vc, full[:, sl], atol=1e-4, rtol=0)
            m.append_context(clean[:, sl], s[:, sl], cache)  # ... then made context
    assert cache.k.shape == k_shape and cache.n == n  # a fixed ring: nothing grew


@pytest.mark.parametrize("n_layers", [1, 2])
def test_gradient_causality_across_chunks(n_layers):
    """A noisy chunk's output gets no gradient from later chunks, its own clean twin or other noisy chunks.

    With one layer nothing beyond the window reaches it either; deeper models see further back
    only through the clean chunks inside the window, exactly as cached keys carry their history.
    """
    m = randomised(ModelConfig(dim=64, n_layers=n_layers, n_heads=4, cond_dim=48, context_chunks=3))
    n, W, L = 7, 3, 56
    x = torch.randn(1, 2 * L, 64, requires_grad=True)
    out = m(x, torch.rand(1, 2 * L), torch.arange(L).repeat(2), stream_mask(n, W))
    i = 5
    out[0, L + 8 * i: L + 8 * i + 8].sum().backward()
    g = x.grad[0].abs().sum(-1).view(2, n, 8).sum(-1)  # (stream, chunk) gradient mass
    clean_g, noisy_g = g[0], g[1]
    for c in range(n):
        if i - W <= c <= i - 1:
            assert clean_g[c] > 0, (c, clean_g)
        elif c >= i or n_layers == 1:
            assert clean_g[c] == 0, (c, clean_g)
        assert (noisy_g[c] > 0) == (c == i), (c, noisy_g)


def test_clean_stream_is_causal():
    m = randomised()
    n, L = 5, 40
    x = torch.randn(1, L, 64, requires_grad=True)
    out = m(x, torch.zeros(1, L), torch.arange(L), clean_mask(n, 4))
    out[0, 8 * 2: 8 * 3].sum().backward()
    g = x.grad[0].abs().sum(-1).view(n, 8).sum(-1)
    assert (g[:3] > 0).all() and (g[3:] == 0).all()


def test_narrowed_context_equals_a_model_with_a_smaller_window():
    """cache.set_active(w) makes a W-window model attend like the same weights with window w."""
    m = randomised()
    narrow = FlowDiT(ModelConfig(dim=64, n_layers=2, n_heads=4, cond_dim=48, context_chunks=1))
    narrow.load_state_dict(m.state_dict())
    n, L = 5, 40
    g = torch.Generator().manual_seed(2)
    clean, noisy = torch.randn(1, L, 64, generator=g), torch.randn(1, L, 64, generator=g)
    s, t = torch.full((1, L), 0.02), torch.full((1, L), 0.6)
    full = narrow(torch.cat([clean, noisy], 1), torch.cat([s, t], 1), torch.arange(L).repeat(2), stream_mask(n, 1))
    cache = m.new_cache(1)
    cache.set_active(1)
    with torch.no_grad():
        for i in range(n):
            sl = slice(8 * i, 8 * i + 8)
            v = m.forward_cached(noisy[:, sl], t[:, sl], cache)
            torch.testing.assert_close(v, full[:, L + 8 * i: L + 8 * i + 8], atol=1e-4, rtol=0)
            m.append_context(clean[:, sl], s[:, sl], cache)


def test_batched_prefill_equals_chunk_by_chunk_appends():
    m = randomised()
    g = torch.Generator().manual_seed(3)
    ctx, t = torch.randn(2, 24, 64, generator=g), torch.full((2, 24), 0.02)  # 3 chunks = W
    a, b = m.new_cache(2), m.new_cache(2)
    with torch.no_grad():
        m.prefill(ctx, t, a)
        for i in range(3):
            m.append_context(ctx[:, 8 * i: 8 * i + 8], t[:, :8], b)
        torch.testing.assert_close(a.k[..., :24, :], b.k[..., :24, :], atol=1e-5, rtol=0)
        torch.testing.assert_close(a.v[..., :24, :], b.v[..., :24, :], atol=1e-5, rtol=0)
        x = torch.randn(2, 8, 64, generator=g)
        torch.testing.assert_close(m.forward_cached(x, t[:, :8], a), m.forward_cached(x, t[:, :8], b), atol=1e-5, rtol=0)
    assert a.n == b.n == 3
    with pytest.raises(ValueError, match="empty cache"):
        m.prefill(ctx, t, a)


def test_hours_into_a_stream_the_step_is_as_exact_as_at_its_start():
    """Keys are rotated once at absolute positions: a stream 10 hours in (~420 000 tokens) must give the
    velocities of the same context near position 0: no worse than a shift of a few chunks (float32 rounding of
    any rotation), because the tables are computed in float64 and no key is rotated twice."""
    m = randomised()
    g = torch.Generator().manual_seed(5)
    ctx, x = torch.randn(1, 5, 8, 64, generator=g), torch.randn(1, 8, 64, generator=g)
    s, t = torch.full((1, 8), 0.02), torch.full((1, 8), 0.7)
    late_n = 10 * 3600 * 48_000 // 32_768  # chunks in ten hours
    out = []
    with torch.no_grad():
        for start in (0, 7, late_n):
            cache = m.new_cache(1)
            cache.n = start  # as if `start` chunks had already streamed through
            for i in range(5):  # > window 3: every slot rewritten, the ring wrapped
                m.append_context(ctx[:, i], s, cache)
            out.append(m.forward_cached(x, t, cache))
    near, late = (out[1] - out[0]).abs().max(), (out[2] - out[0]).abs().max()
    assert late <= 1.01 * near + 1e-6 and late < 1e-4, (near, late)


def test_group_tables_kept_across_a_stream_equal_fresh_ones():
    """A cache keeps its masks (by where the ring turns) and rotation tables (64 chunks at a time) across chunks:
    through ring wraps, rewinds, narrowed windows and table refills, every group it hands out must equal the
    one a new cache in the same state computes from nothing."""
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, cond_dim=32, context_chunks=3)
    kept = KVCache.empty(cfg, 1, "cpu", torch.float32, spare=2, scratch=3)
    layouts = [("cond",), ("context", "cond"), ("context", "context", "cond"), ("cond", "uncond"),
               ("context", "cond", "uncond"), ("context",)]
    for step in range(200):
        if step % 37 == 36 and kept.rewindable >= 2:
            kept.rewind(2)
        kept.set_active(2 if step % 50 >= 40 else None)
        for roles in layouts:
            fresh = KVCache.empty(cfg, 1, "cpu", torch.float32, spare=2, scratch=3)
            fresh.n, fresh.valid, fresh.active = kept.n, kept.valid, kept.active
            (mask, rope), (want_mask, want_rope) = kept.group(roles), fresh.group(roles)
            assert (mask is None) == (want_mask is None), (step, roles)
            if mask is not None:
                assert torch.equal(mask, want_mask), (step, roles)
            assert torch.equal(rope[0], want_rope[0]) and torch.equal(rope[1], want_rope[1]), (step, roles)
        kept.n, kept.valid = kept.n + 1, min(kept.valid + 1, kept.slots)
    with pytest.raises(ValueError, match="context chunks come first"):
        kept.group(("cond", "context"))
    # a generating stream in its steady state builds each mask once, in its first turn of the ring
    steady = KVCache.empty(cfg, 1, "cpu", torch.float32)
    steady.n = steady.valid = steady.slots
    built, build = [], steady._build_mask
    steady._build_mask = lambda *a: built.append(a) or build(*a)
    for _ in range(3 * steady.slots):
        steady.group(("context", "cond")), steady.group(("cond",))
        steady.n += 1
    assert len(built) == 2 * steady.slots


def test_device_positions_give_the_host_groups_and_appends():
    """A cache placed at a device position (what a whole-chunk CUDA graph reads) hands out the masks and rotation
    tables its host position gives, hours into a stream too, and its ring append writes the same slots."""
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, cond_dim=32, context_chunks=3)
    layouts = [("cond",), ("context", "cond"), ("context", "context", "cond"), ("cond", "uncond"),
               ("context", "cond", "uncond")]
    for spare, active in [(0, None), (2, None), (0, 2)]:
        for n in list(range(5, 5 + 2 * (3 + spare))) + [4_000_003]:
            host = KVCache.empty(cfg, 1, "cpu", torch.float32, spare=spare, scratch=3)
            host.n, host.valid, host.active = n, host.slots, active
            placed = KVCache.empty(cfg, 1, "cpu", torch.float32, spare=spare, scratch=3)
            placed.n, placed.valid, placed.active = n + 100, placed.slots, active  # tables from an earlier chunk
            placed.seat()
            placed.n = n
            placed.seat()  # moves the tables' window on
            placed.n = 7  # from here the host's n goes unread
            placed.place(True)
            for roles in layouts:
                (mask, rope), (want_mask, want_rope) = placed.group(roles), host.group(roles)
                if want_mask is None:  # a placed group may carry an all-True mask where some ring position needs one
                    assert mask is None or bool(mask.all()), (n, roles)
                else:
                    assert torch.equal(mask, want_mask), (n, roles)
                assert torch.equal(rope[0], want_rope[0]) and torch.equal(rope[1], want_rope[1]), (n, roles)
            for cache in (host, placed):  # two chunks join: their keys and values move into the ring
                cache.k[..., cache.ring_tokens:, :] = torch.arange(3 * 8.0)[:, None]
                cache.v[..., cache.ring_tokens:, :] = -torch.arange(3 * 8.0)[:, None]
                cache.append_scratch(2)
            assert torch.equal(placed.k, host.k) and torch.equal(placed.v, host.v), n
            assert placed.n == 9 and host.n == n + 2
    with pytest.raises(ValueError, match="full ring"):
        KVCache.empty(cfg, 1, "cpu", torch.float32).place(True)


@pytest.mark.parametrize("active", [None, 2])
def test_joined_pass_equals_append_then_step(active):
    """The fused commit: a finished chunk joining the context in the same pass as the next chunk's first
    evaluation gives that evaluation's velocity and the cache contents of two separate passes, also after
    the ring has wrapped (the joining chunk overwrites the slot the new chunk must no longer see)."""
    m = randomised()
    g = torch.Generator().manual_seed(7)
    ctx, xs = torch.randn(2, 7, 8, 64, generator=g), torch.randn(2, 7, 8, 64, generator=g)
    s, t = torch.full((2, 8), 0.02), torch.rand(2, 1, generator=g).expand(2, 8)
    a, b = m.new_cache(2), m.new_cache(2)
    a.set_active(active), b.set_active(active)
    with torch.no_grad():
        for i in range(7):  # window 3: wraps twice
            m.append_context(ctx[:, i], s, a)
            want = m.forward_cached(xs[:, i], t, a)
            got = m.forward_cached(xs[:, i], t, b, join=Chunk(ctx[:, i], s, None, "context"))
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
            assert a.n == b.n == i + 1
            torch.testing.assert_close(b.k[..., :24, :], a.k[..., :24, :], atol=1e-5, rtol=0)
            torch.testing.assert_close(b.v[..., :24, :], a.v[..., :24, :], atol=1e-5, rtol=0)


@pytest.mark.parametrize("joined", [False, True])
def test_guided_pass_equals_two_passes(joined):
    """Classifier-free guidance batched into one pass equals the conditional and unconditional passes apart."""
    m = randomised()
    g = torch.Generator().manual_seed(8)
    ctx, x = torch.randn(1, 5, 8, 64, generator=g), torch.randn(1, 8, 64, generator=g)
    s, t = torch.full((1, 8), 0.02), torch.full((1, 8), 0.6)
    a, b = m.new_cache(1), m.new_cache(1)
    with torch.no_grad():
        for i in range(4):
            m.append_context(ctx[:, i], s, a), m.append_context(ctx[:, i], s, b)
        join = None
        if joined:
            m.append_context(ctx[:, 4], s, a)
            join = Chunk(ctx[:, 4], s, None, "context")
        v_c = m.forward_cached(x, t, a)
        v_u = m.forward_cached(x, t, a, use_context=False)
        got = m.forward_guided(x, t, b, 2.5, join=join)
    torch.testing.assert_close(got, v_u + 2.5 * (v_c - v_u), atol=1e-4, rtol=0)
    assert not torch.allclose(v_c, v_u, atol=1e-3)  # the branches differ, so the test can fail


def test_the_own_chunk_mark_is_seen_alike_by_training_and_the_cache():
    """A model trained with --mark-own: clean chunks marked as its own change what the chunks after them predict and
    nothing before, and the two-stream training forward with the clean stream marked from chunk P on computes what
    the cache does with those chunks appended under the mark. A model without the mark ignores it."""
    from dataclasses import replace
    from codicodec_flow.streams import TwoStreams
    m = randomised(replace(CFG, mark_own=True))
    n, L, B, P = 6, 48, 2, 2
    g = torch.Generator().manual_seed(2)
    clean, noisy = torch.randn(B, L, 64, generator=g), torch.randn(B, L, 64, generator=g)
    s, t = torch.full((B, L), 0.02), torch.rand(B, n, generator=g).repeat_interleave(8, 1)
    own = torch.zeros(B, 2 * L, dtype=torch.bool)
    own[:, 8 * P:L] = True  # the clean stream's chunks P.. are the model's own; noisy chunks never are
    args = (torch.cat([clean, noisy], 1), torch.cat([s, t], 1), torch.arange(L).repeat(2))
    marked, unmarked = m(*args, TwoStreams(n, 3, 8), own), m(*args, TwoStreams(n, 3, 8))
    sees_real = L + 8 * (P + 1)  # noisy chunks 0..P see only real clean chunks
    torch.testing.assert_close(marked[:, :8 * P], unmarked[:, :8 * P])  # clean chunks before P: unmarked, past unmarked
    torch.testing.assert_close(marked[:, L:sees_real], unmarked[:, L:sees_real])
    assert (marked[:, sees_real:] - unmarked[:, sees_real:]).abs().max() > 1e-2
    cache = m.new_cache(B)
    with torch.no_grad():
        for i in range(n):
            sl = slice(8 * i, 8 * i + 8)
            v = m.forward_cached(noisy[:, sl], t[:, sl], cache)
            torch.testing.assert_close(v, marked[:, L + 8 * i: L + 8 * i + 8], atol=1e-4, rtol=0)
            m.append_context(clean[:, sl], s[:, sl], cache, mods=m.conditioning(s[:, sl], own[:, sl]))
    plain = randomised()
    torch.testing.assert_close(plain(*args, TwoStreams(n, 3, 8), own), plain(*args, TwoStreams(n, 3, 8)), atol=0,
                               rtol=0)
