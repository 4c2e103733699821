import torch

from codicodec_flow.config import FlowConfig, ModelConfig
from codicodec_flow.flow import (flow_loss, interpolate, make_batch, sample_times, target_velocity, training_batch,
                                 validation_loss)
from codicodec_flow.model import FlowDiT


def test_path_endpoints_and_velocity():
    x, eps = torch.randn(2, 16, 64), torch.randn(2, 16, 64)
    assert torch.equal(interpolate(x, eps, torch.zeros(2, 16)), x)
    assert torch.equal(interpolate(x, eps, torch.ones(2, 16)), eps)
    t = torch.full((2, 16), 0.3)
    # d/dt x_t = eps - x: a finite difference along the path agrees
    fd = (interpolate(x, eps, t + 1e-3) - interpolate(x, eps, t - 1e-3)) / 2e-3
    torch.testing.assert_close(fd, target_velocity(x, eps), atol=1e-3, rtol=1e-3)


def test_time_distributions():
    g = torch.Generator().manual_seed(0)
    ln = sample_times((20000,), FlowConfig(t_dist="logit_normal"), g)
    un = sample_times((20000,), FlowConfig(t_dist="uniform"), g)
    assert 0 < ln.min() and ln.max() < 1 and abs(ln.mean() - 0.5) < 0.01 and ln.std() < un.std()


def test_two_stream_batch_layout():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 32, 64)
    valid = torch.ones(3, 4, dtype=torch.bool)
    t = torch.tensor([[0.0, 0.5, 1.0, 0.2]]).expand(3, 4)
    s = torch.zeros(3, 4)
    b = make_batch(x, valid, t, s, torch.zeros(3, 4, dtype=torch.bool), window=2, chunk_tokens=8, generator=g)
    assert b.inputs.shape == (3, 64, 64) and b.times.shape == (3, 64) and b.mask.shape == (3, 1, 64, 64)
    assert torch.equal(b.inputs[:, :32], x)  # clean stream at s = 0 is the data
    assert torch.equal(b.inputs[:, 32:40], x[:, :8])  # noisy chunk 0 at t = 0 is the data too
    assert torch.equal(b.times[:, 32:], t.repeat_interleave(8, 1))
    eps = b.target + x
    torch.testing.assert_close(b.inputs[:, 48:56], eps[:, 16:24])  # t = 1: pure noise
    tb = training_batch(x, valid, FlowConfig(context_noise_max=0.1, p_uncond=0.5), 2, 8, g)
    assert (tb.times[:, :32] <= 0.1).all() and (tb.times[:, :32] >= 0).all()


class Oracle(torch.nn.Module):
    """Returns a given velocity for the noisy stream: the loss must be exactly its error."""

    def __init__(self, v):
        super().__init__()
        self.v = v

    def forward(self, x, t, pos, mask, own=None):
        return torch.cat([torch.zeros_like(self.v), self.v], dim=1)


def test_loss_is_masked_mean_over_valid_chunks():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 24, 64)
    valid = torch.tensor([[True, True, False], [True, True, True]])
    b = training_batch(x, valid, FlowConfig(), 2, 8, g)
    loss, per_chunk = flow_loss(Oracle(b.target), b)
    assert loss == 0 and per_chunk.shape == (2, 3)
    wrong = b.target.clone()
    wrong[0, 16:24] += 100.0  # error only on a padded chunk: ignored
    assert flow_loss(Oracle(wrong), b)[0] == 0
    wrong[1, 0:8] += 1.0  # error 1 on one of 5 valid chunks
    torch.testing.assert_close(flow_loss(Oracle(wrong), b)[0], torch.tensor(1 / 5))


def test_validation_is_deterministic_and_context_matters():
    torch.manual_seed(0)
    m = FlowDiT(ModelConfig(dim=32, n_layers=1, n_heads=2, cond_dim=32, context_chunks=2))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    crops = [(torch.randn(1, 32, 64), torch.ones(1, 4, dtype=torch.bool))]
    a = validation_loss(m, crops, 0.02, "cpu")
    b = validation_loss(m, crops, 0.02, "cpu")
    c = validation_loss(m, crops, 0.02, "cpu", use_context=False)
    assert a == b and a["loss"] != c["loss"] and len(a["by_t"]) == 7
