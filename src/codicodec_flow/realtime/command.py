"""The `realtime` sub-command: flags -> RealtimeConfig -> run_realtime. Imports stay light until it runs."""
from __future__ import annotations

import argparse

SINK_CHOICES = ("sounddevice", "wav", "null")
CONTROL_HELP = "none | stdin | tcp:PORT | ws:PORT (ports listen on 127.0.0.1 only; 0 picks a free one)"


def add_realtime_parser(sub) -> None:
    """Register `codicodec-flow realtime` on an argparse sub-parser collection."""
    from ..cli import codec_weight_flags
    from ..devices import DEVICE_CHOICES
    from ..solvers import SOLVERS
    p = sub.add_parser("realtime", help="play an endless stream live, steerable from keys or a JSON protocol",
                       description="Generate chunk after chunk in real time into a sound card, a WAV file or nowhere; "
                                   "steer it live; optionally accompany a live (or replayed) input.")
    p.add_argument("--ckpt", required=True, help="ema.pt (or last.pt) from train")
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES, help="compute device (default auto)")
    codec_weight_flags(p)
    g = p.add_argument_group("sampling (all changeable live)")
    g.add_argument("--solver", default="euler", choices=list(SOLVERS), help="ODE solver (default euler)")
    g.add_argument("--nfe", type=int, default=4,
                   help="model evaluations per chunk, rounded to whole steps of the solver (default 4)")
    g.add_argument("--temperature", type=float, default=1.0, help="scale of the starting noise, 0..4 (default 1)")
    g.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance, 0..10; 1 = off (default 1)")
    g.add_argument("--context-chunks", type=int, default=None,
                   help="past chunks attended, 1..W (default: the checkpoint's whole window W)")
    g.add_argument("--context-noise", type=float, default=0.02,
                   help="noise level put on each chunk before it becomes context (default 0.02)")
    g.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    g.add_argument("--crossfade-chunks", type=int, default=4,
                   help="chunks over which a live seed change blends the old noise into the new (default 4)")
    g.add_argument("--prompt-wav", default=None, help="audio whose last chunks start the context (optional)")
    o = p.add_argument_group("output")
    o.add_argument("--sink", default="sounddevice", choices=SINK_CHOICES,
                   help="sounddevice: the default sound card (PortAudio); wav: a file (--out); null: discard "
                        "(benchmarks). Default sounddevice")
    o.add_argument("--out", default=None, metavar="FILE.wav", help="the file of --sink wav (what would have played)")
    o.add_argument("--output-device", default=None, help="PortAudio output device name or index (default: system's)")
    o.add_argument("--pace", default="auto", choices=("auto", "realtime", "fast"),
                   help="realtime: wav/null sinks and --input-wav run at the speed of sound; fast: as fast as "
                        "possible; auto: realtime except with --sink null (default)")
    o.add_argument("--prebuffer", type=int, default=2,
                   help="chunks generated before playback starts; the buffer is held at this level (default 2)")
    o.add_argument("--max-chunks", type=int, default=None, help="stop after this many chunks (default: never)")
    o.add_argument("--save", default=None, metavar="FILE.wav", help="also record the generated stream to this WAV")
    c = p.add_argument_group("control")
    c.add_argument("--control", default="none", metavar="TRANSPORT", help=f"JSON control protocol: {CONTROL_HELP}")
    c.add_argument("--no-keys", action="store_true", help="no single-key controls even on a terminal")
    c.add_argument("--plain", action="store_true", help="one line per chunk instead of the live status line")
    i = p.add_argument_group("live accompaniment")
    i.add_argument("--input-wav", default=None, help="replay this file as the live input (paced like --pace)")
    i.add_argument("--input-device", default=None, help="PortAudio input device name or index")
    i.add_argument("--listen", default="input", choices=("input", "mix"),
                   help="context from the input alone, or from the input mixed with the model's own output "
                        "(default input)")
    p.set_defaults(func=run_command)


def run_command(a: argparse.Namespace) -> int:
    from ..errors import FlowError
    from .engine import EngineConfig
    from .session import RealtimeConfig, run_realtime
    try:
        engine = EngineConfig(prebuffer=a.prebuffer, crossfade_chunks=a.crossfade_chunks, max_chunks=a.max_chunks,
                              listen=a.listen)
    except ValueError as exc:
        raise FlowError(str(exc)) from None
    cfg = RealtimeConfig(ckpt=a.ckpt, device=a.device, codec_ckpt=a.codec_ckpt, trust_codec_ckpt=a.trust_codec_ckpt,
                         solver=a.solver, nfe=a.nfe, temperature=a.temperature, cfg_scale=a.cfg_scale,
                         context_chunks=a.context_chunks, context_noise=a.context_noise, seed=a.seed,
                         prompt_wav=a.prompt_wav, engine=engine, sink=a.sink, out=a.out,
                         output_device=a.output_device, pace=a.pace, save=a.save, control=a.control,
                         keyboard=not a.no_keys, input_wav=a.input_wav, input_device=a.input_device,
                         plain=True if a.plain else None)
    run_realtime(cfg)
    return 0
