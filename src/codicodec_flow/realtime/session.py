"""One `realtime` session: load the model and codec, wire engine, sink, recorder, input, controls and display, run."""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from ..checkpoint import load_bundle
from ..config import SampleConfig
from ..devices import autocast_dtype, resolve_device
from ..errors import FlowError
from ..sample import encode_prompt, open_codec
from .display import Display, summary_lines
from .engine import Engine, EngineConfig, Summary
from .generator import LiveGenerator
from .keyboard import KeyControls, RawKeys
from .live_input import DeviceInput, WavInput
from .protocol import open_control
from .sinks import WavWriter, open_sink
from .state import Controls, Limits, apply_message

PACES = ("auto", "realtime", "fast")


@dataclass(frozen=True)
class RealtimeConfig:
    ckpt: str
    device: str = "auto"
    codec_ckpt: str | None = None
    trust_codec_ckpt: bool = False
    solver: str = "euler"
    nfe: int = 4
    temperature: float = 1.0
    cfg_scale: float = 1.0
    context_chunks: int | None = None  # None: the checkpoint's whole window
    context_noise: float = 0.02
    seed: int = 0
    prompt_wav: str | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    sink: str = "sounddevice"
    out: str | None = None  # the file of --sink wav
    output_device: str | None = None
    pace: str = "auto"  # auto: real time, except --sink null which runs as fast as it can
    save: str | None = None
    control: str = "none"  # none | stdin | tcp:PORT | ws:PORT
    keyboard: bool = True  # keys when stdin is a terminal and not the control channel
    input_wav: str | None = None
    input_device: str | None = None
    plain: bool | None = None  # None: a live status on a terminal, per-chunk lines otherwise

    @property
    def paced(self) -> bool:
        if self.pace not in PACES:
            raise FlowError(f"unknown --pace {self.pace!r}: choose one of {', '.join(PACES)}")
        return self.pace == "realtime" or (self.pace == "auto" and self.sink != "null")


@dataclass
class SessionResult:
    summary: Summary
    saved: Path | None = None


def initial_controls(cfg: RealtimeConfig, window: int) -> Controls:
    """The start values, validated exactly like a live command (a bad flag reads like a bad message)."""
    ctx = window if cfg.context_chunks is None else cfg.context_chunks
    start = {"solver": cfg.solver, "nfe": cfg.nfe, "temperature": cfg.temperature, "cfg_scale": cfg.cfg_scale,
             "context_chunks": ctx, "seed": cfg.seed}
    return apply_message(Controls(context_chunks=window), {"set": start}, Limits(window)).controls


def run_realtime(cfg: RealtimeConfig, stdin: TextIO | None = None, stdout: TextIO | None = None) -> SessionResult:
    """Run a session until --max-chunks, the input's end, quit or Ctrl-C; prints a summary and returns it."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    if cfg.input_wav and cfg.input_device is not None:
        raise FlowError("give --input-wav or --input-device, not both")
    if cfg.sink == "sounddevice" and cfg.pace == "fast":
        raise FlowError("--pace fast does not apply to --sink sounddevice (the sound card sets the pace)")
    json_out = cfg.control == "stdin"
    text = sys.stderr if json_out else stdout  # with JSON on stdout, people read stderr ...
    # ... and any note printed while loading (codec, device) must not break the JSON stream either
    with contextlib.redirect_stdout(sys.stderr) if json_out else contextlib.nullcontext():
        return _run(cfg, stdin, stdout, text)


def _run(cfg: RealtimeConfig, stdin: TextIO, stdout: TextIO, text: TextIO) -> SessionResult:
    resources, started = [], False
    try:
        sink = open_sink(cfg.sink, cfg.out, cfg.paced, _device(cfg.output_device))  # a missing sound card fails first
        resources.append(sink)
        dev = resolve_device(cfg.device)
        bundle = load_bundle(cfg.ckpt, dev)
        window = bundle.model_cfg.context_chunks
        controls = initial_controls(cfg, window)
        codec = open_codec(bundle, dev, cfg.codec_ckpt, cfg.trust_codec_ckpt)
        source = None
        if cfg.input_wav:
            source = WavInput(cfg.input_wav, paced=cfg.paced)
        elif cfg.input_device is not None:
            source = DeviceInput(_device(cfg.input_device))
        if source is not None:
            resources.append(source)
        try:
            sample = SampleConfig(solver=controls.solver, nfe=controls.evals, n_steps=controls.steps,
                                  temperature=controls.temperature, cfg_scale=controls.cfg_scale,
                                  context_noise=cfg.context_noise, seed=controls.seed)
        except ValueError as exc:
            raise FlowError(str(exc)) from None
        gen = LiveGenerator(bundle.model, bundle.stats, sample, dev, autocast_dtype("auto", dev))
        warmup = None
        if cfg.prompt_wav:
            prompt = encode_prompt(codec, cfg.prompt_wav)  # (T, 8, 64)
            gen.prefill(prompt)
            warmup = prompt[-1]  # (8, 64): the decoder starts from the prompt's sound
        recorder = WavWriter(cfg.save) if cfg.save else None
        if recorder is not None:
            resources.append(recorder)
        engine = Engine(gen, codec, sink, cfg.engine, controls, recorder, source, warmup)
        control = open_control(cfg.control, engine, stdin, stdout)
        if control is not None:
            resources.append(control)
        print(f"realtime: {bundle.path} on {dev}, codec {codec.name}, sink {cfg.sink}"
              f"{' (real time)' if cfg.paced else ' (as fast as possible)'}"
              f"{f', input {cfg.input_wav or cfg.input_device} (--listen {cfg.engine.listen})' if source else ''}",
              file=text, flush=True)
        if hasattr(control, "port"):
            print(f"control: {cfg.control.split(':')[0]} on 127.0.0.1:{control.port}", file=text, flush=True)
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
            started = True
            try:
                summary = engine.run()
            except KeyboardInterrupt:  # Ctrl-C is the ordinary end of an endless session
                engine.stop()
                engine.wait(2.0)
                summary = engine.summary()
    finally:
        for r in reversed(resources):
            if not started and hasattr(r, "abort"):
                r.abort()  # a session that never started leaves no empty WAV behind
            else:
                r.close()
    saved = recorder.path if recorder is not None else None
    for line in summary_lines(summary, str(saved) if saved else None):
        print(line, file=text, flush=True)
    return SessionResult(summary, saved)


def _device(name: str | None) -> str | int | None:
    """PortAudio takes a device index or (part of) its name."""
    return int(name) if name is not None and name.isdigit() else name
