"""`codicodec-flow bench`: how fast generation and training run on this machine, as a table and JSON."""
from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.table import Table

from ..config import MODEL_PRESETS, PRECISIONS
from ..errors import FlowError
from ..evaluation.bench import BENCH_BACKENDS, BenchConfig, run_bench
from ..util.fsutil import write_text_atomic
from .flags import add_device, add_threads, finite_float


def register(sub) -> None:
    d = BenchConfig()
    p = sub.add_parser("bench", help="speed of generation (cache vs re-run), long streams and training on this machine")
    add_device(p, d.device)
    p.add_argument("--sizes", default=",".join(d.sizes), help=f"model presets, comma-separated (default {','.join(d.sizes)})")
    p.add_argument("--solvers", default=",".join(d.solvers), help=f"solvers (default {','.join(d.solvers)})")
    p.add_argument("--nfes", default=",".join(map(str, d.nfes)), help=f"NFE values (default {','.join(map(str, d.nfes))})")
    p.add_argument("--context-chunks", type=int, default=d.context_chunks,
                   help=f"window for every figure (default {d.context_chunks})")
    p.add_argument("--measure-chunks", type=int, default=d.measure_chunks, help="chunks timed per cached setting")
    p.add_argument("--rerun-chunks", type=int, default=d.rerun_chunks,
                   help="chunks timed for the re-run-the-window reference, after one untimed (0 skips it)")
    p.add_argument("--long-chunks", type=int, default=d.long_chunks, help="length of the long stream (0 skips)")
    p.add_argument("--codec", default=d.codec, choices=("auto", "codicodec", "spectral", "none"),
                   help="codec for flow + decode figures (auto: codicodec if installed, else spectral)")
    p.add_argument("--train-steps", type=int, default=d.train_steps, help="timed training steps (0 skips)")
    p.add_argument("--train-batch", type=int, default=None, help="training batch (default 8 on GPUs, 1 on CPU)")
    p.add_argument("--train-crop", type=int, default=None, help="training crop tokens (default 768 on GPUs, 128 on CPU)")
    p.add_argument("--train-noisy-chunks", type=int, default=d.train_noisy_chunks, metavar="K",
                   help="noisy chunks trained per crop in the training figure, as train --noisy-chunks (default 0: "
                        "as --train-noisy-share says)")
    p.add_argument("--train-noisy-share", type=finite_float, default=d.train_noisy_share, metavar="F",
                   help=f"share of each crop's chunks trained as noisy chunks in the training figure, as train "
                        f"--noisy-share (default {d.train_noisy_share:g}, train's; 1: all)")
    p.add_argument("--train-only", action="store_true",
                   help="only the training figure (no generation, long stream or realtime engine)")
    p.add_argument("--realtime-chunks", type=int, default=d.realtime_chunks,
                   help="chunks for the realtime engine's sustained real-time factor (0 skips)")
    add_threads(p, "realtime engine figures, as realtime --threads")
    p.add_argument("--competing-load", type=int, default=d.competing_load, metavar="N",
                   help="also measure the realtime engine while N busy-loop processes keep N cores busy, as a DAW "
                        "would (started and stopped by bench; default 0: not measured)")
    p.add_argument("--backends", default=",".join(d.backends), metavar="LIST",
                   help="generation figures for these backends, comma-separated: torch (eager PyTorch), onnxruntime "
                        "(the exported step on the CPU; pip install -e '.[export]') and cuda-graphs (torch's step "
                        "replayed as CUDA graphs, sample --cuda-graphs; CUDA only), each with a column saying how many "
                        f"times eager torch's speed it runs. Default {','.join(d.backends)}")
    p.add_argument("--precisions", default=",".join(d.precisions), metavar="LIST",
                   help="torch generation figures at these weight precisions, comma-separated: fp32 (exact) and int8 "
                        "(CPU; sample --precision); int8 rows show their speed relative to fp32. "
                        f"Default {','.join(d.precisions)}")
    p.add_argument("--json", default=None, metavar="OUT", help="also write every figure to this JSON file")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    try:
        cfg = BenchConfig(a.device, tuple(a.sizes.split(",")), tuple(a.solvers.split(",")),
                          tuple(int(x) for x in a.nfes.split(",")), a.context_chunks, a.measure_chunks, a.rerun_chunks,
                          a.long_chunks, a.codec, a.train_steps, a.train_batch, a.train_crop, a.realtime_chunks,
                          a.threads, a.competing_load, tuple(a.backends.split(",")), tuple(a.precisions.split(",")),
                          a.train_noisy_chunks, a.train_noisy_share, a.train_only)
    except ValueError:
        raise FlowError(f"--nfes must be comma-separated integers, got {a.nfes!r}") from None
    if cfg.competing_load < 0 or (cfg.threads is not None and cfg.threads < 1):
        raise FlowError("--competing-load must be 0 or more, --threads at least 1")
    if cfg.competing_load and (cfg.realtime_chunks <= 0 or cfg.codec == "none"):
        raise FlowError("--competing-load measures the realtime engine: it needs --realtime-chunks > 0 and a codec")
    if not cfg.precisions or any(p not in PRECISIONS for p in cfg.precisions):
        raise FlowError(f"--precisions {a.precisions!r}: choose from {', '.join(PRECISIONS)}, comma-separated")
    if not cfg.backends or any(b not in BENCH_BACKENDS for b in cfg.backends):
        raise FlowError(f"--backends {a.backends!r}: choose from {', '.join(BENCH_BACKENDS)}, comma-separated")
    unknown = [s for s in cfg.sizes if s not in MODEL_PRESETS]
    if unknown:
        raise FlowError(f"unknown --sizes {unknown}: choose from {', '.join(MODEL_PRESETS)}")
    print_report(run_bench(cfg), a.json)
    return 0


def print_report(report: dict, json_path: str | None = None) -> None:
    console = Console(width=None if sys.stdout.isatty() else 150)
    bandwidth = f" | matrix-vector bandwidth {report['bandwidth_gb_s']:.1f} GB/s" if "bandwidth_gb_s" in report else ""
    console.print(f"[bold]machine[/]: {report['machine']} | {report['dtype']} | codec {report.get('codec', 'none')}"
                  + bandwidth)
    t = Table(title="generation: seconds per chunk (one chunk = 0.683 s of audio)")
    backends = any(r.get("backend", "torch") != "torch" for r in report["generation"])
    precisions = any(r.get("precision", "fp32") != "fp32" for r in report["generation"])
    for col in ("model", "solver", "NFE") + ("backend", "x torch speed") * backends + ("precision", "x fp32 speed") * precisions + (
            "cached ms", "RTF", "x bandwidth floor", "re-run ms", "cache speed-up", "+codec ms", "RTF w/ codec",
            "first chunk ms"):
        t.add_column(col, justify="right")
    ms = lambda v: f"{1000 * v:.1f}" if v is not None else "—"  # noqa: E731
    for r in report["generation"]:
        which = (r.get("backend", "torch"), f"{r['vs_torch']:.2f}x" if "vs_torch" in r else "—") if backends else ()
        which += (r.get("precision", "fp32") + " packed" * r.get("packed", False),
                  f"{r['vs_fp32']:.2f}x" if "vs_fp32" in r else "—") if precisions else ()
        t.add_row(f"{r['size']} ({r['params_m']:.0f} M)", r["solver"], str(r["nfe"]), *which, ms(r["cached_s"]),
                  f"{r['cached_rtf']:.1f}x", f"{r['over_floor']:.1f}" if "over_floor" in r else "—", ms(r.get("rerun_s")), f"{r['speedup']:.1f}x" if "speedup" in r else "—",
                  ms(r.get("with_codec_s")), f"{r['with_codec_rtf']:.1f}x" if "with_codec_rtf" in r else "—",
                  ms(r["first_chunk_latency_s"]))
    if report["generation"]:  # bench --train-only has none
        console.print(t)
    for backend in dict.fromkeys(r.get("backend", "torch") for r in report["generation"]):
        ratios = [r["vs_torch"] for r in report["generation"] if r.get("backend") == backend and "vs_torch" in r]
        if ratios:
            faster = sum(x > 1 for x in ratios)
            console.print(f"{backend} vs eager torch: {min(ratios):.2f}x to {max(ratios):.2f}x torch's speed; faster "
                          f"in {faster} of {len(ratios)} settings")
    if "long_stream" in report:
        ls = report["long_stream"]
        console.print(f"long stream ({ls['size']}, {ls['solver']} NFE {ls['nfe']}, {ls['chunks']} chunks): chunk 10-19 {1000 * ls['early_s']:.1f} "
                      f"ms, last 10 {1000 * ls['late_s']:.1f} ms (x{ls['late_over_early']:.2f}); memory "
                      f"{ls['memory_mb_early']:.0f} MB -> {ls['memory_mb_late']:.0f} MB")
    if report["training"]:
        t = Table(title="training: train's optimiser step (tokens/s: crop tokens)")
        for col in ("model", "batch x crop", "noisy chunks", "dtype", "attention", "s/step", "tokens/s", "peak MB"):
            t.add_column(col, justify="right")
        for r in report["training"]:
            t.add_row(r["size"], f"{r['batch']} x {r['crop_tokens']}", f"{r['noisy_chunks']} of {r['crop_tokens'] // 8}",
                      r["dtype"], r["attention"], f"{r['step_s']:.2f}", f"{r['tokens_per_s']:,.0f}",
                      f"{r['peak_memory_mb']:.0f}")
        console.print(t)
    if "realtime" in report:
        console.print(f"realtime engine: {json.dumps(report['realtime'])}")
    if "realtime_cuda_graphs" in report:
        r = report["realtime_cuda_graphs"]
        console.print(f"realtime engine with CUDA graphs: sustained {r['rtf']:.1f}x real time, compute "
                      f"{1000 * r['compute_mean_s']:.1f} ms mean / {1000 * r['compute_p95_s']:.1f} ms p95 per chunk")
    if "realtime_under_load" in report:
        load = report["realtime_under_load"]
        for r in load["runs"]:
            console.print(f"realtime engine beside {load['busy_processes']} busy process(es), {r['threads']} "
                          f"thread(s): sustained {r['rtf']:.1f}x real time, compute {1000 * r['compute_mean_s']:.1f} ms "
                          f"mean / {1000 * r['compute_p95_s']:.1f} ms p95 per chunk")
    if json_path:
        write_text_atomic(json.dumps(report, indent=1), json_path)
        console.print(f"wrote {json_path}")
