"""The CoDiCodec wrapper driven through the real package, on a random-weight checkpoint made here."""
from __future__ import annotations

import re
import socket

import pytest
import torch

pytest.importorskip("codicodec")

import codicodec.hparams_inference as cc_hparams_inference  # noqa: E402
import codicodec.utils as cc_utils  # noqa: E402
from codicodec.models import UNet  # noqa: E402

from codicodec_flow.codec.base import CHUNK_SAMPLES, Codec  # noqa: E402
from codicodec_flow.codec.codicodec import CoDiCodec  # noqa: E402
from codicodec_flow.errors import CodecError  # noqa: E402


class _NotATensor:
    """Anything weights_only unpickling refuses."""


def _block_network(mp: pytest.MonkeyPatch, calls: list) -> None:
    """Make every way the package could reach the network record the attempt and fail."""
    def refuse(*args, **kwargs):
        calls.append(args)
        raise OSError("network disabled in tests")
    mp.setattr(cc_utils, "download_model", refuse)
    mp.setattr(cc_utils, "hf_hub_download", refuse)
    mp.setattr(socket.socket, "connect", refuse)
    try:
        import huggingface_hub
        mp.setattr(huggingface_hub, "hf_hub_download", refuse)
        mp.setattr(huggingface_hub, "snapshot_download", refuse)
    except ImportError:
        pass


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Every test runs offline, with no official weights and no CODICODEC_CKPT."""
    calls: list = []
    _block_network(monkeypatch, calls)
    monkeypatch.delenv("CODICODEC_CKPT", raising=False)
    monkeypatch.setattr(cc_hparams_inference, "load_path_inference_default", "/nonexistent/codicodec.pt")
    return calls


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A ~600 MB checkpoint of random weights, written once for the module."""
    torch.manual_seed(0)
    model = UNet()
    # The package zero-initialises its output layers, which would make every latent 0.
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and not p.any():
                p.normal_(0.0, 0.02)
    path = tmp_path_factory.mktemp("codicodec") / "codicodec.pt"
    torch.save({"gen_state_dict": model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def codec(ckpt):
    calls: list = []
    with pytest.MonkeyPatch.context() as mp:
        _block_network(mp, calls)
        mp.delenv("CODICODEC_CKPT", raising=False)
        c = CoDiCodec(device="cpu", ckpt=ckpt)
    assert calls == []  # construction never tried the network
    c.denoising_steps = 1  # the tests check plumbing, not quality
    return c


@pytest.fixture(scope="module")
def wave():
    g = torch.Generator().manual_seed(1)
    return 0.1 * torch.randn(2, CHUNK_SAMPLES * 3 // 2, generator=g)  # 1.5 chunks


@pytest.fixture(scope="module")
def latents(codec, wave):
    return codec.encode(wave)  # (2, 8, 64), one encoder pass


def test_identity(codec, ckpt):
    assert isinstance(codec, Codec)
    assert codec.name == "codicodec" and codec.version == "0.1.2"
    assert codec.device == torch.device("cpu") and codec.ckpt_path == ckpt


def test_encode_shape_pieces_and_fp32_on_cpu(codec, wave, latents, monkeypatch):
    whole = latents
    assert whole.shape == (2, 8, 64) and whole.dtype == torch.float32 and whole.device.type == "cpu"
    assert torch.isfinite(whole).all() and whole.std() > 0

    seen = []
    forward = codec._ed.gen.encoder_forward

    def spy(x, **kwargs):
        seen.append((cc_utils.mixed_precision, torch.is_autocast_enabled("cpu")))
        return forward(x, **kwargs)
    monkeypatch.setattr(codec._ed.gen, "encoder_forward", spy)
    monkeypatch.setattr(codec, "max_chunks_per_pass", 1)
    before = cc_utils.mixed_precision
    pieces = codec.encode(wave)
    assert seen == [(False, False)] * 2  # one pass per chunk, no fp16 autocast off CUDA
    assert cc_utils.mixed_precision == before  # the package's global is put back
    # Batch size changes fp32 rounding a little, and atanh amplifies it near +-1.
    torch.testing.assert_close(pieces, whole, rtol=1e-4, atol=5e-4)
    # Whole = the package's own encode of the zero-padded waveform, bit for bit.
    padded = torch.nn.functional.pad(wave, (0, 2 * CHUNK_SAMPLES - wave.shape[1]))
    with torch.no_grad(), codec._autocast_policy():
        assert torch.equal(codec._ed.encode(padded), whole)
    # The lookahead matters: chunk 0 alone (no next-chunk samples) encodes differently.
    alone = codec.encode(wave[:, :CHUNK_SAMPLES])
    assert not torch.allclose(alone[0], whole[0], atol=5e-3)


def test_decode_next_streams_two_chunks(codec, latents):
    z = latents
    codec.reset()
    first = codec.decode_next(z[0])
    second = codec.decode_next(z[1])
    for out in (first, second):
        assert out.shape == (2, CHUNK_SAMPLES) and out.dtype == torch.float32
        assert torch.isfinite(out).all()
    codec.reset()
    assert codec._ed.past_spec is None


def test_decode_parallel(codec, latents):
    out = codec.decode(latents)
    assert out.shape == (2, 2 * CHUNK_SAMPLES) and torch.isfinite(out).all()


def test_bad_shapes(codec):
    with pytest.raises(ValueError):
        codec.encode(torch.zeros(1, CHUNK_SAMPLES))
    with pytest.raises(ValueError):
        codec.decode_next(torch.zeros(2, 8, 64))


def test_missing_ckpt_names_path_and_flag(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(CodecError, match="--codec-ckpt") as e:
        CoDiCodec(device="cpu", ckpt=missing)
    assert str(missing) in str(e.value)


def test_env_var_is_honoured(tmp_path, monkeypatch):
    missing = tmp_path / "from_env.pt"
    monkeypatch.setenv("CODICODEC_CKPT", str(missing))
    with pytest.raises(CodecError, match="CODICODEC_CKPT") as e:
        CoDiCodec(device="cpu")
    assert str(missing) in str(e.value)


def test_offline_without_weights_says_how(offline):
    with pytest.raises(CodecError) as e:
        CoDiCodec(device="cpu")
    msg = str(e.value)
    assert len(offline) == 1  # the package's downloader was tried, and failed
    for hint in ("SonyCSLParis/codicodec", "--codec-ckpt", "CODICODEC_CKPT", "--codec spectral"):
        assert hint in msg
    assert "\n" not in msg


def test_checkpoint_without_state_dict(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"model": torch.zeros(1)}, path)
    with pytest.raises(CodecError, match="gen_state_dict") as e:
        CoDiCodec(device="cpu", ckpt=path)
    assert str(path) in str(e.value)


def test_pickle_checkpoint_needs_trust(tmp_path, monkeypatch):
    path = tmp_path / "pickled.pt"
    torch.save({"extra": _NotATensor()}, path)
    with pytest.raises(CodecError, match="--trust-codec-ckpt"):
        CoDiCodec(device="cpu", ckpt=path)
    monkeypatch.setenv("CODICODEC_CKPT", str(path))  # the env route is refused the same way
    with pytest.raises(CodecError, match="--trust-codec-ckpt"):
        CoDiCodec(device="cpu")
    # Trusted, it unpickles and gets as far as looking for the weights.
    with pytest.raises(CodecError, match="gen_state_dict"):
        CoDiCodec(device="cpu", ckpt=path, trust_pickle=True)
    # The official file at the package's path is trusted without asking.
    monkeypatch.delenv("CODICODEC_CKPT")
    monkeypatch.setattr(cc_hparams_inference, "load_path_inference_default", str(path))
    with pytest.raises(CodecError, match="gen_state_dict"):
        CoDiCodec(device="cpu")


def test_corrupt_checkpoint(tmp_path):
    path = tmp_path / "truncated.pt"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CodecError, match=re.escape(str(path))):
        CoDiCodec(device="cpu", ckpt=path)
