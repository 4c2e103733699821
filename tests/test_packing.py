import pytest
import torch
import torch.nn as nn

from codicodec_flow import packing, quantize
from codicodec_flow.config import ModelConfig, SampleConfig
from codicodec_flow.generate import StreamGenerator, WindowRerunGenerator
from codicodec_flow.latents import LatentStats
from codicodec_flow.packing import MAX_PACKS, PackedLinear, packed_copy, packing_available
from codicodec_flow.quantize import for_generation, streamed_linears
from conftest import randomised_model

CFG = ModelConfig(dim=128, n_layers=2, n_heads=4, cond_dim=64, context_chunks=3)
needs_mkl = pytest.mark.skipif(not packing_available("cpu"), reason="this PyTorch build has no MKL packed GEMM")


@pytest.fixture(scope="module")
def model():
    return randomised_model(CFG)


@pytest.fixture(autouse=True)
def pack_narrow_models(monkeypatch):
    """The tests' models are narrow; pack them as if they were wide enough to gain."""
    monkeypatch.setattr(quantize, "MIN_PACKED_DIM", 0)


def test_only_models_wide_enough_to_gain_are_packed(model, monkeypatch):
    monkeypatch.setattr(quantize, "MIN_PACKED_DIM", CFG.dim + 1)
    assert for_generation(model, "fp32", "cpu") is model


def _stream(model, pack: bool, cfg_scale: float = 1.0) -> torch.Tensor:
    g = StreamGenerator(model, LatentStats.identity(), SampleConfig(solver="heun", nfe=4, cfg_scale=cfg_scale), "cpu",
                        pack=pack)
    g.prefill(torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(1)))
    return g.generate(5)  # past the window: joins, a sliding ring


@needs_mkl
def test_fp32_generation_packs_the_streamed_layers_of_a_copy_sharing_the_weights(model):
    g = for_generation(model, "fp32", "cpu")
    names = set(streamed_linears(model))
    kinds = {name: type(m) for name, m in g.named_modules()}
    assert all(kinds[n] is PackedLinear for n in names) and kinds["proj_in"] is nn.Linear
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n in names)  # the original is untouched
    shared = {id(p) for p in model.parameters()}
    assert all(id(p) in shared for p in g.parameters())  # no copy of the weights
    assert g.state_dict().keys() == model.state_dict().keys()


@needs_mkl
@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_packed_stream_equals_the_plain_one(model, cfg_scale):
    """The same chunks through packed and plain products, with joins and with guidance (16- and 24-row passes)."""
    plain, packed = _stream(model, False, cfg_scale), _stream(model, True, cfg_scale)
    assert torch.allclose(packed, plain, atol=1e-5, rtol=1e-5), (packed - plain).abs().max()


@needs_mkl
def test_a_pack_is_remade_when_the_weight_changes_and_bounded_in_count():
    torch.manual_seed(0)
    lin = nn.Linear(32, 48)
    p = PackedLinear(lin)
    with torch.no_grad():
        x = torch.randn(1, 8, 32)
        for _ in range(2):
            assert torch.allclose(p(x), lin(x), atol=1e-5)
        assert 8 in p._packs
        lin.weight.mul_(-2.0)  # an optimiser step, in place
        assert torch.allclose(p(x), lin(x), atol=1e-5)  # not the stale pack
        for rows in range(1, MAX_PACKS + 3):
            for _ in range(2):  # a row count is packed when it comes again
                y = torch.randn(rows, 32)
                assert torch.allclose(p(y), lin(y), atol=1e-5)
        assert len(p._packs) == MAX_PACKS
        p(torch.randn(40, 32))  # once only, like a prompt's prefill: not packed
        assert 40 not in p._packs


@needs_mkl
def test_gradients_autocast_and_other_dtypes_take_the_plain_product():
    lin = nn.Linear(16, 8)
    p = PackedLinear(lin)
    p(torch.randn(8, 16)).sum().backward()
    assert lin.weight.grad is not None and not p._packs
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert p(torch.randn(8, 16)).dtype == torch.bfloat16  # autocast's product, as nn.Linear gives
    assert not p._packs
    with torch.no_grad():
        p(torch.randn(8, 16))
        p(torch.randn(8, 16))
    assert list(p._packs) == [8]  # float32 without gradients or autocast: packed


def test_nothing_is_packed_where_mkl_or_the_cpu_is_missing(model, monkeypatch):
    assert not packing_available("meta")
    monkeypatch.setattr(packing.torch.backends.mkl, "is_available", lambda: False)
    assert for_generation(model, "fp32", "cpu") is model


@needs_mkl
def test_a_generator_packs_its_steady_passes_when_made(model):
    """The new chunk alone and with a finished chunk joining (twice the rows under guidance): no pass of the
    stream stops to pack."""
    for cfg_scale, rows in ((1.0, [16, 32]), (2.0, [32, 48])):
        g = StreamGenerator(model, LatentStats.identity(), SampleConfig(num_samples=2, cfg_scale=cfg_scale), "cpu")
        assert sorted(g.model.blocks[0].w12._packs) == rows
        g.prefill(torch.randn(2, 3, 8, 64))
        g.generate(3)
        assert sorted(g.model.blocks[0].w12._packs) == rows  # the 48-row prefill did not take a pack


def test_the_window_rerun_reference_keeps_plain_layers(model):
    ref = WindowRerunGenerator(model, LatentStats.identity(), SampleConfig(), "cpu")
    assert ref.model is model


@needs_mkl
def test_a_used_packed_model_can_be_copied_and_packed_again(model):
    import copy
    g = StreamGenerator(model, LatentStats.identity(), SampleConfig(nfe=2), "cpu")
    g.prefill(torch.randn(1, 2, 8, 64))
    g.generate(1)  # packs made
    again = for_generation(g.model, "fp32", "cpu")
    assert again.blocks[0].w12.weight is model.blocks[0].w12.weight
    full = copy.deepcopy(g.model)
    assert full.blocks[0].w12.weight is not model.blocks[0].w12.weight
    assert torch.equal(full.blocks[0].w12.weight, model.blocks[0].w12.weight)


def test_packed_copy_keeps_parameters_shared_for_any_named_layers():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    out = packed_copy(net, ["2"])
    assert type(out[2]) is PackedLinear and type(out[0]) is nn.Linear and out[0].weight is net[0].weight
