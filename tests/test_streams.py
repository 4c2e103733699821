"""The training step's attention: the block-sparse paths equal the dense two-stream mask, and the noisy-chunks knob
trains exactly what the full batch trains on the chunks it keeps."""
from dataclasses import replace

import pytest
import torch

from codicodec_flow.config import FlowConfig, ModelConfig
from codicodec_flow.flow import flow_loss, make_batch, training_batch
from codicodec_flow.model import stream_mask
from codicodec_flow.streams import FlexPlan, TwoStreams, flex_available
from conftest import randomised_model

W = 3
CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, cond_dim=48, context_chunks=W)


def layout(n: int, B: int = 3, kept=None, seed: int = 0, **kw) -> TwoStreams:
    """A layout with padding at the end of two crops and a few unconditional noisy chunks."""
    g = torch.Generator().manual_seed(seed)
    valid = torch.ones(B, n, dtype=torch.bool)
    valid[0, max(1, n - 2):] = False
    valid[-1, n - 1] = False
    K = n if kept is None else len(kept)
    uncond = torch.rand(B, K, generator=g) < 0.3
    return TwoStreams(n, W, 8, valid, uncond, None if kept is None else torch.tensor(kept), **kw)


def inputs(st: TwoStreams, B: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, st.tokens, 64, generator=g)
    chunks = st.n_chunks + len(st.noisy_chunks)
    t = torch.rand(B, chunks, generator=g).repeat_interleave(8, 1)  # one time per chunk, as flow.py makes them
    return x, t


def forward_and_grads(model, x, t, pos, mask):
    x = x.clone().requires_grad_()
    out = model(x, t, pos, mask)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    grads = [x.grad] + [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.mark.parametrize("n,kept,block", [
    (2, None, 8),  # crop shorter than the window
    (3, None, 1),  # crop as long as the window, one chunk per block
    (9, None, 2),  # longer than the window: the band slides
    (9, None, 4),  # blocks that do not divide the crop
    (9, [0, 3, 4, 8], 2),  # a few noisy chunks kept
    (9, [6], 8),  # one
])
def test_block_sparse_forward_equals_the_dense_mask(n, kept, block):
    """Outputs and gradients (inputs and every weight), fp32, with padding and unconditional chunks."""
    model = randomised_model(CFG)
    st = layout(n, kept=kept, block_chunks=block, kernel="blocks")
    x, t = inputs(st)
    pos = st.positions()
    want, want_g = forward_and_grads(model, x, t, pos, st.mask())  # per-token adaLN, one SDPA under the mask
    got, got_g = forward_and_grads(model, x, t, pos, st)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for a, b in zip(got_g, want_g):  # a weight's gradient sums over every token: fp32 rounding scales with it
        assert (a - b).abs().max() <= 1e-5 * b.abs().max(), ((a - b).abs().max(), b.abs().max())
    assert want.abs().max() > 0.1 and want_g[0].abs().max() > 0  # signal flows, so the test can fail


def test_block_sparse_forward_is_exact_in_float64():
    """The same computation, not an approximation: in float64 the two paths agree to rounding."""
    model = randomised_model(CFG).double()
    st = layout(9, kept=[0, 3, 4, 8], block_chunks=2, kernel="blocks")
    x, t = (a.double() for a in inputs(st))
    want, want_g = forward_and_grads(model, x, t, st.positions(), st.mask())
    got, got_g = forward_and_grads(model, x, t, st.positions(), st)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-11)


def test_dense_kernel_equals_the_dense_mask():
    model = randomised_model(CFG)
    st = layout(9, kept=[1, 2, 7], kernel="dense")
    x, t = inputs(st)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, st.positions(), st), model(x, t, st.positions(), st.mask()),
                                   atol=1e-5, rtol=0)


@pytest.mark.skipif(not flex_available(), reason="FlexAttention needs torch >= 2.5")
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_mask_mod_equals_the_dense_mask(monkeypatch):
    """The FlexAttention rule, run uncompiled on the CPU (forward only: FlexAttention has no CPU backward)."""
    model = randomised_model(CFG)
    st = layout(9, kept=[0, 2, 5, 8])
    x, t = inputs(st)
    monkeypatch.setattr(TwoStreams, "plan", lambda self, device=None: FlexPlan(self, torch.device("cpu"), compiled=False))
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, st.positions(), st), model(x, t, st.positions(), st.mask()),
                                   atol=1e-5, rtol=0)


def test_kept_noisy_chunks_see_what_they_see_in_the_full_layout():
    """The mask with K kept noisy chunks is the full mask's rows and columns of the clean stream and those chunks."""
    n, kept = 7, [1, 4, 5]
    full = layout(n, seed=3)
    part = replace(full, uncond=full.uncond[:, kept], kept=torch.tensor(kept))
    idx = torch.cat([torch.arange(n * 8), n * 8 + (torch.tensor(kept)[:, None] * 8 + torch.arange(8)).flatten()])
    assert torch.equal(part.mask(), full.mask()[:, :, idx][:, :, :, idx])
    assert torch.equal(part.positions(), torch.arange(n * 8).repeat(2)[idx])
    assert torch.equal(stream_mask(n, W, 8, full.uncond, full.valid), full.mask())


def test_blocks_compute_under_half_the_dense_scores():
    """The issue's crop, 32 chunks at W = 32: the dense mask computes (2L)^2 scores, the plan's blocks 44 % of them."""
    st = TwoStreams(32, 32, 8, torch.ones(1, 32, dtype=torch.bool))
    plan = st.plan("cpu")
    computed = sum(m.shape[-2] * m.shape[-1] for m in plan.masks)
    assert computed / st.tokens ** 2 == pytest.approx(0.4375)
    seen = st.mask().sum()
    assert all(m.any(-1).all() for m in plan.masks) and seen < computed  # no empty row, and still some waste


def test_all_noisy_chunks_is_todays_batch_and_loss():
    """--noisy-chunks n draws nothing more and trains the full batch: the loss of the dense per-token forward."""
    model = randomised_model(CFG)
    x, valid = torch.randn(2, 48, 64), torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    a = training_batch(x, valid, FlowConfig(), W, 8, torch.Generator().manual_seed(4))
    b = training_batch(x, valid, FlowConfig(), W, 8, torch.Generator().manual_seed(4), noisy_chunks=6)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.target, b.target) and b.streams.kept is None
    loss, per_chunk = flow_loss(model, b)
    dense = model(a.inputs, a.times, a.pos, a.mask)[:, 48:]  # the forward before the fast path
    err = (dense - a.target).pow(2).mean(-1).view(2, 6, 8).mean(-1)
    torch.testing.assert_close(per_chunk, err, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(loss, (err * valid).sum() / valid.sum(), atol=1e-6, rtol=1e-5)


def test_fewer_noisy_chunks_train_the_same_chunks_for_less():
    """K < n: the noisy stream shrinks to K chunks, whose inputs, targets and per-chunk losses are the full batch's."""
    model = randomised_model(CFG)
    n, K = 8, 3
    x, valid = torch.randn(2, 8 * n, 64), torch.ones(2, n, dtype=torch.bool)
    valid[1, 6:] = False
    full = training_batch(x, valid, FlowConfig(p_uncond=0.5), W, 8, torch.Generator().manual_seed(5))
    part = training_batch(x, valid, FlowConfig(p_uncond=0.5), W, 8, torch.Generator().manual_seed(5), noisy_chunks=K)
    kept = part.streams.kept
    assert len(kept) == K and torch.equal(kept, kept.sort().values)
    assert part.inputs.shape == (2, 8 * (n + K), 64) and part.target.shape == (2, 8 * K, 64)
    tokens = (kept[:, None] * 8 + torch.arange(8)).flatten()
    assert torch.equal(part.inputs[:, :8 * n], full.inputs[:, :8 * n])  # the whole clean stream: full context
    assert torch.equal(part.inputs[:, 8 * n:], full.inputs[:, 8 * n + tokens])
    assert torch.equal(part.target, full.target[:, tokens]) and torch.equal(part.t, full.t[:, kept])
    assert torch.equal(part.streams.uncond, full.streams.uncond[:, kept])
    _, per_full = flow_loss(model, full)
    loss, per_part = flow_loss(model, part)
    torch.testing.assert_close(per_part, per_full[:, kept], atol=1e-5, rtol=1e-5)
    w = valid[:, kept].float()
    torch.testing.assert_close(loss, (per_part * w).sum() / w.sum())


def test_validation_batches_keep_every_chunk():
    b = make_batch(torch.randn(2, 32, 64), torch.ones(2, 4, dtype=torch.bool), torch.rand(2, 4), torch.zeros(2, 4),
                   torch.zeros(2, 4, dtype=torch.bool), W, 8)
    assert b.streams.kept is None and b.target_valid.shape == (2, 4) and b.mask.shape == (2, 1, 64, 64)
