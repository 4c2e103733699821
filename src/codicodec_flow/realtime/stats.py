"""What a realtime session measures: per chunk (ChunkStats, in "chunk" events) and for the session (Summary, the
"end" event and the printed summary), including the alignment of the band with a performer (lookahead.py)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np

from .lookahead import suggested_lookahead


@dataclass(frozen=True)
class ChunkStats:
    index: int
    compute_s: float  # encode (with an input) + generate + decode
    rtf: float  # chunk seconds / compute seconds: above 1 is faster than real time
    buffer_s: float  # audio queued right after this chunk was pushed
    underruns: int  # so far, whole session
    latency_s: float | None = None  # input chunk complete -> this chunk decoded and in the ring
    play_delay_s: float | None = None  # ... plus the audio queued ahead of it: when it starts to sound
    slot: int | None = None  # the input chunk it lines up with (lookahead: k + N; else the one it answered)
    ready_s: float | None = None  # the performer started the input chunk it answered -> this chunk queued
    late_s: float | None = None  # lookahead: how much of its start missed its slot (0: on time)
    catch_up: bool = False  # lookahead: made with others in one step (the start, an input gap): late or not, that
    # is the burst's doing, not a verdict on the generator; all but the last of a burst play only if on time
    alignment_s: float | None = None  # started sounding - the performer started input chunk `slot` (once played)


@dataclass
class Summary:
    chunks: int = 0
    audio_s: float = 0.0
    wall_s: float = 0.0  # start to end of the generation loop, waits included
    compute_mean_s: float = 0.0
    compute_p95_s: float = 0.0
    rtf: float = 0.0  # sustained: audio seconds / compute seconds over the whole session
    wall_rtf: float = 0.0  # audio seconds / wall seconds (equals rtf's meaning only when unthrottled)
    underruns: int = 0
    peak_buffer_s: float = 0.0
    latency_mean_s: float | None = None
    latency_p95_s: float | None = None
    play_delay_mean_s: float | None = None
    lookahead: int = 0
    aligned_chunks: int = 0  # chunks whose alignment was measured (they sounded, against a clocked input)
    alignment_mean_s: float | None = None  # (started sounding) - (performer started that input chunk), mean
    alignment_p95_s: float | None = None  # ... 95th percentile of its size
    alignment_max_s: float | None = None  # ... largest size
    late_chunks: int = 0  # lookahead: chunks that missed their slot (cut to the grid, or dropped; catch-up aside)
    dropped_chunks: int = 0  # ... of which none was left to play
    suggested_lookahead: int | None = None  # the smallest --lookahead these chunks would have been in time for
    input_latency_s: float | None = None  # the input's capture latency, as its clock reports it (a file: 0)
    output_latency_s: float | None = None  # the sink's output latency, as reported (a timer sink: 0)
    per_chunk: list[ChunkStats] = field(default_factory=list, repr=False)  # the last STATS_WINDOW chunks

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "per_chunk"}


def summarise(per_chunk: list[ChunkStats], totals: Summary, read_ahead_s: float, period: float,
              chunk_s: float) -> Summary:
    """`totals` (the session's counts) completed with the figures of the per-chunk stats.

    read_ahead_s: how long before a sample sounds the sink takes it; period: seconds between input chunks;
    chunk_s: a chunk's length on the sink's clock (a late chunk cut by that much was dropped)."""
    compute = np.array([c.compute_s for c in per_chunk]) if per_chunk else np.zeros(1)
    lat = [c.latency_s for c in per_chunk if c.latency_s is not None]
    delay = [c.play_delay_s for c in per_chunk if c.play_delay_s is not None]
    aligned = np.array([c.alignment_s for c in per_chunk if c.alignment_s is not None])
    size = np.abs(aligned)
    late = [c for c in per_chunk if c.late_s and not c.catch_up]
    return replace(
        totals, compute_p95_s=float(np.percentile(compute, 95)),
        latency_mean_s=float(np.mean(lat)) if lat else None,
        latency_p95_s=float(np.percentile(lat, 95)) if lat else None,
        play_delay_mean_s=float(np.mean(delay)) if delay else None,
        aligned_chunks=len(aligned), alignment_mean_s=float(aligned.mean()) if len(aligned) else None,
        alignment_p95_s=float(np.percentile(size, 95)) if len(size) else None,
        alignment_max_s=float(size.max()) if len(size) else None,
        late_chunks=len(late), dropped_chunks=sum(c.late_s >= chunk_s - 1e-9 for c in late),
        suggested_lookahead=suggested_lookahead(
            [c.ready_s for c in per_chunk if c.ready_s is not None and not c.catch_up], read_ahead_s, period),
        per_chunk=per_chunk)
