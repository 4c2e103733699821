"""`codicodec-flow realtime`: flags -> RealtimeConfig -> run_realtime (the session lives in realtime/session.py)."""
from __future__ import annotations

import argparse

from ..config import LIVE_SAMPLING
from ..errors import FlowError
from ..realtime.engine import EngineConfig
from ..realtime.live_input import LISTEN_MODES
from ..realtime.lookahead import MAX_LOOKAHEAD
from ..realtime.ort_backend import BACKENDS
from ..realtime.midi import VIRTUAL_NAME, input_names
from ..realtime.protocol import CONTROL_HELP
from ..realtime.session import PACES, RealtimeConfig, run_realtime
from ..realtime.sinks import SINKS
from ..realtime.state import MAX_GAIN, Controls
from .flags import add_codec_weights, add_device, add_sampling, add_threads, add_weights, sample_config


def register(sub) -> None:
    d = EngineConfig()
    p = sub.add_parser("realtime", help="play an endless stream live, steerable from keys or a JSON protocol",
                       description="Generate chunk after chunk in real time into a sound card, a WAV file or nowhere; "
                                   "steer it live; optionally accompany a live (or replayed) input.")
    p.add_argument("--ckpt", default=None, help="ema.pt (or last.pt) from train (required, except for --midi list)")
    add_device(p)
    add_threads(p)
    p.add_argument("--backend", default="torch", choices=BACKENDS,
                   help="torch: PyTorch (default); onnxruntime: the model exported to ONNX, run by onnxruntime on the "
                        "CPU (exported at start-up unless --onnx is given; pip install -e '.[export]')")
    p.add_argument("--onnx", default=None, metavar="DIR",
                   help="with --backend onnxruntime, run this folder from `export --format onnx` of the same "
                        "checkpoint instead of exporting at start-up")
    add_codec_weights(p)
    add_sampling(p, LIVE_SAMPLING, "sampling (solver, NFE, temperature, guidance and seed are changeable live)")
    g = p.add_argument_group("context")
    g.add_argument("--context-chunks", type=int, default=None,
                   help="past chunks attended, 1..W, changeable live (default: the checkpoint's whole window W)")
    g.add_argument("--crossfade-chunks", type=int, default=Controls.crossfade_chunks,
                   help=f"chunks over which a live seed change blends the old noise into the new, 1..64, changeable "
                        f"live (default {Controls.crossfade_chunks})")
    g.add_argument("--prompt-wav", default=None, help="audio whose last chunks start the context (optional)")
    o = p.add_argument_group("output")
    o.add_argument("--sink", default="sounddevice", choices=SINKS,
                   help="sounddevice: the default sound card (PortAudio); wav: a file (--out); null: discard "
                        "(benchmarks). Default sounddevice")
    o.add_argument("--out", default=None, metavar="FILE.wav", help="the file of --sink wav (what would have played)")
    o.add_argument("--output-device", default=None, help="PortAudio output device name or index (default: system's)")
    o.add_argument("--pace", default="auto", choices=PACES,
                   help="realtime: wav/null sinks and --input-wav run at the speed of sound; fast: as fast as "
                        "possible; auto: realtime except with --sink null (default)")
    o.add_argument("--prebuffer", type=int, default=d.prebuffer,
                   help=f"chunks generated before playback starts; the buffer is held at this level "
                        f"(default {d.prebuffer})")
    o.add_argument("--max-chunks", type=int, default=None, help="stop after this many chunks (default: never)")
    o.add_argument("--save", default=None, metavar="FILE.wav", help="also record the generated stream to this WAV")
    o.add_argument("--gain", type=float, default=Controls.gain,
                   help=f"output gain 0..{MAX_GAIN:g} (+6 dB), changeable live; above 1 a limiter keeps each chunk "
                        f"under full scale (default {Controls.gain:g})")
    add_weights(o)
    o.add_argument("--presets", default=None, metavar="DIR",
                   help="where presets are saved and recalled (default: $XDG_CONFIG_HOME/codicodec-flow/presets, "
                        "else ~/.config/codicodec-flow/presets)")
    o.add_argument("--preset", default=None, metavar="NAME",
                   help="start from this saved preset (flags for the same controls are overridden)")
    c = p.add_argument_group("control")
    c.add_argument("--control", default="none", metavar="TRANSPORT", help=f"JSON control protocol: {CONTROL_HELP}")
    c.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="with --control ws:PORT or --ui PORT, also accept web pages from this origin "
                        "(scheme://host[:port]; repeatable). Pages served by this machine (http://localhost:ANY) are "
                        "always accepted; 'null' (file:// pages, sandboxed frames) never")
    c.add_argument("--ui", type=int, default=None, metavar="PORT",
                   help="serve the browser control surface on http://127.0.0.1:PORT (0 picks a free port and prints "
                        "the address): sliders for every control, seeds, presets, LFOs, the steering grid, a live "
                        "latent heat-map and level meter")
    c.add_argument("--ui-host", default=None, metavar="HOST",
                   help="with --ui, listen on this interface instead of 127.0.0.1 (e.g. 0.0.0.0 for a tablet on the "
                        "LAN). The page has no password: anyone who reaches it can steer the stream")
    c.add_argument("--osc-host", default=None, metavar="HOST",
                   help="with --control osc:PORT, listen on this interface instead of 127.0.0.1 (e.g. 0.0.0.0 for "
                        "a tablet on the LAN). OSC has no authentication: anyone who reaches it can steer the stream")
    c.add_argument("--osc-reply-port", type=int, default=None, metavar="PORT",
                   help="with --control osc:PORT, send replies and events to this port on the sender's host "
                        "(default: the port the sender sent from)")
    m = p.add_argument_group("MIDI")
    m.add_argument("--midi", default=None, metavar="PORT",
                   help="steer from a MIDI controller: an input port's index or (part of) its name; 'virtual' opens a "
                        f"port named {VIRTUAL_NAME} for a DAW to send to; 'list' lists the input ports and exits")
    m.add_argument("--midi-map", default=None, metavar="FILE.json",
                   help="knobs (CC) and pads (notes) -> controls; learn mode saves to it (default: the built-in map "
                        "for an 8-knob controller, CC 70-77 and notes 36-39)")
    m.add_argument("--midi-learn", default=None, metavar="CONTROL",
                   help="bind the first knob moved to CONTROL (e.g. temperature, channel_bias/12) and save the map")
    c.add_argument("--no-keys", action="store_true", help="no single-key controls even on a terminal")
    c.add_argument("--plain", action="store_true", help="one line per chunk instead of the live status line")
    i = p.add_argument_group("live accompaniment")
    i.add_argument("--input-wav", default=None, help="replay this file as the live input (paced like --pace)")
    i.add_argument("--input-device", default=None, help="PortAudio input device name or index")
    i.add_argument("--listen", default=d.listen, choices=LISTEN_MODES,
                   help="context from the input alone, or from the input mixed with the model's own output "
                        f"(default {d.listen})")
    i.add_argument("--lookahead", type=int, default=d.lookahead, metavar="N",
                   help=f"play in time with the performer: when input chunk k is complete, make the chunk for k + N "
                        f"(the model guesses the N - 1 chunks in between, replaced by the real ones as they come) and "
                        f"start it when the performer starts chunk k + N, input and output latency taken out. "
                        f"0..{MAX_LOOKAHEAD}; 0: off, each chunk plays as soon as it is ready, about a chunk and "
                        f"play_delay late (default {d.lookahead}). The summary suggests the smallest N that fits")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    if a.midi == "list":
        names = input_names()
        print("\n".join(f"{i}: {n}" for i, n in enumerate(names)) if names else "no MIDI input ports")
        return 0
    if a.ckpt is None:
        raise FlowError("realtime needs --ckpt (the ema.pt or last.pt that train wrote)")
    try:
        engine = EngineConfig(prebuffer=a.prebuffer, max_chunks=a.max_chunks, listen=a.listen, lookahead=a.lookahead)
    except ValueError as exc:
        raise FlowError(str(exc)) from None
    cfg = RealtimeConfig(ckpt=a.ckpt, device=a.device, codec_ckpt=a.codec_ckpt, trust_codec_ckpt=a.trust_codec_ckpt,
                         sample=sample_config(a, LIVE_SAMPLING), context_chunks=a.context_chunks,
                         prompt_wav=a.prompt_wav, engine=engine, sink=a.sink, out=a.out,
                         output_device=a.output_device, pace=a.pace, save=a.save, control=a.control,
                         keyboard=not a.no_keys, input_wav=a.input_wav, input_device=a.input_device,
                         plain=True if a.plain else None, allow_origins=tuple(a.allow_origin), ui=a.ui,
                         ui_host=a.ui_host, threads=a.threads,
                         osc_host=a.osc_host, osc_reply_port=a.osc_reply_port, midi=a.midi, midi_map=a.midi_map,
                         midi_learn=a.midi_learn, backend=a.backend, onnx=a.onnx,
                         crossfade_chunks=a.crossfade_chunks, gain=a.gain, weights=a.weights, presets=a.presets,
                         preset=a.preset)
    run_realtime(cfg)
    return 0
