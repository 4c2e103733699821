"""Export: the ONNX graphs give PyTorch's cached path (velocities and cache) past the window's wrap, the realtime
onnxruntime backend plays the torch backend's audio, bench has its row, and Core ML converts."""
import functools
import json
from dataclasses import asdict, replace

import numpy as np
import pytest
import soundfile as sf
import torch

from codicodec_flow.checkpoint import inference_dict, save_checkpoint
from codicodec_flow.codec import CHUNK_SECONDS
from codicodec_flow.commands.cli import main
from codicodec_flow.config import LIVE_SAMPLING, FlowConfig, ModelConfig
from codicodec_flow.errors import FlowError
from codicodec_flow.export import GRAPHS, cache_shape, mods_width, signatures
from codicodec_flow.latents import LatentStats
from codicodec_flow.model import FlowDiT
from codicodec_flow.realtime.engine import EngineConfig
from codicodec_flow.realtime.ort_backend import OrtModel, load_onnx, read_description
from codicodec_flow.realtime.session import RealtimeConfig, run_realtime
from codicodec_flow.rope import apply_rope, rope_table
from conftest import randomised_model, write_audio

CFG = ModelConfig(dim=32, n_layers=2, n_heads=2, cond_dim=32, context_chunks=3)
W, T = CFG.context_chunks, CFG.chunk_tokens
STATS = LatentStats(torch.linspace(-1.0, 1.0, 64), torch.full((64,), 0.8), 100)


@functools.lru_cache(maxsize=1)
def tiny_model() -> FlowDiT:
    return randomised_model(CFG).requires_grad_(False)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "ema.pt"
    save_checkpoint(inference_dict(tiny_model().state_dict(), CFG, FlowConfig(), STATS,
                                   {"name": "spectral", "version": "1"}, 7), path)
    return path


@pytest.fixture(scope="module")
def onnx_dir(ckpt):
    """The command's own export (with its check against PyTorch), shared by the tests below."""
    out = ckpt.parent / "onnx"
    assert main(["export", "--ckpt", str(ckpt), "--format", "onnx", "--out", str(out)]) == 0
    return out


def test_export_writes_the_graphs_and_their_description(onnx_dir, capsys):
    desc = read_description(onnx_dir)
    assert sorted(p.name for p in onnx_dir.iterdir()) == ["append.onnx", "conditioning.onnx", "export.json",
                                                          "step.onnx"]  # no temporaries left
    assert desc["model"] == asdict(CFG) and desc["step"] == 7 and desc["codec"]["name"] == "spectral"
    assert desc["stats"]["mean"] == pytest.approx(STATS.mean.tolist())
    cache = list(cache_shape(CFG))
    assert cache == [2, 1, 2, W * T, 16]
    step = desc["signatures"]["step"]
    assert list(step["inputs"]) == ["x", "mods", "keys_rot", "values", "n", "context"]
    assert step["inputs"]["keys_rot"] == {"shape": cache, "dtype": "float32"}
    assert step["inputs"]["mods"]["shape"] == [1, T, mods_width(CFG)] and step["inputs"]["n"]["dtype"] == "int64"
    assert list(desc["signatures"]["append"]["outputs"]) == ["keys_out", "keys_rot_out", "values_out"]
    ort = OrtModel(onnx_dir)
    for g in GRAPHS:  # what onnxruntime reads is what the description says
        sig = desc["signatures"][g]
        assert [(i.name, i.shape) for i in ort.sessions[g].get_inputs()] == [(k, v["shape"]) for k, v in
                                                                             sig["inputs"].items()]
        assert [o.name for o in ort.sessions[g].get_outputs()] == list(sig["outputs"])


def _ring_slot(cache, chunk: int) -> slice:
    s = (chunk % W) * T
    return slice(s, s + T)


def test_onnx_round_trip_equals_torchs_cached_path_past_the_wrap(onnx_dir):
    """Prefill, then chunk after chunk until the ring has wrapped three times: every velocity (whole window, a
    shorter context, no context) and the cache after every append agree with PyTorch's own cached path."""
    model, ort = tiny_model(), OrtModel(onnx_dir, threads=1)
    g = torch.Generator().manual_seed(1)
    cache = model.new_cache(1)
    prompt = torch.randn(1, 2 * T, 64, generator=g)
    with torch.inference_mode():
        model.prefill(prompt, torch.full((1, 2 * T), 0.02), cache)  # one masked pass ...
        mods = ort.conditioning(np.full((1, T), 0.02, np.float32))
        for k in range(2):
            ort.append(prompt[:, k * T:(k + 1) * T].numpy(), mods)  # ... is one append per chunk
        worst = 0.0
        for step in range(3 * W + 1):
            x = torch.randn(1, T, 64, generator=g)
            t = torch.rand(1, T, generator=g)  # per-token times
            tm = ort.conditioning(t.numpy())
            for context in (None, 1):
                cache.set_active(context)
                ort.set_active(context)
                v = model.forward_cached(x, t, cache)
                worst = max(worst, float((v - torch.from_numpy(ort.velocity(x.numpy(), tm))).abs().max()))
            v_u = model.forward_cached(x, t, cache, use_context=False)
            worst = max(worst, float((v_u - torch.from_numpy(ort.velocity(x.numpy(), tm, use_context=False)))
                                     .abs().max()))
            assert not torch.allclose(v, v_u, atol=1e-3)  # the context matters, so the masks are tested
            cache.set_active(None)
            ort.set_active(None)
            ctx, s = torch.randn(1, T, 64, generator=g), torch.full((1, T), 0.02)
            model.append_context(ctx, s, cache)
            ort.append(ctx.numpy(), ort.conditioning(s.numpy()))
            n = cache.n
            assert ort.n == n
            for c in range(W):  # window chunk c holds chunk n - W + c
                chunk = n - W + c
                rows = slice(c * T, (c + 1) * T)
                keys = torch.from_numpy(ort.keys[..., rows, :])
                positions = torch.arange(chunk * T, (chunk + 1) * T)  # torch keeps keys rotated at their own place
                torch.testing.assert_close(apply_rope(keys, *rope_table(positions, 16, CFG.rope_base)),
                                           cache.k[..., _ring_slot(cache, chunk), :], atol=1e-5, rtol=0)
                torch.testing.assert_close(torch.from_numpy(ort.values[..., rows, :]),
                                           cache.v[..., _ring_slot(cache, chunk), :], atol=1e-5, rtol=0)
                torch.testing.assert_close(torch.from_numpy(ort.keys_rot[..., rows, :]),  # window-relative places
                                           apply_rope(keys, *rope_table(torch.arange(c * T, (c + 1) * T), 16,
                                                                        CFG.rope_base)), atol=1e-5, rtol=0)
    assert n == 2 + 3 * W + 1 and worst <= 1e-4


def _session(ckpt, tmp_path, name, **kw):
    prompt = write_audio(tmp_path / "prompt.wav", 2 * CHUNK_SECONDS + 0.1)
    cfg = RealtimeConfig(ckpt=str(ckpt), device="cpu", sink="null", engine=EngineConfig(max_chunks=5),
                         sample=replace(LIVE_SAMPLING, seed=3, cfg_scale=1.5), context_chunks=2,
                         prompt_wav=str(prompt), save=str(tmp_path / name), keyboard=False, plain=True, **kw)
    result = run_realtime(cfg)
    assert result.summary.chunks == 5
    return sf.read(str(result.saved))[0]


def test_realtime_onnxruntime_backend_plays_the_torch_backends_audio(ckpt, onnx_dir, tmp_path, capsys):
    """Same seed, prompt, guidance and context limit: the same audio, within float rounding."""
    torch_audio = _session(ckpt, tmp_path, "torch.wav")
    ort_audio = _session(ckpt, tmp_path, "ort.wav", backend="onnxruntime", onnx=str(onnx_dir))
    assert "(onnxruntime)" in capsys.readouterr().out
    assert np.abs(torch_audio).max() > 1e-3
    np.testing.assert_allclose(ort_audio, torch_audio, atol=1e-4)


def test_realtime_command_runs_an_export_and_refuses_mistakes(ckpt, onnx_dir, tmp_path, capsys):
    base = ["realtime", "--ckpt", str(ckpt), "--sink", "null", "--max-chunks", "2", "--no-keys", "--plain"]
    assert main([*base, "--backend", "onnxruntime", "--onnx", str(onnx_dir)]) == 0
    assert "on cpu (onnxruntime)" in capsys.readouterr().out
    assert main([*base, "--device", "cpu", "--onnx", str(onnx_dir)]) == 2
    assert "--onnx applies to --backend onnxruntime" in capsys.readouterr().err
    assert main([*base, "--backend", "onnxruntime", "--precision", "int8"]) == 2
    assert "--precision int8 applies to --backend torch" in capsys.readouterr().err
    assert main([*base, "--backend", "onnxruntime", "--cuda-graphs"]) == 2
    assert "--cuda-graphs applies to --backend torch" in capsys.readouterr().err
    with pytest.raises(FlowError, match="made from another checkpoint"):  # other statistics
        load_onnx(tiny_model(), LatentStats(STATS.mean + 1, STATS.std, 100), onnx_dir)
    with pytest.raises(FlowError, match="made from another checkpoint"):  # other weights of the same shape
        load_onnx(FlowDiT(CFG), STATS, onnx_dir)
    with pytest.raises(FlowError, match="not an ONNX export"):
        OrtModel(tmp_path)
    assert main(["export", "--ckpt", str(ckpt), "--out", str(ckpt)]) == 2  # a file, not a folder
    assert "is a file" in capsys.readouterr().err


def test_bench_reports_onnxruntime_beside_eager_torch(tmp_path, capsys):
    """The row and the verdict are there (structure only: speeds are figures, never test thresholds)."""
    out = tmp_path / "bench.json"
    assert main(["bench", "--device", "cpu", "--sizes", "tiny", "--nfes", "2", "--solvers", "euler",
                 "--measure-chunks", "1", "--rerun-chunks", "0", "--long-chunks", "0", "--train-steps", "0",
                 "--realtime-chunks", "0", "--codec", "none", "--context-chunks", "2",
                 "--backends", "torch,onnxruntime", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["generation"]
    assert [r["backend"] for r in rows] == ["torch", "onnxruntime"]
    assert rows[1]["cached_s"] > 0 and rows[1]["vs_torch"] == pytest.approx(rows[0]["cached_s"] / rows[1]["cached_s"])
    assert "onnxruntime vs eager torch" in capsys.readouterr().out
    assert main(["bench", "--sizes", "tiny", "--backends", "tensorrt"]) == 2


def test_coreml_conversion_writes_packages_with_the_signature(ckpt, tmp_path):
    """Converted and saved here (Linux); predicting needs macOS and is not run."""
    ct = pytest.importorskip("coremltools", reason="coremltools is not installed (pip install -e '.[export]')")
    out = tmp_path / "coreml"
    assert main(["export", "--ckpt", str(ckpt), "--format", "coreml", "--out", str(out)]) == 0
    desc = json.loads((out / "export.json").read_text())
    assert desc["format"] == "coreml" and desc["signatures"]["step"]["inputs"]["n"]["dtype"] == "int32"
    for g in GRAPHS:
        spec = ct.models.MLModel(str(out / f"{g}.mlpackage"), skip_model_load=True).get_spec()
        want = desc["signatures"][g]
        assert [(i.name, list(i.type.multiArrayType.shape)) for i in spec.description.input] == \
            [(k, v["shape"]) for k, v in want["inputs"].items()]
        assert [o.name for o in spec.description.output] == list(want["outputs"])
        assert spec.WhichOneof("Type") == "mlProgram"


def test_a_model_with_the_own_chunk_mark_exports_it_as_an_input_of_conditioning():
    """The mark of the model's own context chunks (train --mark-own) is the conditioning graph's second input: the
    ONNX graphs give PyTorch's velocities with marked and real context chunks in turn."""
    from codicodec_flow.realtime.ort_backend import CHECK_TOLERANCE, check_against_torch
    marked = randomised_model(replace(CFG, mark_own=True)).requires_grad_(False)
    ort = load_onnx(marked, STATS)
    assert list(ort.description["signatures"]["conditioning"]["inputs"]) == ["t", "own"]
    t = np.full((1, T), 0.02, np.float32)
    assert np.abs(ort.conditioning(t, True) - ort.conditioning(t, False)).max() > 1e-2
    assert check_against_torch(marked, ort) <= CHECK_TOLERANCE
    assert list(signatures(CFG)["conditioning"]["inputs"]) == ["t"]  # an export without the mark: no such input
