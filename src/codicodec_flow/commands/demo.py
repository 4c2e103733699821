"""`codicodec-flow demo`: the whole path from audio to continuation, offline, on a CPU, in minutes.

Writes example songs, preprocesses them (CoDiCodec when its weights are on this machine, else the
built-in spectral codec), trains a small model briefly, continues a held-out prompt and writes the
prompt, the continuation and a spectrogram of both. It shows the pipeline working; minutes of
CPU training cannot promise musical quality.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path

from ..checkpoint import EMA, LAST, load_checkpoint
from ..codec import CHUNK_SAMPLES, SAMPLE_RATE, local_codec
from ..codec.audio import read_audio, write_wav
from ..config import ModelConfig, PreprocessConfig, SampleConfig
from ..data.dataset import load_latents
from ..data.preprocess import run_preprocess, summary_lines
from ..data.synth import write_songs
from ..evaluation.plots import spectrogram_png
from ..plan import plan_run
from ..train import run_train
from ..util.progress import interactive
from .flags import add_device
from .sample import run_sample

DEMO_MODEL = ModelConfig(dim=128, n_layers=4, n_heads=4, cond_dim=128, context_chunks=8)
DEMO_STEPS = 800


def run_demo(out_dir: str = "demo_out", device: str = "cpu", songs: int = 12, song_seconds: float = 30.0,
             steps: int = DEMO_STEPS, prompt_seconds: float = 4.0, continue_seconds: float = 12.0, seed: int = 0) -> dict:
    """Run every stage into out_dir and return the paths it wrote."""
    out = Path(out_dir)
    t0 = time.perf_counter()
    codec, why = local_codec()
    print(f"[1/5] writing {songs} example songs of {song_seconds:.0f} s to {out / 'audio'}")
    write_songs(out / "audio", songs, song_seconds)
    print(f"[2/5] preprocessing with the {codec} codec: {why}")
    report = run_preprocess(PreprocessConfig(in_dir=str(out / "audio"), out_dir=str(out / "latents"), codec=codec,
                                             device=device), plain=not interactive())
    for line in summary_lines(report, time.perf_counter() - t0):
        print("      " + line)
    run_dir = out / "run"
    done = (run_dir / EMA).exists() and load_checkpoint(run_dir / EMA).get("step") == steps
    if done:
        print(f"[3/5] reusing the model already trained in {run_dir} (delete that folder to train again)")
    else:
        print(f"[3/5] training a {DEMO_MODEL.dim}-wide, {DEMO_MODEL.n_layers}-layer model for {steps} steps")
        train = dict(data_dir=str(out / "latents"), out_dir=str(run_dir), device=device, batch_size=8, crop_tokens=128,
                     max_steps=steps, lr=2e-3, warmup_steps=20, save_every=steps, val_every=steps // 2,
                     log_every=max(1, steps // 10), ema_decay=0.99, tui=interactive(), seed=seed)
        model = {k: v for k, v in asdict(DEMO_MODEL).items() if k != "mark_own"}  # the mark comes with the stage
        run_train(plan_run(train, model, {}, "default", resume=(run_dir / LAST).exists()))
    data = load_latents(out / "latents")
    source = (data.val or data.train)[0].source.removesuffix(" (tail)")
    wave = read_audio(out / "audio" / source)
    n_prompt = max(1, int(prompt_seconds * SAMPLE_RATE) // CHUNK_SAMPLES)
    prompt = write_wav(out / "prompt.wav", wave[:, : n_prompt * CHUNK_SAMPLES])
    print(f"[4/5] continuing {prompt_seconds:.0f} s of the held-out song {source} for {continue_seconds:.0f} s")
    both = run_sample(str(run_dir / EMA), str(out / "prompt_and_continuation.wav"),
                      SampleConfig(seed=seed), str(prompt), continue_seconds, device,
                      include_prompt=True, plain=not interactive())
    decoded = read_audio(both.wavs[0])  # the prompt as the codec renders it (like for like), then the continuation
    cut = n_prompt * CHUNK_SAMPLES
    cont = write_wav(out / "continuation.wav", decoded[:, cut:])
    png = spectrogram_png([("prompt", decoded[:, :cut]), ("continuation", decoded[:, cut:])],
                          out / "spectrogram.png", title=f"demo: {codec} codec, {steps} training steps")
    paths = {"prompt": prompt, "continuation": cont, "both": both.wavs[0], "spectrogram": png,
             "checkpoint": run_dir / EMA}
    print(f"[5/5] done in {time.perf_counter() - t0:.0f} s; generation ran at {both.realtime_factor:.1f}x real time")
    for name, path in paths.items():
        print(f"      {name:13s} {path}")
    return paths


def register(sub) -> None:
    p = sub.add_parser("demo", help="the whole pipeline offline in minutes: songs -> latents -> model -> continuation",
                       description="Make example music, preprocess it, train a small model briefly and continue a "
                                   "prompt; writes WAVs and a spectrogram PNG.")
    p.add_argument("--out-dir", default="demo_out", help="where everything goes (default demo_out)")
    add_device(p, "cpu")
    p.add_argument("--steps", type=int, default=DEMO_STEPS, help=f"training steps (default {DEMO_STEPS})")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    run_demo(a.out_dir, a.device, steps=a.steps, seed=a.seed)
    return 0
