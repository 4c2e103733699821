"""What a person watching sees: a live status line on a terminal, one plain line per chunk elsewhere, a summary."""
from __future__ import annotations

import sys
from typing import Callable, TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from ..solvers import get_solver, steps_for
from .engine import Summary
from .keyboard import KEYMAP


def state_text(s: dict, window: int | None = None) -> str:
    """The controls in one line: solver, NFE, temperature, guidance, context, gain, seed, steering.

    Where `s` carries "effective" (the values a chunk is generated with, LFOs and a glide applied: a chunk event's
    state, Engine.state()) those are shown, and a control an LFO or a glide is moving is marked with a '~'."""
    moving = modulated_names(s)
    eff = s.get("effective") or {}
    value = lambda name: eff.get(name, s[name])  # noqa: E731
    mark = lambda name: "~" if name in moving else ""  # noqa: E731
    xf = s.get("crossfade")
    seed = f"seed {s['seed']}" + (f" (crossfade {xf[0]}/{xf[1]})" if xf else "")
    ctx = f"ctx {value('context_chunks')}{mark('context_chunks')}" + (f"/{window}" if window else "")
    steps, evals = s["steps"], s["evals"]
    if "nfe" in eff and eff["nfe"] != s["nfe"]:  # an LFO'd NFE: the steps it rounds to now
        steps = steps_for(s["solver"], eff["nfe"])
        evals = steps * get_solver(s["solver"]).evals_per_step
    gain = value("gain") if "gain" in s else 1.0
    level = f"  gain {gain:.2f}{mark('gain')}" if gain != 1.0 or mark("gain") else ""
    return (f"{s['solver']} nfe {evals}{mark('nfe')} ({steps} step{'s' if steps != 1 else ''})  temp "
            f"{value('temperature'):.2f}{mark('temperature')}  cfg {value('cfg_scale'):.2f}{mark('cfg_scale')}  "
            f"{ctx}{level}  {seed}  {steering_text(s, moving)}")


def modulated_names(s: dict) -> set[str]:
    """The controls an LFO that is on, or a glide in progress, moves (from a state dict's "lfos" and "morph")."""
    names = {lfo["target"] for lfo in s.get("lfos") or () if lfo.get("on", True) and lfo.get("depth", 1) != 0}
    return names | set((s.get("morph") or {}).get("fields", ()))


def steering_text(s: dict, moving: set[str] = frozenset()) -> str:
    """Only what differs from neutral (the effective values where `s` has them), so an unsteered stream reads
    'steer: off'; a vector an LFO or a glide moves is marked with a '~' even while it passes neutral."""
    eff, parts = s.get("effective") or {}, []
    for name, neutral in (("token_scale", 1.0), ("token_bias", 0.0), ("channel_scale", 1.0), ("channel_bias", 0.0)):
        changed = [(i, v) for i, v in enumerate(eff.get(name, s[name])) if v != neutral]
        label = name + ("~" if name in moving else "")
        if changed:
            shown = " ".join(f"{i}:{v:+.1f}" if "bias" in name else f"{i}:x{v:.1f}" for i, v in changed[:4])
            parts.append(f"{label} {shown}" + (f" (+{len(changed) - 4} more)" if len(changed) > 4 else ""))
        elif name in moving:
            parts.append(f"{label} neutral now")
    return "steer: " + ("; ".join(parts) if parts else "off")


def chunk_text(ev: dict, alignment: float | None = None) -> str:
    """A chunk event in one line; `alignment`: the latest played chunk's alignment error, if measured."""
    line = (f"chunk {ev['index']:5d}  compute {1000 * ev['compute_s']:7.1f} ms  {ev['rtf']:6.1f}x real time  "
            f"buffer {ev['buffer_s']:4.2f} s  underruns {ev['underruns']}")
    if ev.get("latency_s") is not None:
        line += f"  latency {ev['latency_s']:.3f} s"
        if ev.get("play_delay_s") is not None:
            line += f" (heard after {ev['play_delay_s']:.2f} s)"
    if ev.get("late_s"):
        line += f"  slot {ev['slot']} missed by {ev['late_s']:.3f} s" + (" (catch-up)" if ev.get("catch_up") else "")
    if alignment is not None:
        line += f"  align {alignment:+.3f} s"
    return line


def summary_lines(s: Summary, saved: str | None = None) -> list[str]:
    lines = [f"chunks {s.chunks} ({s.audio_s:.1f} s of audio) in {s.wall_s:.1f} s",
             f"compute per chunk: mean {1000 * s.compute_mean_s:.1f} ms, p95 {1000 * s.compute_p95_s:.1f} ms; "
             f"sustained {s.rtf:.1f}x real time (audio / compute)",
             f"underruns {s.underruns}; peak buffer {s.peak_buffer_s:.2f} s"]
    if s.latency_mean_s is not None:
        lines.append(f"input -> generated chunk latency: mean {s.latency_mean_s:.3f} s, p95 {s.latency_p95_s:.3f} s; "
                     f"heard after {s.play_delay_mean_s:.2f} s on average (latency + audio queued ahead)"
                     if s.play_delay_mean_s is not None else
                     f"input -> generated chunk latency: mean {s.latency_mean_s:.3f} s, p95 {s.latency_p95_s:.3f} s")
    if s.aligned_chunks:
        lines.append(f"alignment (output chunk j starts - performer starts input chunk j) over {s.aligned_chunks} "
                     f"chunks: mean {s.alignment_mean_s:+.3f} s, p95 {s.alignment_p95_s:.3f} s, max "
                     f"{s.alignment_max_s:.3f} s" + (f" (--lookahead {s.lookahead})" if s.lookahead else ""))
    if s.late_chunks:
        lines.append(f"TOO SLOW for --lookahead {s.lookahead}: {s.late_chunks} chunks missed their slot "
                     f"({s.dropped_chunks} dropped whole, the rest cut to the grid); "
                     + (f"--lookahead {s.suggested_lookahead} would have fit"
                        if s.suggested_lookahead and s.suggested_lookahead > s.lookahead else
                        "lower --nfe or use a faster device"))
    elif s.suggested_lookahead is not None and s.aligned_chunks and not s.lookahead:
        lines.append(f"the band played {s.alignment_mean_s:.2f} s behind the performer; --lookahead "
                     f"{s.suggested_lookahead} would line it up")
    if saved:
        lines.append(f"saved {saved}")
    return lines


class Display:
    """An engine listener: a live status on a terminal (live=True), else one line per chunk on `stream`."""

    def __init__(self, engine, live: bool, stream: TextIO | None = None, window: int | None = None,
                 cursor: Callable[[], str] | None = None):
        self.engine, self.live, self.window, self.cursor = engine, live, window, cursor
        self.stream = stream or sys.stdout
        self.console = Console(file=self.stream)
        self._last: dict | None = None
        self._alignment: float | None = None  # the latest played chunk's
        self._note = ""
        self._live: Live | None = None
        engine.subscribe(self.on_event)

    def __enter__(self) -> "Display":
        if self.live:
            self._live = Live(self._render(), console=self.console, refresh_per_second=8, transient=False)
            self._live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.update(self._render())
            self._live.stop()

    def on_event(self, ev: dict) -> None:
        if ev.get("event") == "played":
            self._alignment = ev["alignment_s"]
            return
        if ev.get("event") == "late" and self._live is not None:
            self.note(f"chunk {ev['index']} missed its slot by {ev['late_s']:.3f} s: too slow for --lookahead "
                      f"{ev['lookahead']}" + (f" (try {ev['suggested_lookahead']})" if ev.get("suggested_lookahead")
                                              else ""))
            return
        if ev.get("event") != "chunk":
            return
        self._last = ev
        if self._live is not None:
            self._live.update(self._render())
        else:
            print(f"{chunk_text(ev, self._alignment)}  |  {state_text(ev['state'], self.window)}", file=self.stream,
                  flush=True)

    def note(self, text: str) -> None:
        """A one-line message (a key's effect); on a terminal it stays under the status until the next one."""
        self._note = text
        if self._live is not None:
            self._live.update(self._render())

    def show_help(self) -> None:
        width = max(len(k) for k, _ in KEYMAP)
        lines = "\n".join(f"  {k:<{width}}  {what}" for k, what in KEYMAP)
        self.console.print(f"keys:\n{lines}", markup=False, highlight=False)

    def _render(self):
        top = Text(chunk_text(self._last, self._alignment) if self._last else "starting (filling the buffer) ...",
                   style="bold")
        state = Text(state_text(self.engine.state(), self.window))
        bottom = Text((f"[{self.cursor()}]  " if self.cursor else "") + self._note +
                      "   (~ moved by an LFO or glide; h: help, q: quit)",
                      style="dim")
        return Group(top, state, bottom)
