"""Pictures: spectrograms of audio and heat-maps of latents, written as PNG files."""
from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure  # no pyplot: no global backend is set, notebooks keep theirs

from ..codec.base import SAMPLE_RATE
from ..util.fsutil import atomic_path


def log_spectrogram(wave: torch.Tensor, n_fft: int = 2048, hop: int = 512) -> torch.Tensor:
    """(C, N) waveform -> (freq, frames) dB spectrogram of the mono mix."""
    mono = wave.float().mean(0)
    spec = torch.stft(mono, n_fft, hop, window=torch.hann_window(n_fft), return_complex=True).abs()
    return 20 * torch.log10(spec.clamp_min(1e-5))


def spectrogram_png(segments: list[tuple[str, torch.Tensor]], path: str | Path, title: str = "") -> Path:
    """Spectrogram of the segments played one after another, each boundary marked and labelled."""
    wave = torch.cat([w for _, w in segments], dim=1)
    spec = log_spectrogram(wave)
    seconds = wave.shape[1] / SAMPLE_RATE
    fig = Figure(figsize=(12, 4.5), dpi=100)
    ax = fig.subplots()
    top = spec.max().item()
    ax.imshow(spec.numpy(), origin="lower", aspect="auto", cmap="magma", vmin=top - 80, vmax=top,
              extent=(0, seconds, 0, SAMPLE_RATE / 2000))
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_ylim(0.03, SAMPLE_RATE / 2000)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("frequency (kHz)")
    start = 0.0
    for label, w in segments:
        end = start + w.shape[1] / SAMPLE_RATE
        ax.axvline(start, color="white", lw=1.5, ls="--")
        ax.text(start + 0.1, SAMPLE_RATE / 2000 * 0.6, label, color="white", fontsize=11, weight="bold")
        start = end
    ax.set_title(title)
    return _save(fig, path)


def latent_heatmap_png(latents: torch.Tensor, path: str | Path, title: str = "", boundary: int | None = None) -> Path:
    """(T, 8, 64) latents as a channels x tokens heat-map; `boundary` marks a chunk index (prompt end)."""
    z = latents.reshape(-1, latents.shape[-1]).T  # (64, T * 8)
    fig = Figure(figsize=(12, 3.5), dpi=100)
    ax = fig.subplots()
    ax.imshow(z.numpy(), origin="lower", aspect="auto", cmap="coolwarm", vmin=-3, vmax=3)
    if boundary is not None:
        ax.axvline(boundary * latents.shape[1] - 0.5, color="black", lw=1.5, ls="--")
    ax.set_xlabel("token")
    ax.set_ylabel("channel")
    ax.set_title(title)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def curves_png(panels: list[tuple[str, dict[str, tuple[list[float], list[float]]]]], path: str | Path,
               title: str = "", xlabel: str = "step") -> Path:
    """One panel per (ylabel, {series name: (xs, ys)}), stacked vertically."""
    fig = Figure(figsize=(10, 2.8 * len(panels)), dpi=100)
    axes = fig.subplots(len(panels), 1, squeeze=False)
    for ax, (ylabel, series) in zip(axes[:, 0], panels):
        for name, (xs, ys) in series.items():
            ax.plot(xs, ys, label=name, lw=1.2)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(loc="best", fontsize=8)
    axes[-1, 0].set_xlabel(xlabel)
    axes[0, 0].set_title(title)
    return _save(fig, path)


def training_curves_png(metrics_jsonl: str | Path, path: str | Path) -> Path | None:
    """Loss and validation curves from a run's metrics.jsonl (None if it has no training records)."""
    import json
    train, val = ([], []), ([], [])
    for line in Path(metrics_jsonl).read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue  # a line cut short by a killed run
        if r.get("kind") == "train" and "loss" in r:
            train[0].append(r["step"])
            train[1].append(r["loss"])
        elif r.get("kind") == "val" and "val_loss" in r:
            val[0].append(r["step"])
            val[1].append(r["val_loss"])
    if not train[0]:
        return None
    panels = [("loss", {"train": train, **({"validation": val} if val[0] else {})})]
    return curves_png(panels, path, title=f"training curves ({Path(metrics_jsonl).parent.name})")
