"""`codicodec-flow smoke-test`: check the wiring on this machine (device, dtypes, codec round trip) as a pass/fail table."""
from __future__ import annotations

import argparse
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import torch
from rich.console import Console
from rich.table import Table

from ..codec import CHANNELS, CHUNK_SAMPLES, LATENT_DIM, SAMPLE_RATE, TOKENS_PER_CHUNK, load_codec
from ..config import LIVE_SAMPLING, MODEL_PRESETS
from ..generate import StreamGenerator
from ..latents import LatentStats
from ..model import FlowDiT, stream_mask
from ..util.devices import autocast, autocast_dtype, resolve_device
from .flags import add_codec, add_device


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    seconds: float


def _run(name: str, fn: Callable[[], str]) -> Check:
    t0 = time.perf_counter()
    try:
        detail, ok = fn(), True
    except Exception as exc:  # a smoke test reports every failure instead of stopping at the first
        detail, ok = f"{type(exc).__name__}: {exc}".splitlines()[0][:300], False
        if not str(exc):
            detail = traceback.format_exc().strip().splitlines()[-1]
    return Check(name, ok, detail, time.perf_counter() - t0)


def beat_signal(seconds: float, seed: int = 0) -> torch.Tensor:
    """A stereo test tone with a beat: (2, N) float32 at 48 kHz."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    env = torch.exp(-8.0 * (t % 0.5))  # one hit every 0.5 s
    tone = torch.sin(2 * torch.pi * 220 * t) + 0.5 * torch.sin(2 * torch.pi * 330 * t)
    left = 0.3 * env * tone + 0.02 * torch.randn(t.shape, generator=g)
    right = 0.3 * env * torch.roll(tone, 100) + 0.02 * torch.randn(t.shape, generator=g)
    return torch.stack([left, right]).float()


def run_smoke(device_name: str = "auto", codec_name: str = "spectral", codec_ckpt: str | None = None,
              trust_pickle: bool = False) -> list[Check]:
    """Run every check and return the results (the caller prints them)."""
    checks: list[Check] = []
    state: dict = {}

    def device() -> str:
        state["device"] = resolve_device(device_name)
        return f"{state['device']} (torch {torch.__version__})"

    def dtypes() -> str:
        dev = state["device"]
        a = torch.randn(64, 64, device=dev)
        out = []
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            try:
                torch.isfinite((a.to(dtype) @ a.to(dtype)).float()).all().item()
                out.append(str(dtype).removeprefix("torch."))
            except Exception:
                pass
        return "matmul ok in " + ", ".join(out)

    def codec() -> str:
        state["codec"] = load_codec(codec_name, state["device"], codec_ckpt, trust_pickle)
        return f"{state['codec'].name} {state['codec'].version}"

    def round_trip() -> str:
        c = state["codec"]
        wave = beat_signal(2 * CHUNK_SAMPLES / SAMPLE_RATE)
        t0 = time.perf_counter()
        z = c.encode(wave)
        assert tuple(z.shape) == (2, TOKENS_PER_CHUNK, LATENT_DIM), f"encode gave {tuple(z.shape)}"
        assert torch.isfinite(z).all(), "encode gave NaN/inf"
        y = c.decode(z)
        assert tuple(y.shape) == (CHANNELS, 2 * CHUNK_SAMPLES), f"decode gave {tuple(y.shape)}"
        c.reset()
        y1 = c.decode_next(z[0])
        assert tuple(y1.shape) == (CHANNELS, CHUNK_SAMPLES), f"decode_next gave {tuple(y1.shape)}"
        rtf = (2 * CHUNK_SAMPLES / SAMPLE_RATE) / (time.perf_counter() - t0)
        return (f"encode {tuple(z.shape)}, decode {tuple(y.shape)}, decode_next {tuple(y1.shape)}; "
                f"{rtf:.1f}x real time")

    for name, fn in [("device", device), ("dtypes", dtypes), ("codec load", codec), ("codec round trip", round_trip)]:
        checks.append(_run(name, fn))
        if not checks[-1].ok and name in ("device", "codec load"):
            break
    if checks[0].ok:
        for name, fn in [("model forward", model_forward), ("one generated chunk", one_chunk)]:
            checks.append(_run(name, lambda fn=fn: fn(state["device"])))
    return checks


def _small_model(device) -> FlowDiT:
    torch.manual_seed(0)
    return FlowDiT(MODEL_PRESETS["small"]).to(device).eval()


def model_forward(device) -> str:
    """The small preset's full two-stream masked forward on this device, in the dtype training would use."""
    model, amp = _small_model(device), autocast_dtype("auto", device)
    x = torch.randn(1, 8 * TOKENS_PER_CHUNK, LATENT_DIM, device=device)  # 8 chunks
    with torch.inference_mode(), autocast(device, amp):
        out = model(torch.cat([x, x], 1), torch.rand(1, 2 * x.shape[1], device=device), torch.arange(x.shape[1]).repeat(2),
                    stream_mask(8, 4, TOKENS_PER_CHUNK, device=device))
    assert out.shape == (1, 2 * x.shape[1], LATENT_DIM) and torch.isfinite(out.float()).all(), "forward gave NaN/inf"
    return f"small model ({model.num_params() / 1e6:.1f} M) forward ok in {'bf16' if amp else 'fp32'}"


def one_chunk(device) -> str:
    """One chunk through the streaming generator (random weights), timed."""
    gen = StreamGenerator(_small_model(device), LatentStats.identity(), LIVE_SAMPLING, device,
                          autocast_dtype("auto", device))
    gen.next_chunk()  # warm-up
    t0 = time.perf_counter()
    z = gen.next_chunk()
    seconds = time.perf_counter() - t0
    assert z.shape == (1, TOKENS_PER_CHUNK, LATENT_DIM) and torch.isfinite(z).all(), "generated chunk has NaN/inf"
    return f"small model, {gen.cfg.solver} NFE {gen.evals}: {1000 * seconds:.0f} ms per chunk ({CHUNK_SAMPLES / SAMPLE_RATE / seconds:.1f}x real time)"


def print_checks(checks: list[Check]) -> None:
    table = Table(title="codicodec-flow smoke test")
    for col in ("check", "result", "detail", "s"):
        table.add_column(col)
    for c in checks:
        table.add_row(c.name, "[green]pass[/]" if c.ok else "[red]FAIL[/]", c.detail, f"{c.seconds:.2f}")
    Console().print(table)


def register(sub) -> None:
    p = sub.add_parser("smoke-test", help="check device, dtypes and codec wiring on this machine")
    add_device(p)
    add_codec(p, default="spectral")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    checks = run_smoke(a.device, a.codec, a.codec_ckpt, a.trust_codec_ckpt)
    print_checks(checks)
    return 0 if all(c.ok for c in checks) else 1
