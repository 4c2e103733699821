import pytest
import torch

from codicodec_flow.config import FlowConfig, ModelConfig
from codicodec_flow.flow import training_batch
from codicodec_flow.model import FlowDiT
from codicodec_flow.rollout import RolloutConfig, rollout_context, time_caps

CFG = ModelConfig(dim=32, n_layers=1, n_heads=2, cond_dim=32, context_chunks=4)


def model():
    torch.manual_seed(0)
    m = FlowDiT(CFG)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.train()


def test_rollout_context_keeps_the_prompt_and_generates_the_rest_reproducibly():
    m, x = model(), torch.randn(3, 6 * 8, 64)
    ctx, P = rollout_context(m, x, RolloutConfig(p=1.0, nfe=2), 0.02, torch.Generator().manual_seed(4))
    again, P2 = rollout_context(m, x, RolloutConfig(p=1.0, nfe=2), 0.02, torch.Generator().manual_seed(4))
    assert 1 <= P <= 5 and P == P2 and torch.equal(ctx, again)  # a function of the generator: resume stays exact
    assert torch.equal(ctx[:, : P * 8], x[:, : P * 8])  # the real prompt
    assert not torch.allclose(ctx[:, P * 8:], x[:, P * 8:])  # the model's own continuation
    assert torch.isfinite(ctx).all() and m.training  # the model is left in training mode


def test_rollout_context_fills_only_the_clean_stream():
    """Targets and noisy inputs stay the real chunks; the clean stream (what the noisy chunks see) changes."""
    x, ctx = torch.randn(2, 32, 64), torch.randn(2, 32, 64)
    valid = torch.ones(2, 4, dtype=torch.bool)
    plain = training_batch(x, valid, FlowConfig(), 4, 8, torch.Generator().manual_seed(1))
    rolled = training_batch(x, valid, FlowConfig(), 4, 8, torch.Generator().manual_seed(1), context=ctx)
    assert torch.equal(plain.target, rolled.target) and torch.equal(plain.inputs[:, 32:], rolled.inputs[:, 32:])
    assert not torch.allclose(plain.inputs[:, :32], rolled.inputs[:, :32])


def test_rollout_settings_are_checked():
    with pytest.raises(ValueError, match="rollout-p"):
        RolloutConfig(p=1.5)


def test_time_caps_limit_only_the_chunks_with_a_self_made_past():
    """Chunk P's past is the real opening; chunks P + 1 on see the model's own chunks and train at t <= max_t."""
    assert torch.equal(time_caps(6, 2, 0.8), torch.tensor([1, 1, 1, 0.8, 0.8, 0.8]))
    assert time_caps(6, 2, 1.0) is None


def test_capped_times_scale_the_same_draws_and_change_nothing_else():
    x, valid = torch.randn(2, 6 * 8, 64), torch.ones(2, 6, dtype=torch.bool)
    caps = time_caps(6, 3, 0.5)
    plain = training_batch(x, valid, FlowConfig(), 4, 8, torch.Generator().manual_seed(1))
    capped = training_batch(x, valid, FlowConfig(), 4, 8, torch.Generator().manual_seed(1), max_t=caps)
    assert torch.allclose(capped.t, plain.t * caps) and (capped.t[:, 4:] <= 0.5).all()
    assert torch.equal(capped.t[:, :4], plain.t[:, :4])
    assert torch.equal(capped.target, plain.target) and torch.equal(capped.inputs[:, :48], plain.inputs[:, :48])
