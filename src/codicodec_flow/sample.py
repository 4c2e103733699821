"""The `sample` command: continue a prompt WAV (or start from nothing) and write WAVs and latents."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .audio import read_audio, write_wav
from .checkpoint import Bundle, load_bundle
from .codec import CHUNK_SAMPLES, CHUNK_SECONDS, Codec, load_codec
from .config import SampleConfig
from .devices import autocast_dtype, resolve_device
from .errors import AudioError, FlowError
from .generate import StreamGenerator
from .progress import Reporter
from .shards import save_shard

DECODE_MODES = ("parallel", "stream")


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


def encode_prompt(codec: Codec, path: str | Path) -> torch.Tensor:
    """A prompt file -> its whole chunks as latents (T, 8, 64); shorter than one chunk is an error."""
    wave = read_audio(path)
    chunks = wave.shape[1] // CHUNK_SAMPLES
    if chunks < 1:
        raise AudioError(f"{path}: the prompt is {wave.shape[1] / 48000:.2f} s long; it must hold at least one "
                         f"codec chunk ({CHUNK_SECONDS:.3f} s)")
    return codec.encode(wave[:, : chunks * CHUNK_SAMPLES])


def decode_latents(codec: Codec, latents: torch.Tensor, mode: str) -> torch.Tensor:
    """(T, 8, 64) -> (2, T * 32768) with the codec's parallel decoder or its streaming decode_next."""
    if mode == "parallel":
        return codec.decode(latents)
    if mode != "stream":
        raise FlowError(f"unknown --decode {mode!r}: choose one of {', '.join(DECODE_MODES)}")
    codec.reset()
    return torch.cat([codec.decode_next(z) for z in latents], dim=1)


def output_paths(out: str | Path, n: int) -> list[Path]:
    """OUT.wav for one sample; OUT_1.wav ... OUT_n.wav for several."""
    out = Path(out)
    if out.suffix.lower() != ".wav":
        raise FlowError(f"--out {out}: the output must be a .wav file")
    return [out] if n == 1 else [out.with_name(f"{out.stem}_{i + 1}.wav") for i in range(n)]


def open_codec(bundle: Bundle, device, codec_ckpt=None, trust: bool = False) -> Codec:
    codec = load_codec(bundle.codec, device, codec_ckpt, trust)
    if codec.version != bundle.codec_version:
        print(f"note: {bundle.path} was trained on {bundle.codec} {bundle.codec_version} latents; "
              f"this codec is {codec.version}")
    return codec


def run_sample(ckpt: str, out: str, cfg: SampleConfig, prompt_wav: str | None = None, duration_s: float = 20.0,
               device: str = "auto", codec_ckpt: str | None = None, trust_codec: bool = False,
               include_prompt: bool = False, decode: str = "parallel", plain: bool | None = None) -> SampleResult:
    """Generate `duration_s` of continuation for each of cfg.num_samples streams and write them."""
    if duration_s <= 0:
        raise FlowError(f"--duration-s must be positive, got {duration_s}")
    paths = output_paths(out, cfg.num_samples)
    dev = resolve_device(device)
    bundle = load_bundle(ckpt, dev)
    codec = open_codec(bundle, dev, codec_ckpt, trust_codec)
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
        lat_path = path.with_suffix(".latents.pt")
        save_shard(lat_path, seq, {"source": str(prompt_wav or ""), "ckpt": str(ckpt), "codec": bundle.codec,
                                   "codec_version": bundle.codec_version, "prompt_chunks": 0 if lead is None else
                                   lead.shape[0], "sample": b, "seed": cfg.seed, "solver": cfg.solver,
                                   "steps": gen.steps, "temperature": cfg.temperature, "cfg_scale": cfg.cfg_scale})
        result.latents.append(lat_path)
    return result


def training_sample_hook(continuation: bool = False, seconds: float = 8.0, codec_ckpt: str | None = None):
    """A `train` hook writing run/samples/stepNNNNNNN.wav: unconditional, or continuing a validation prompt."""
    state: dict = {}

    def hook(step: int, ema, data, out_dir: Path, device) -> str:
        if "codec" not in state:
            try:
                state["codec"] = load_codec(data.codec, device, codec_ckpt)
            except FlowError as exc:
                state["codec"] = None
                print(f"note: audio samples are off: {exc}")
        if state["codec"] is None:
            return "off (codec unavailable)"
        gen = StreamGenerator(ema, data.stats, SampleConfig(solver="heun", nfe=8, seed=step), device)
        lead = None
        files = data.val or data.train
        if continuation and files:
            prompt = files[0].latents[: max(1, min(8, files[0].chunks - 1))]  # up to ~5.5 s of a held-out file
            gen.prefill(prompt)
            lead = prompt
        z = gen.generate(math.ceil(seconds / CHUNK_SECONDS))[0]
        seq = z if lead is None else torch.cat([lead, z])
        path = write_wav(Path(out_dir) / "samples" / f"step{step:07d}.wav", decode_latents(state["codec"], seq, "parallel"))
        return path.name

    return hook
