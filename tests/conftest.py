"""Shared fixtures: audio files written on the fly, tiny configs, and the spectral codec."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

torch.set_num_threads(2)


def music_like(seconds: float, sr: int = 48_000, channels: int = 2, seed: int = 0) -> np.ndarray:
    """(n, channels) float32: decaying tone bursts on a beat over a quiet noise bed."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    env = np.exp(-6.0 * (t % 0.375))
    out = []
    for c in range(channels):
        f = 110.0 * (1.5 ** c) * (1 + 0.5 * (np.floor(t / 1.5) % 3))
        tone = np.sin(2 * np.pi * f * t) + 0.3 * np.sin(4 * np.pi * f * t)
        out.append(0.3 * env * tone + 0.01 * rng.standard_normal(t.shape))
    return np.stack(out, axis=1).astype(np.float32)


def write_audio(path: Path, seconds: float, sr: int = 48_000, channels: int = 2, fmt: str | None = None,
                seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), music_like(seconds, sr, channels, seed), sr, format=fmt)
    return path


@pytest.fixture
def spectral_codec():
    from codicodec_flow.codec import load_codec
    return load_codec("spectral")


def ar_latents(chunks: int, rho: float = 0.95, seed: int = 0) -> torch.Tensor:
    """(chunks, 8, 64) latents of an AR(1) process over chunks: each chunk predicts the next.

    Stationary N(0, 1) per value, so a model without context can do no better than the marginal,
    while one that sees the previous chunk can predict rho * x_prev.
    """
    g = torch.Generator().manual_seed(seed)
    z = torch.empty(chunks, 8, 64)
    z[0] = torch.randn(8, 64, generator=g)
    for k in range(1, chunks):
        z[k] = rho * z[k - 1] + (1 - rho ** 2) ** 0.5 * torch.randn(8, 64, generator=g)
    return z


def write_latent_dir(root: Path, files: dict[str, torch.Tensor], storage: str = "pt", segment: int = 0) -> Path:
    """Shards + manifest for {source name: (T, 8, 64) latents}, as preprocess would write them: in `storage`
    (pt, float32, float16), in segments of `segment` chunks (0: one shard per file)."""
    from codicodec_flow.data.shards import build_manifest, save_shard, shard_suffix
    for name, z in files.items():
        size = segment or z.shape[0]
        parts = [z[a:a + size] for a in range(0, z.shape[0], size)]
        for i, part in enumerate(parts):
            save_shard(root / f"{name}.{i:04d}{shard_suffix(storage)}", part,
                       {"source": name, "segment": i, "n_segments": len(parts), "codec": "spectral",
                        "codec_version": "1", "chunks": part.shape[0]}, storage)
    build_manifest(root)
    return root


@pytest.fixture
def ar_data(tmp_path) -> Path:
    """A latent folder of six AR(1) files of varied length (one shorter than a typical crop)."""
    lengths = [40, 36, 30, 24, 12, 5]
    return write_latent_dir(tmp_path / "latents", {f"song{i}.wav": ar_latents(n, seed=i) for i, n in enumerate(lengths)})


def randomised_model(cfg, seed: int = 0, scale: float = 0.05):
    """A FlowDiT in eval mode whose zero-initialised layers (adaLN, output) are not zero, so every path carries signal."""
    from codicodec_flow.model import FlowDiT
    torch.manual_seed(seed)
    model = FlowDiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model.eval()
