"""`codicodec-flow sample`: continue a prompt WAV (or start from nothing) and write WAVs and latents."""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import load_bundle
from ..codec import CHUNK_SAMPLES, CHUNK_SECONDS
from ..codec.audio import write_wav
from ..codec.prompt import DECODE_MODES, decode_latents, encode_prompt
from ..config import SampleConfig
from ..data.shards import save_shard
from ..errors import FlowError
from ..generate import StreamGenerator
from ..util.devices import autocast_dtype, resolve_device
from ..util.fsutil import check_writable
from ..util.progress import Reporter
from .flags import add_codec_weights, add_device, add_sampling, add_weights, check_finite, finite_float, sample_config


@dataclass
class SampleResult:
    wavs: list[Path] = field(default_factory=list)
    latents: list[Path] = field(default_factory=list)
    chunks: int = 0
    seconds_generated: float = 0.0
    compute_seconds: float = 0.0

    @property
    def realtime_factor(self) -> float:
        """Audio seconds per compute second of the flow model (above 1: faster than real time)."""
        return self.seconds_generated / max(self.compute_seconds, 1e-9)


def output_paths(out: str | Path, n: int) -> list[Path]:
    """OUT.wav for one sample; OUT_1.wav ... OUT_n.wav for several."""
    out = Path(out)
    if out.suffix.lower() != ".wav":
        raise FlowError(f"--out {out}: the output must be a .wav file")
    return [out] if n == 1 else [out.with_name(f"{out.stem}_{i + 1}.wav") for i in range(n)]


MAX_DURATION_S = 4 * 3600  # a 48 kHz stereo 24-bit WAV holds at most 4 GiB, about 4.1 h


def latents_path(wav: Path) -> Path:
    """Where the latents of a generated WAV go: OUT.latents.pt beside OUT.wav."""
    return wav.with_suffix(".latents.pt")


def run_sample(ckpt: str, out: str, cfg: SampleConfig, prompt_wav: str | None = None, duration_s: float = 20.0,
               device: str = "auto", codec_ckpt: str | None = None, trust_codec: bool = False,
               include_prompt: bool = False, decode: str = "parallel", plain: bool | None = None,
               weights: str = "ema") -> SampleResult:
    """Generate `duration_s` of continuation for each of cfg.num_samples streams and write them (weights="raw":
    last.pt's raw training weights instead of the EMA ones)."""
    if not (math.isfinite(duration_s) and 0 < duration_s <= MAX_DURATION_S):
        raise FlowError(f"--duration-s {duration_s:g}: give seconds, more than 0 and at most {MAX_DURATION_S} "
                        f"(4 h: a WAV file holds at most 4 GiB); for endless audio use `codicodec-flow realtime`")
    check_finite(cfg)
    paths = output_paths(out, cfg.num_samples)
    for path in paths:  # before any work: a folder, a name too long or a read-only place would lose it all
        check_writable(path)
        check_writable(latents_path(path))
    dev = resolve_device(device)
    bundle = load_bundle(ckpt, dev, weights)
    codec = bundle.open_codec(dev, codec_ckpt, trust_codec)
    prompt = encode_prompt(codec, prompt_wav) if prompt_wav else None
    gen = StreamGenerator(bundle.model, bundle.stats, cfg, dev, autocast_dtype("auto", dev))
    result = SampleResult()
    t0 = time.perf_counter()
    if prompt is not None:
        gen.prefill(prompt)
    n = math.ceil(duration_s / CHUNK_SECONDS)
    with Reporter(n, "generating", plain=plain, plain_every_s=2.0) as bar:
        def progress(i, _):
            elapsed = time.perf_counter() - t0
            bar.advance(f"{(i + 1) * CHUNK_SECONDS / elapsed:.1f}x real time")
        latents = gen.generate(n, progress)  # (B, n, 8, 64)
    if not torch.isfinite(latents).all():
        raise FlowError(f"{ckpt}: generation produced NaN or infinite latents (temperature {cfg.temperature:g}, "
                        f"cfg scale {cfg.cfg_scale:g}); nothing was written. Try the default sampling settings; if "
                        f"they fail too, the checkpoint comes from a training run that diverged")
    result.compute_seconds = time.perf_counter() - t0
    result.chunks, result.seconds_generated = n, n * CHUNK_SECONDS
    for b, path in enumerate(paths):
        # decode from the prompt's last chunk on, so the decoder's context runs into the continuation
        lead = prompt if (prompt is not None and include_prompt) else (prompt[-1:] if prompt is not None else None)
        seq = latents[b] if lead is None else torch.cat([lead, latents[b]])
        wave = decode_latents(codec, seq, decode)
        if lead is not None and not include_prompt:
            wave = wave[:, lead.shape[0] * CHUNK_SAMPLES:]
        result.wavs.append(write_wav(path, wave))
        lat_path = latents_path(path)
        save_shard(lat_path, seq, {"source": str(prompt_wav or ""), "ckpt": str(ckpt), "ckpt_step": bundle.step,
                                   "weights": bundle.weights,
                                   "codec": bundle.codec,
                                   "codec_version": bundle.codec_version, "prompt_chunks": 0 if lead is None else
                                   lead.shape[0], "sample": b, "seed": cfg.seed, "solver": cfg.solver,
                                   "nfe": gen.evals, "steps": gen.steps, "temperature": cfg.temperature, "cfg_scale": cfg.cfg_scale})
        result.latents.append(lat_path)
    return result


def register(sub) -> None:
    p = sub.add_parser("sample", help="continue a prompt WAV (or generate from nothing) into WAV files",
                       description="Generate audio with a trained checkpoint, one codec chunk at a time.")
    p.add_argument("--ckpt", required=True, help="ema.pt (or last.pt) from train")
    p.add_argument("--prompt-wav", default=None, help="audio to continue (any rate/channels); omit to start from nothing")
    p.add_argument("--out", required=True, help="output WAV (48 kHz stereo); OUT_1.wav ... with --num-samples")
    p.add_argument("--duration-s", type=finite_float, default=20.0,
                   help=f"seconds of continuation, at most {MAX_DURATION_S} (default 20)")
    add_sampling(p, SampleConfig())
    p.add_argument("--num-samples", type=int, default=SampleConfig().num_samples,
                   help="variations generated together as one batch (default 1)")
    add_device(p)
    add_codec_weights(p)
    p.add_argument("--include-prompt", action="store_true", help="write the (decoded) prompt before the continuation")
    p.add_argument("--decode", default="parallel", choices=DECODE_MODES,
                   help="codec decoding: whole sequence at once, or chunk by chunk with decode_next")
    add_weights(p)
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    cfg = sample_config(a, SampleConfig(), num_samples=a.num_samples)
    r = run_sample(a.ckpt, a.out, cfg, a.prompt_wav, a.duration_s, a.device, a.codec_ckpt, a.trust_codec_ckpt,
                   a.include_prompt, a.decode, weights=a.weights)
    print(f"generated {r.chunks} chunks ({r.seconds_generated:.1f} s) per sample in {r.compute_seconds:.1f} s "
          f"({r.realtime_factor:.1f}x real time, flow model)")
    for wav, lat in zip(r.wavs, r.latents):
        print(f"wrote {wav} (latents: {lat})")
    return 0
