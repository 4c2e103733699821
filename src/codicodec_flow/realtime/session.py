"""One `realtime` session: load the model and codec, wire engine, sink, recorder, input, controls and display, run."""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from ..checkpoint import load_bundle
from ..codec.prompt import encode_prompt
from ..config import LIVE_SAMPLING, SampleConfig
from ..errors import FlowError
from ..util.devices import autocast_dtype, live_threads, resolve_device, torch_threads
from .display import Display, summary_lines
from .engine import Engine, EngineConfig, Summary
from .generator import LiveGenerator
from .keyboard import KeyControls, RawKeys
from .live_input import DeviceInput, WavInput
from .ort_backend import BACKENDS, OrtLiveGenerator, load_onnx
from .midi import MidiControl, open_input
from .midi_map import load_map
from .osc import exposed, exposure_warning
from .presets import PresetStore
from .protocol import open_control
from .sinks import WavWriter, open_sink
from .state import Controls, Limits, apply_message
from .ui_server import UiServer, exposure_warning as ui_exposure_warning
from .websocket import normalise_origin

PACES = ("auto", "realtime", "fast")


@dataclass(frozen=True)
class RealtimeConfig:
    ckpt: str
    device: str = "auto"
    codec_ckpt: str | None = None
    trust_codec_ckpt: bool = False
    sample: SampleConfig = LIVE_SAMPLING  # solver, NFE, temperature, guidance, seed: the start values of the controls
    context_chunks: int | None = None  # None: the checkpoint's whole window
    prompt_wav: str | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    sink: str = "sounddevice"
    out: str | None = None  # the file of --sink wav
    output_device: str | None = None
    pace: str = "auto"  # auto: real time, except --sink null which runs as fast as it can (unless --lookahead)
    save: str | None = None
    control: str = "none"  # none | stdin | tcp:PORT | ws:PORT | osc:PORT
    keyboard: bool = True  # keys when stdin is a terminal and not the control channel
    input_wav: str | None = None
    input_device: str | None = None
    plain: bool | None = None  # None: a live status on a terminal, per-chunk lines otherwise
    allow_origins: tuple[str, ...] = ()  # web origins ws: and --ui accept besides this machine's own pages
    ui: int | None = None  # the browser control surface's port (0: a free one); None: no page
    ui_host: str | None = None  # the interface the page listens on; None: 127.0.0.1
    threads: int | None = None  # torch's intra-op threads while generating; None: live_threads()
    osc_host: str | None = None  # the interface an osc: control listens on; None: 127.0.0.1
    osc_reply_port: int | None = None  # where OSC replies and events go on the sender's host; None: its own port
    backend: str = "torch"  # torch | onnxruntime (the exported graphs, on the CPU)
    onnx: str | None = None  # with onnxruntime: a folder from `export --format onnx`; None: export now
    midi: str | None = None  # a MIDI input: "virtual", a port index or (part of) its name; None: no MIDI
    midi_map: str | None = None  # the mapping file (JSON; learn writes it); None or absent: midi.DEFAULT_MAP
    midi_learn: str | None = None  # bind the first knob moved to this control
    crossfade_chunks: int = Controls.crossfade_chunks  # start value of the live control
    gain: float = Controls.gain  # start value of the live control
    weights: str = "ema"  # "raw": last.pt's raw training weights instead of the EMA ones
    presets: str | None = None  # the preset folder; None: presets.default_dir()
    preset: str | None = None  # a saved preset to start from

    @property
    def paced(self) -> bool:
        if self.pace not in PACES:
            raise FlowError(f"unknown --pace {self.pace!r}: choose one of {', '.join(PACES)}")
        return self.pace == "realtime" or (self.pace == "auto" and (self.sink != "null" or self.engine.lookahead > 0))


@dataclass
class SessionResult:
    summary: Summary
    saved: Path | None = None


def initial_controls(cfg: RealtimeConfig, window: int, presets: PresetStore | None = None) -> Controls:
    """The start values, validated exactly like a live command (a bad flag reads like a bad message); --preset
    then recalls a saved state over them."""
    s = cfg.sample
    start = {"solver": s.solver, "nfe": s.nfe, "temperature": s.temperature, "cfg_scale": s.cfg_scale,
             "context_chunks": window if cfg.context_chunks is None else cfg.context_chunks, "seed": s.seed,
             "crossfade_chunks": cfg.crossfade_chunks, "gain": cfg.gain}
    limits = Limits(window, presets=presets)
    c = apply_message(Controls(context_chunks=window), {"set": start}, limits).controls
    return c if cfg.preset is None else apply_message(c, {"preset": {"recall": cfg.preset}}, limits).controls


def run_realtime(cfg: RealtimeConfig, stdin: TextIO | None = None, stdout: TextIO | None = None) -> SessionResult:
    """Run a session until --max-chunks, the input's end, quit or Ctrl-C; prints a summary and returns it.

    With --control stdin, stdout carries the JSON events alone and what people read goes to stderr.
    """
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    if cfg.input_wav and cfg.input_device is not None:
        raise FlowError("give --input-wav or --input-device, not both")
    if cfg.sink == "sounddevice" and cfg.pace == "fast":
        raise FlowError("--pace fast does not apply to --sink sounddevice (the sound card sets the pace)")
    if cfg.engine.lookahead and not (cfg.input_wav or cfg.input_device is not None):
        raise FlowError("--lookahead lines the band up with a performer: give --input-wav FILE or --input-device NAME")
    if cfg.engine.lookahead and not cfg.paced:
        raise FlowError("--lookahead plays on the performer's clock: leave --pace at auto or realtime, not fast")
    origins = _origins(cfg)
    if (cfg.osc_host is not None or cfg.osc_reply_port is not None) and not cfg.control.startswith("osc:"):
        raise FlowError("--osc-host and --osc-reply-port apply to --control osc:PORT only")
    if cfg.ui_host is not None and cfg.ui is None:
        raise FlowError("--ui-host applies with --ui PORT only")
    if (cfg.midi_map is not None or cfg.midi_learn is not None) and cfg.midi is None:
        raise FlowError("--midi-map and --midi-learn apply with --midi PORT only")
    midi_map = load_map(cfg.midi_map) if cfg.midi is not None else None  # a broken file fails before the model loads
    _check_backend(cfg)
    text = sys.stderr if cfg.control == "stdin" else stdout
    with torch_threads(live_threads() if cfg.threads is None else cfg.threads) as threads, _Resources() as resources:
        sink = resources.hold(open_sink(cfg.sink, cfg.out, cfg.paced, _device(cfg.output_device)))  # no sound card: fail first
        midi_port = resources.hold(open_input(cfg.midi)) if cfg.midi is not None else None
        dev = resolve_device("cpu" if cfg.backend == "onnxruntime" and cfg.device == "auto" else cfg.device)
        if cfg.backend == "onnxruntime" and dev.type != "cpu":
            raise FlowError(f"--backend onnxruntime runs on the CPU; use --device cpu or auto, not {cfg.device}")
        bundle = load_bundle(cfg.ckpt, dev, cfg.weights)
        window = bundle.model_cfg.context_chunks
        presets = PresetStore(cfg.presets)
        controls = initial_controls(cfg, window, presets)
        codec = bundle.open_codec(dev, cfg.codec_ckpt, cfg.trust_codec_ckpt)
        source = None
        if cfg.input_wav:
            source = WavInput(cfg.input_wav, paced=cfg.paced)
        elif cfg.input_device is not None:
            source = DeviceInput(_device(cfg.input_device))
        if source is not None:
            resources.hold(source)
        if cfg.backend == "onnxruntime":
            gen = OrtLiveGenerator(bundle.model, bundle.stats, cfg.sample,
                                   load_onnx(bundle.model, bundle.stats, cfg.onnx, threads))
        else:
            gen = LiveGenerator(bundle.model, bundle.stats, cfg.sample, dev, autocast_dtype("auto", dev))
        warmup = None
        if cfg.prompt_wav:
            prompt = encode_prompt(codec, cfg.prompt_wav)  # (T, 8, 64)
            gen.prefill(prompt)
            warmup = prompt[-1]  # (8, 64): the decoder starts from the prompt's sound
        recorder = resources.hold(WavWriter(cfg.save)) if cfg.save else None
        engine = Engine(gen, codec, sink, cfg.engine, controls, recorder, source, warmup, presets,
                        {"checkpoint": bundle.path, "step": bundle.step, "weights": bundle.weights})
        control = open_control(cfg.control, engine, stdin, stdout, origins, cfg.osc_host or "127.0.0.1",
                               cfg.osc_reply_port)
        if control is not None:
            resources.hold(control)
        ui = resources.hold(UiServer(engine, cfg.ui, cfg.ui_host or "127.0.0.1", origins)) if cfg.ui is not None \
            else None
        if midi_port is not None:
            resources.hold(MidiControl(engine, midi_port, midi_map, cfg.midi_map, cfg.midi_learn))
        print(f"realtime: {bundle.path} on {dev}{' (onnxruntime)' * (cfg.backend == 'onnxruntime')} "
              f"with {threads} thread{'s' * (threads > 1)}, "
              f"codec {codec.name}, sink {cfg.sink}"
              f"{' (real time)' if cfg.paced else ' (as fast as possible)'}"
              f"{f', input {cfg.input_wav or cfg.input_device} (--listen {cfg.engine.listen}' if source else ''}"
              f"{f', --lookahead {cfg.engine.lookahead}' if cfg.engine.lookahead else ''}{')' if source else ''}",
              file=text, flush=True)
        if hasattr(control, "port"):
            host = getattr(control, "host", "127.0.0.1")
            print(f"control: {cfg.control.split(':')[0]} on {host}:{control.port}", file=text, flush=True)
            if cfg.osc_host is not None and exposed(cfg.osc_host):
                print(exposure_warning(host, control.port), file=text, flush=True)
        if ui is not None:
            print(f"ui: {ui.url} (open it in a browser)", file=text, flush=True)
            if exposed(ui.host):
                print(ui_exposure_warning(ui.host, ui.port), file=text, flush=True)
        if midi_port is not None:
            print(f"midi: {midi_port.name}, map {cfg.midi_map or 'built-in'}"
                  f"{'' if cfg.midi_map is None or Path(cfg.midi_map).exists() else ' (not there yet: built-in)'}",
                  file=text, flush=True)
        summary = _play(cfg, engine, stdin, text, window, resources)
    saved = recorder.path if recorder is not None else None
    for line in summary_lines(summary, str(saved) if saved else None):
        print(line, file=text, flush=True)
    return SessionResult(summary, saved)


def _check_backend(cfg: RealtimeConfig) -> None:
    if cfg.backend not in BACKENDS:
        raise FlowError(f"unknown --backend {cfg.backend!r}: choose one of {', '.join(BACKENDS)}")
    if cfg.onnx is not None and cfg.backend != "onnxruntime":
        raise FlowError("--onnx applies to --backend onnxruntime only")
    if cfg.backend == "onnxruntime" and cfg.sample.precision != "fp32":
        raise FlowError(f"--precision {cfg.sample.precision} applies to --backend torch; onnxruntime runs the float32 "
                        f"export")
    if cfg.backend == "onnxruntime" and cfg.sample.cuda_graphs:
        raise FlowError("--cuda-graphs applies to --backend torch on a CUDA GPU; onnxruntime runs on the CPU")


def _origins(cfg: RealtimeConfig) -> tuple[str, ...]:
    """The --allow-origin values, checked before anything starts."""
    if cfg.allow_origins and not cfg.control.startswith("ws:") and cfg.ui is None:
        raise FlowError("--allow-origin applies to --control ws:PORT only (and to --ui PORT)")
    try:
        return tuple(normalise_origin(o) for o in cfg.allow_origins)
    except ValueError as exc:
        raise FlowError(f"--allow-origin: {exc}") from None


class _Resources(contextlib.ExitStack):
    """What a session opened, closed in reverse order at its end; if it never started, what can abort() is aborted
    instead (a sink or recorder that never played leaves no empty WAV behind)."""
    started = False

    def hold(self, thing):
        self.callback(lambda: thing.close() if self.started or not hasattr(thing, "abort") else thing.abort())
        return thing


def _play(cfg: RealtimeConfig, engine: Engine, stdin: TextIO, text: TextIO, window: int,
          resources: _Resources) -> Summary:
    """Put up the display and the keys, and run the engine until it ends."""
    live = (not cfg.plain) if cfg.plain is not None else getattr(text, "isatty", lambda: False)()
    display = Display(engine, live, text, window)
    keys_wanted = cfg.keyboard and cfg.control != "stdin"
    keys = KeyControls(engine, display.note, display.show_help) if keys_wanted else None
    if keys is not None:
        display.cursor = lambda: keys.cursor.label()
    with display, RawKeys(keys.press if keys else None, stdin) as raw:
        if keys_wanted and not raw.active:
            print("note: keyboard controls are off (stdin is not a terminal); use --control stdin or tcp:PORT",
                  file=text, flush=True)
        resources.started = True  # from here on the sink and recorder are closed, not aborted
        try:
            return engine.run()
        except KeyboardInterrupt:  # Ctrl-C is the ordinary end of an endless session
            engine.stop()
            engine.wait(2.0)
            return engine.summary()


def _device(name: str | None) -> str | int | None:
    """PortAudio takes a device index or (part of) its name."""
    return int(name) if name is not None and name.isdigit() else name
