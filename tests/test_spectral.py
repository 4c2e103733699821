"""SpectralCodec: geometry, determinism, normalisation, round trip, seamless streaming, chunk locality."""
from __future__ import annotations

import math

import pytest
import torch

from codicodec_flow.codec import CHUNK_SAMPLES, SAMPLE_RATE, TOKEN_SAMPLES, Codec, load_codec
from codicodec_flow.codec.spectral import SpectralCodec
from codicodec_flow.errors import CodecError


def music(seconds: float = 4.0, seed: int = 0) -> torch.Tensor:
    """(2, N) music-like signal: kicks on the beat, panned hats off it, a chord whose tilt drifts, a pink bed."""
    gen = torch.Generator().manual_seed(seed)
    n = int(seconds * SAMPLE_RATE)
    t = torch.arange(n) / SAMPLE_RATE
    out = torch.zeros(2, n)
    beat = 0.5  # 120 bpm
    for start in torch.arange(0.0, seconds, beat).tolist():
        s = int(start * SAMPLE_RATE)
        tt = torch.arange(min(n - s, 12_000)) / SAMPLE_RATE
        out[:, s:s + len(tt)] += 0.6 * torch.sin(2 * math.pi * (50 + 80 * torch.exp(-30 * tt)) * tt) * torch.exp(-18 * tt)
    for i, start in enumerate(torch.arange(beat / 2, seconds, beat / 2).tolist()):
        s = int(start * SAMPLE_RATE)
        m = min(n - s, 4000)
        hat = torch.randn(m, generator=gen).diff(prepend=torch.zeros(1)) * 0.15 * torch.exp(-60 * torch.arange(m) / SAMPLE_RATE)
        pan = 0.3 + 0.4 * (i % 2)
        out[0, s:s + m] += pan * hat
        out[1, s:s + m] += (1 - pan) * hat
    tilt = 1.0 + 0.8 * torch.sin(2 * math.pi * t / 3.0)
    for f0, detune in [(110.0, 1.0), (220.0, 1.0), (277.2, 1.003), (329.6, 0.997)]:
        for h in range(1, 16):
            out[0] += 0.05 / h**tilt * torch.sin(2 * math.pi * f0 * h * t)
            out[1] += 0.05 / h**tilt * torch.sin(2 * math.pi * f0 * h * detune * t + 0.5 * h)
    spec = torch.fft.rfft(torch.randn(2, n, generator=gen))
    bed = torch.fft.irfft(spec / (1 + torch.fft.rfftfreq(n, 1 / SAMPLE_RATE) / 100).sqrt(), n=n)
    return out + 0.01 * bed / bed.std()


def log_envelope(wave: torch.Tensor, n_bands: int = 16) -> torch.Tensor:
    """(2, N) -> (frames, 2 * n_bands) log band energies of L and R on a grid unrelated to the codec's."""
    # half-token hop: the codec keeps nothing finer than a token, so finer frames only measure that
    spec = torch.stft(wave, 4096, 2048, window=torch.hann_window(4096), return_complex=True).abs().square()
    freqs = torch.fft.rfftfreq(4096, 1 / SAMPLE_RATE)
    edges = torch.logspace(math.log10(40), math.log10(16_000), n_bands + 1)
    bands = torch.stack([spec[:, (freqs >= lo) & (freqs < hi)].sum(1) for lo, hi in zip(edges[:-1], edges[1:])], 1)
    return torch.log(bands + 1e-8).flatten(0, 1).T  # (frames, 2 * n_bands)


def time_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over bands of the correlation over time frames of two (frames, bands) envelopes."""
    a, b = a - a.mean(0), b - b.mean(0)
    return ((a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0) + 1e-8)).mean().item()


@pytest.fixture(scope="module")
def codec() -> SpectralCodec:
    return SpectralCodec()


@pytest.fixture(scope="module")
def wave() -> torch.Tensor:
    return music()


@pytest.fixture(scope="module")
def latents(codec, wave) -> torch.Tensor:
    return codec.encode(wave)


def test_protocol_and_registry():
    codec = load_codec("spectral")
    assert isinstance(codec, SpectralCodec) and isinstance(codec, Codec)
    assert (codec.name, codec.version, codec.device) == ("spectral", "1", torch.device("cpu"))


def test_shapes_and_padding(codec):
    z = codec.encode(torch.zeros(2, 2 * CHUNK_SAMPLES + 100))
    assert z.shape == (3, 8, 64) and z.dtype == torch.float32 and z.device.type == "cpu"
    assert codec.decode(z).shape == (2, 3 * CHUNK_SAMPLES)
    # zero-length audio is zero chunks, and back
    assert codec.encode(torch.zeros(2, 0)).shape == (0, 8, 64)
    assert codec.decode(torch.zeros(0, 8, 64)).shape == (2, 0)


@pytest.mark.parametrize("bad", [torch.zeros(CHUNK_SAMPLES), torch.zeros(1, CHUNK_SAMPLES),
                                 torch.zeros(CHUNK_SAMPLES, 2), torch.zeros(1, 2, CHUNK_SAMPLES)])
def test_encode_rejects_wrong_shapes(codec, bad):
    with pytest.raises(CodecError, match=r"\(2, samples\)"):
        codec.encode(bad)


def test_encode_rejects_non_finite(codec):
    wave = torch.zeros(2, 1000)
    wave[0, 5] = float("nan")
    with pytest.raises(CodecError, match="NaN"):
        codec.encode(wave)


def test_decode_rejects_wrong_shapes(codec):
    for bad in [torch.zeros(8, 64), torch.zeros(2, 8, 63), torch.zeros(2, 4, 64)]:
        with pytest.raises(CodecError, match=r"\(T, 8, 64\)"):
            codec.decode(bad)
    with pytest.raises(CodecError, match=r"\(8, 64\)"):
        codec.decode_next(torch.zeros(1, 8, 64))


def test_deterministic_and_dtype_agnostic(codec, wave, latents):
    assert torch.equal(SpectralCodec().encode(wave), latents)
    assert torch.allclose(codec.encode(wave.double()), latents, atol=1e-4)
    y = codec.decode(latents)
    assert torch.equal(SpectralCodec().decode(latents), y)
    assert torch.allclose(codec.decode(latents.double()), y, atol=1e-5)


def test_latent_normalisation(codec, latents):
    per_channel = latents.reshape(-1, 64)
    assert abs(per_channel.mean().item()) < 1.0
    assert 0.5 < per_channel.std().item() < 2.0
    assert per_channel.mean(0).abs().max() < 1.5
    assert per_channel.std(0).min() > 0.3 and per_channel.std(0).max() < 3.0
    assert torch.equal(codec.encode(torch.zeros(2, CHUNK_SAMPLES)), torch.full((1, 8, 64), -4.0))
    loud = codec.encode(torch.randn(2, CHUNK_SAMPLES, generator=torch.Generator().manual_seed(1)) * 100)
    assert loud.max() <= 4.0


def test_round_trip_follows_envelope(codec, wave, latents):
    decoded = codec.decode(latents)[:, :wave.shape[1]]
    ratio = (decoded.square().mean() / wave.square().mean()).sqrt().item()
    assert 0.5 < ratio < 2.0
    reference = log_envelope(wave)
    good = time_correlation(reference, log_envelope(decoded))
    # the same latents in the wrong order keep the average spectrum but lose the rhythm
    order = torch.randperm(latents.shape[0] * 8, generator=torch.Generator().manual_seed(0))
    shuffled = codec.decode(latents.reshape(-1, 64)[order].reshape(latents.shape))[:, :wave.shape[1]]
    bad = time_correlation(reference, log_envelope(shuffled))
    assert good > 0.6, good
    assert bad < 0.3, bad


def test_reencode_is_consistent(codec, latents):
    again = codec.encode(codec.decode(latents))
    assert torch.corrcoef(torch.stack([latents.flatten(), again.flatten()]))[0, 1] > 0.95
    assert (again - latents).abs().median() < 0.1


def test_streaming_equals_batch_and_is_causal(latents):
    codec = SpectralCodec()
    whole = codec.decode(latents)
    for _ in range(2):  # reset really forgets the first pass
        codec.reset()
        streamed = torch.cat([codec.decode_next(chunk) for chunk in latents], 1)
        assert (streamed - whole).abs().max() < 1e-4
    # chunk c depends only on chunks <= c: a prefix decodes to a prefix
    assert (codec.decode(latents[:3]) - whole[:, :3 * CHUNK_SAMPLES]).abs().max() < 1e-4


def test_no_clicks_at_chunk_boundaries(codec, latents):
    wave = codec.decode(latents)
    jumps = wave.diff(dim=1).abs().amax(0)  # (N - 1,) worst channel per sample step
    for edge in range(CHUNK_SAMPLES - 1, jumps.shape[0], CHUNK_SAMPLES):
        around = torch.cat([jumps[edge - TOKEN_SAMPLES:edge], jumps[edge + 1:edge + TOKEN_SAMPLES]])
        assert jumps[edge] <= around.max()  # no larger than the noise's own steps nearby
    # silence -> loud bass -> silence: bass moves slowly, so a gain step would be a click many times
    # larger than its own steps; the gains glide instead
    z = torch.full((3, 8, 64), -4.0)
    z[1, :, 0] = 3.0
    codec.reset()
    wave = torch.cat([codec.decode_next(chunk) for chunk in z], 1)
    jumps = wave.diff(dim=1).abs().amax(0)
    loud = jumps[CHUNK_SAMPLES:2 * CHUNK_SAMPLES - 1]
    assert wave.abs().max() > 20 * loud.max()  # the bass is smooth: steps are far below its level
    assert jumps[CHUNK_SAMPLES - 1] < 1e-3 * loud.max()
    assert jumps[2 * CHUNK_SAMPLES - 1] <= loud.max()
    assert wave[:, :CHUNK_SAMPLES].abs().max() == 0  # the floor is true silence
    assert wave[:, -(CHUNK_SAMPLES - TOKEN_SAMPLES):].abs().max() == 0


def test_segment_aligned_encoding_equals_whole(codec, wave, latents):
    cuts = [0, 2 * CHUNK_SAMPLES, 3 * CHUNK_SAMPLES, wave.shape[1]]
    parts = [codec.encode(wave[:, a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    assert torch.allclose(torch.cat(parts), latents, atol=1e-5)
