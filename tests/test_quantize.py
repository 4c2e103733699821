import pytest
import torch
import torch.nn as nn

from codicodec_flow.config import ModelConfig, SampleConfig
from codicodec_flow.errors import FlowError
from codicodec_flow.generate import StreamGenerator
from codicodec_flow.latents import LatentStats
from codicodec_flow.quantize import for_generation, streamed_linears
from conftest import randomised_model

CFG = ModelConfig(dim=128, n_layers=2, n_heads=4, cond_dim=64, context_chunks=3)


@pytest.fixture(scope="module")
def model():
    return randomised_model(CFG)


def test_int8_quantizes_only_the_streamed_layers_of_a_copy(model):
    q = for_generation(model, "int8", "cpu")
    names = set(streamed_linears(model))
    assert names == {f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.out", "w12", "w3")}
    kinds = {name: type(m) for name, m in q.named_modules()}
    assert all(kinds[n] is not nn.Linear and "quantized" in kinds[n].__module__ for n in names)
    assert kinds["proj_in"] is nn.Linear and kinds["proj_out"] is nn.Linear and kinds["blocks.0.ada.1"] is nn.Linear
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n in names)  # the original is untouched
    assert for_generation(model, "fp32", "cpu", pack=False) is model


def test_int8_generation_stays_close_to_fp32(model):
    """Same seed, same prompt: int8 chunks follow the fp32 ones closely (the cost `eval` measures on music)."""
    prompt = torch.randn(3, 8, 64, generator=torch.Generator().manual_seed(1))
    out = {}
    for precision in ("fp32", "int8"):
        g = StreamGenerator(model, LatentStats.identity(), SampleConfig(solver="euler", nfe=4, precision=precision), "cpu")
        g.prefill(prompt)
        out[precision] = g.generate(4)
    err = (out["int8"] - out["fp32"]).norm() / out["fp32"].norm()
    assert 0 < err < 0.05, err


def test_int8_is_refused_off_the_cpu_and_unknown_precisions(model):
    with pytest.raises(FlowError, match="CPU only"):
        for_generation(model, "int8", "meta")
    with pytest.raises(ValueError, match="precision"):
        SampleConfig(precision="int4")
