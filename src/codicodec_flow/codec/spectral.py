"""SpectralCodec: a fixed, training-free signal-processing codec with CoDiCodec's geometry.

What it is: a stand-in for offline use, CI and fast CPU experiments. Each 4096-sample token
(~85 ms) becomes 64 numbers: channels 0..31 are the log energies of 32 mel-spaced bands
(30 Hz - 20 kHz, triangular, shelved at both ends so they sum to one) of mid = (L + R) / 2,
channels 32..63 the same bands of side = (L - R) / 2. Each token is analysed on its own
samples only (one 4096-point FFT under a Tukey window), so encoding is exactly chunk-local.
Latents are (band dB - reference dB) / 12, clamped to [-4, 4]; the fixed reference is a
music-like spectrum (flat to 200 Hz, then -4.5 dB/octave) at -20 dBFS for mid and -30 for side,
so ordinary music lands near zero mean and unit spread, and silence sits at -4.

Decoding is band-filtered noise: 32 fixed noise bands per mid/side, periodic over 32 tokens
and indexed by absolute token position, weighted by the band amplitudes. Gains glide from the
previous token's over the first 512 samples of each token, so there are no clicks and the
decoder is causal: chunk c depends only on chunks <= c, and streaming equals batch decoding.
Latents at the -4 floor decode to true silence.

What it is not: a substitute for CoDiCodec's quality. It keeps spectral envelope, level,
stereo width and rhythm; it loses pitch, harmonicity and timbre detail (everything is noise).
Encode and decode return CPU float32 tensors whatever the input's device or dtype; empty audio
encodes to (0, 8, 64). Whole-input calls peak near 0.1 MB per token (~4 GB per hour of audio).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from einops import rearrange

from ..errors import CodecError
from .base import CHANNELS, CHUNK_SAMPLES, LATENT_DIM, SAMPLE_RATE, TOKEN_SAMPLES, TOKENS_PER_CHUNK

N_BANDS = LATENT_DIM // 2  # 32 bands for mid, 32 for side
F_LO, F_HI = 30.0, 20_000.0  # Hz, the analysed range
DB_PER_UNIT = 12.0  # one latent unit is 12 dB
CLAMP = 4.0  # latents live in [-4, 4]
REF_DB = (-20.0, -30.0)  # reference mean-square power of mid and side, dBFS
TUKEY_ALPHA = 0.25  # tapered fraction of the analysis window: low leakage, edges barely lost
RAMP = 512  # samples over which gains glide into each token (~11 ms)
NOISE_TOKENS = 32  # noise tables repeat every 32 tokens (4 chunks, ~2.7 s)
SEED = 20_240_917


def _mel(f: torch.Tensor) -> torch.Tensor:
    return 2595.0 * torch.log10(1.0 + f / 700.0)


def _band_weights(freqs: torch.Tensor) -> torch.Tensor:
    """(F,) frequencies in Hz -> (F, 32) triangular mel-band weights summing to 1 on [30, 20k] Hz."""
    edges = _mel(torch.tensor([F_LO, F_HI], dtype=torch.float64))
    m = torch.linspace(float(edges[0]), float(edges[1]), N_BANDS + 2, dtype=torch.float64)  # (34,)
    x = _mel(freqs.double())[:, None]  # (F, 1)
    rise = (x - m[:-2]) / (m[1:-1] - m[:-2])  # (F, 32)
    fall = (m[2:] - x) / (m[2:] - m[1:-1])  # (F, 32)
    w = torch.minimum(rise, fall).clamp(0.0, 1.0)
    # shelves: the outer bands stay flat down to 30 Hz and up to 20 kHz so bass and air are kept
    w[:, 0] = torch.where((x[:, 0] >= m[0]) & (x[:, 0] <= m[1]), 1.0, w[:, 0])
    w[:, -1] = torch.where((x[:, 0] >= m[-2]) & (x[:, 0] <= m[-1]), 1.0, w[:, -1])
    return w.float()


@functools.lru_cache(maxsize=1)
def _analysis() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Window, FFT-bin -> band-power matrix, per-band bandwidth and the (2, 32) reference dB."""
    n = TOKEN_SAMPLES
    window = torch.ones(n)  # Tukey: flat, with raised-cosine edges inside the token
    taper = int(TUKEY_ALPHA * n / 2)
    ramp = 0.5 - 0.5 * torch.cos(math.pi * (torch.arange(taper) + 0.5) / taper)
    window[:taper], window[-taper:] = ramp, ramp.flip(0)
    freqs = torch.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)  # (2049,)
    fold = torch.full_like(freqs, 2.0)  # one-sided spectrum: every bin but DC and Nyquist counts twice
    fold[0] = fold[-1] = 1.0
    w = _band_weights(freqs)  # (2049, 32)
    to_power = fold[:, None] * w / (n * window.square().sum())  # |X|^2 -> mean-square per band
    bandwidth = (fold[:, None] * w).sum(0) / n  # (32,) band power of unit white noise
    music = 1.0 / (1.0 + (freqs / 200.0).square()) ** 0.75  # flat, then -4.5 dB/octave
    ref = (fold[:, None] * w * music[:, None]).sum(0)  # (32,)
    ref_db = 10 * torch.log10(ref / ref.sum())  # share of the total
    ref_db = torch.stack([ref_db + REF_DB[0], ref_db + REF_DB[1]])  # (2, 32)
    return window, to_power, bandwidth, ref_db


@functools.lru_cache(maxsize=1)
def _noise_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-white noise split into the 32 bands, for mid and side: body and ramp-weighted head."""
    length = NOISE_TOKENS * TOKEN_SAMPLES
    gen = torch.Generator().manual_seed(SEED)
    white = torch.randn(CHANNELS, length, generator=gen)  # (2, L)
    w = _band_weights(torch.fft.rfftfreq(length, 1.0 / SAMPLE_RATE))  # (L/2+1, 32)
    # circular filtering keeps each band periodic, so the table wraps around without a seam
    bands = torch.fft.irfft(torch.fft.rfft(white)[:, None, :] * w.T, n=length)  # (2, 32, L)
    table = rearrange(bands, "c b (p n) -> c p n b", n=TOKEN_SAMPLES).contiguous()  # (2, P, 4096, 32)
    fade = 0.5 + 0.5 * torch.cos(math.pi * (torch.arange(RAMP) + 0.5) / RAMP)  # 1 -> 0
    head = (table[:, :, :RAMP] * fade[:, None]).contiguous()  # (2, P, 512, 32)
    return table, head


@dataclass
class _Stream:
    prev: torch.Tensor | None = None  # (2, 32) band amplitudes of the last decoded token
    token: int = 0  # absolute index of the next token, picks the noise segment


class SpectralCodec:
    """Mel band envelopes of mid/side per token, decoded as shaped noise; see the module docstring."""

    name = "spectral"
    version = "1"
    lookahead_samples = 0  # each token is analysed from its own samples only

    def __init__(self, device: torch.device | str = torch.device("cpu")):
        self.device = torch.device(device)
        self._stream = _Stream()

    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        """(2, N) waveform -> (ceil(N / 32768), 8, 64) latents; the last chunk is zero-padded."""
        if not isinstance(wave, torch.Tensor) or wave.ndim != 2 or wave.shape[0] != CHANNELS:
            shape = tuple(wave.shape) if isinstance(wave, torch.Tensor) else type(wave).__name__
            raise CodecError(f"spectral codec: expected a (2, samples) stereo waveform, got {shape}")
        wave = wave.detach().to("cpu", torch.float32)
        if not torch.isfinite(wave).all():
            raise CodecError("spectral codec: the waveform contains NaN or infinite samples")
        n_chunks = -(-wave.shape[1] // CHUNK_SAMPLES)
        if n_chunks == 0:  # empty audio is zero chunks (the FFT backend rejects empty batches)
            return torch.zeros(0, TOKENS_PER_CHUNK, LATENT_DIM)
        wave = torch.nn.functional.pad(wave, (0, n_chunks * CHUNK_SAMPLES - wave.shape[1]))
        window, to_power, _, ref_db = _analysis()
        mid_side = torch.stack([wave[0] + wave[1], wave[0] - wave[1]]) * 0.5  # (2, N)
        tokens = mid_side.view(CHANNELS, -1, TOKEN_SAMPLES)  # (2, K, 4096)
        power = torch.fft.rfft(tokens * window).abs().square() @ to_power  # (2, K, 32)
        db = 10 * torch.log10(power + 1e-20)
        z = ((db - ref_db[:, None]) / DB_PER_UNIT).clamp(-CLAMP, CLAMP)  # (2, K, 32)
        return rearrange(z, "c (t k) b -> t k (c b)", k=TOKENS_PER_CHUNK).contiguous()  # (T, 8, 64)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(T, 8, 64) latents -> (2, T * 32768) waveform; causal, equal to streaming decode_next."""
        amps = self._amplitudes(latents, "(T, 8, 64)", ndim=3)  # (2, K, 32)
        if amps.shape[1] == 0:
            return torch.zeros(CHANNELS, 0)
        return self._synth(amps, amps[:, 0], start=0)

    def reset(self) -> None:
        """Forget the streaming decoder's past; the next decode_next starts a new stream."""
        self._stream = _Stream()

    def decode_next(self, chunk: torch.Tensor) -> torch.Tensor:
        """(8, 64) latents of the next chunk -> (2, 32768) waveform continuing the stream."""
        amps = self._amplitudes(chunk, "(8, 64)", ndim=2)  # (2, 8, 32)
        state = self._stream
        prev = amps[:, 0] if state.prev is None else state.prev
        out = self._synth(amps, prev, start=state.token)
        state.prev, state.token = amps[:, -1], state.token + TOKENS_PER_CHUNK
        return out

    def _amplitudes(self, latents: torch.Tensor, expected: str, ndim: int) -> torch.Tensor:
        """Latents -> (2, K, 32) noise amplitudes per band (square root of power density)."""
        if (not isinstance(latents, torch.Tensor) or latents.ndim != ndim
                or tuple(latents.shape[-2:]) != (TOKENS_PER_CHUNK, LATENT_DIM)):
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise CodecError(f"spectral codec: expected latents shaped {expected}, got {shape}")
        z = latents.detach().to("cpu", torch.float32).reshape(-1, CHANNELS, N_BANDS)  # (K, 2, 32)
        _, _, bandwidth, ref_db = _analysis()
        z = rearrange(z, "k c b -> c k b").clamp(-CLAMP, CLAMP)  # (2, K, 32)
        density = 10 ** ((z * DB_PER_UNIT + ref_db[:, None]) / 10) / bandwidth  # (2, K, 32)
        # the floor means silence: fade the last half unit to exactly zero
        return density.sqrt() * ((z + CLAMP) * 2).clamp(0.0, 1.0)

    @staticmethod
    def _synth(amps: torch.Tensor, prev: torch.Tensor, start: int) -> torch.Tensor:
        """(2, K, 32) amplitudes from absolute token `start`, gliding from `prev` -> (2, K*4096)."""
        table, head = _noise_tables()
        k = amps.shape[1]
        lead = start % NOISE_TOKENS  # pad so that each token meets its own noise segment
        tail = -(lead + k) % NOISE_TOKENS
        step = torch.cat([prev[:, None], amps[:, :-1]], 1) - amps  # (2, K, 32) previous minus current
        pad = (0, 0, lead, tail)
        amps = rearrange(torch.nn.functional.pad(amps, pad), "c (q p) b -> c q p b", p=NOISE_TOKENS)
        step = rearrange(torch.nn.functional.pad(step, pad), "c (q p) b -> c q p b", p=NOISE_TOKENS)
        out = torch.einsum("cpnb,cqpb->cqpn", table, amps)  # (2, Q, P, 4096)
        out[..., :RAMP] += torch.einsum("cpnb,cqpb->cqpn", head, step)  # glide from the last token
        mid, side = out.reshape(CHANNELS, -1)[:, lead * TOKEN_SAMPLES:(lead + k) * TOKEN_SAMPLES]
        return torch.stack([mid + side, mid - side])  # (2, K*4096)
