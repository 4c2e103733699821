"""Training monitor: a live terminal dashboard on a TTY, plain log lines (`logging`) otherwise; always metrics.jsonl."""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

_SPARK = "▁▂▃▄▅▆▇█"
log = logging.getLogger(__name__)


def sparkline(values: list[float], width: int = 48) -> str:
    vals = [v for v in values[-width:] if math.isfinite(v)]
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    span = (hi - lo) or 1.0
    return "".join(_SPARK[min(7, int((v - lo) / span * 7.999))] for v in vals)


class Monitor:
    """Receives metric dicts; shows them and appends each to run_dir/metrics.jsonl."""

    def __init__(self, run_dir: Path, total_steps: int, tui: bool, header: str):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.total_steps, self.tui, self.header = total_steps, tui, header
        self.latest: dict = {}
        self.losses: list[float] = []
        self.events: list[str] = []
        self._live: Live | None = None

    def __enter__(self) -> "Monitor":
        if self.tui:
            self._live = Live(self._render(), refresh_per_second=4, transient=False)
            self._live.start()
        else:
            log.info(self.header)
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.update(self._render())
            self._live.stop()

    def log(self, record: dict) -> None:
        """Record one set of metrics (must include 'step' and 'kind')."""
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        self.latest.update({k: v for k, v in record.items() if k != "kind"})
        if record.get("kind") == "train" and "loss" in record:
            self.losses.append(record["loss"])
        if self._live is not None:
            self._live.update(self._render())
        else:
            log.info(" ".join(_fmt(k, v) for k, v in record.items() if k != "time"))

    def event(self, message: str) -> None:
        """A one-off message (checkpoint saved, sample written)."""
        self.events = (self.events + [message])[-4:]
        if self._live is not None:
            self._live.update(self._render())
        else:
            log.info(message)

    def _render(self):
        m = self.latest
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold")
        table.add_column()
        step = m.get("step", 0)
        rows = [("step", f"{step} / {self.total_steps}  ({100 * step / max(1, self.total_steps):.1f}%)"),
                ("loss", f"{m.get('loss', float('nan')):.4f}   smoothed {m.get('loss_smooth', float('nan')):.4f}"),
                ("val loss", f"{m.get('val_loss', float('nan')):.4f}   ema {m.get('val_loss_ema', float('nan')):.4f}"),
                ("lr", f"{m.get('lr', 0):.2e}"), ("grad norm", f"{m.get('grad_norm', float('nan')):.3f}"),
                ("tokens/s", f"{m.get('tokens_per_s', 0):,.0f}"), ("eta", _hms(m.get("eta_s", 0))),
                ("last sample", str(m.get("sample", "—"))), ("loss curve", sparkline(self.losses))]
        for k, v in rows:
            table.add_row(k, v)
        return Panel(Group(Text(self.header), table, Text("\n".join(self.events), style="dim")),
                     title="codicodec-flow train")


def _hms(seconds: float) -> str:
    seconds = int(seconds or 0)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _fmt(k, v) -> str:
    if isinstance(v, float):
        return f"{k}={v:.4g}"
    return f"{k}={v}"


class QuietMonitor:
    """The monitor of DDP ranks other than 0: records and shows nothing."""

    def __enter__(self) -> "QuietMonitor":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def log(self, record: dict) -> None:
        pass

    def event(self, message: str) -> None:
        pass
