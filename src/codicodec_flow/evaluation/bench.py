"""What `bench` measures: how fast is generation and training on this machine? One run, side by side.

Figures are medians of per-chunk wall times with the device synchronised around each chunk. Models
have random weights: speed does not depend on what a model has learnt.
"""
from __future__ import annotations

import contextlib
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Iterator

import torch

from ..checkpoint import Bundle
from ..codec import CHUNK_SECONDS, LATENT_DIM, TOKENS_PER_CHUNK, Codec, load_codec, local_codec
from ..config import LIVE_SAMPLING, MODEL_PRESETS, FlowConfig, SampleConfig, TrainConfig
from ..data.loader import MicroBatch
from ..errors import FlowError
from ..generate import StreamGenerator, WindowRerunGenerator
from ..latents import LatentStats
from ..model import FlowDiT
from ..realtime.engine import Engine, EngineConfig
from ..realtime.generator import LiveGenerator
from ..realtime.ort_backend import BACKENDS, OrtStreamGenerator, load_onnx
from ..realtime.sinks import NullSink
from ..realtime.state import Controls
from ..solvers import get_solver
from ..streams import KERNEL_AUTO
from ..packing import is_packed
from ..plan import Run, noisy_chunks_check, noisy_count
from ..train import Trainer, fresh_state, optimiser_step
from ..util.devices import autocast_dtype, live_threads, resolve_device, torch_threads

log = logging.getLogger(__name__)

CUDA_GRAPHS = "cuda-graphs"  # the bench backend of torch's step with --cuda-graphs
BENCH_BACKENDS = BACKENDS + (CUDA_GRAPHS,)


@dataclass(frozen=True)
class BenchConfig:
    device: str = "auto"
    sizes: tuple[str, ...] = ("small", "default")
    solvers: tuple[str, ...] = ("euler", "heun")
    nfes: tuple[int, ...] = (4, 8, 16)
    context_chunks: int = 32  # the window every generation figure runs against (full from the start)
    measure_chunks: int = 8  # chunks timed per cached configuration
    rerun_chunks: int = 3  # chunks timed per re-run-the-window configuration, after one untimed (0 skips it)
    long_chunks: int = 1000  # one long stream: per-chunk time early vs late (0 skips)
    codec: str = "auto"  # auto: codicodec if its weights are installed, else spectral; "none" skips
    train_steps: int = 3
    train_batch: int | None = None  # None: 8 on GPUs, 1 on CPU
    train_crop: int | None = None  # None: 768 on GPUs, 128 on CPU
    realtime_chunks: int = 200  # sustained real-time factor of the realtime engine (0 skips)
    threads: int | None = None  # torch threads of the realtime-engine figures, as `realtime --threads` (None: live_threads())
    competing_load: int = 0  # busy-loop processes running beside a second realtime-engine figure (0: no such figure)
    backends: tuple[str, ...] = ("torch",)  # generation figures per backend; "onnxruntime" adds the exported step's,
    #                                          "cuda-graphs" torch's step replayed as CUDA graphs (sample --cuda-graphs)
    precisions: tuple[str, ...] = ("fp32",)  # torch generation figures per weight precision (int8: quantize.py)
    train_noisy_chunks: int = 0  # noisy chunks per crop in the training figure, as train --noisy-chunks (0: the share)
    train_noisy_share: float = TrainConfig.noisy_share  # as train --noisy-share: train's default unless given
    train_only: bool = False  # only the training figure: no generation, long stream or realtime engine


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def memory_mb(device: torch.device) -> float:
    """Memory in use now: allocated on a GPU, resident set of this process on a CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    if device.type == "mps":
        return torch.mps.current_allocated_memory() / 2**20
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # macOS: peak resident size, in bytes there
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((l.split(":", 1)[1].strip() for l in fh if l.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (f"{cpu} ({os.cpu_count()} cores, torch {torch.get_num_threads()} threads){gpu}; {device}; "
            f"torch {torch.__version__}; Python {sys.version.split()[0]}")


def _median(xs: list[float]) -> float:
    return float(torch.tensor(xs).median()) if xs else float("nan")


def time_chunks(gen: StreamGenerator, n: int) -> list[float]:
    """Wall seconds of each of n chunks, device synchronised."""
    out = []
    for _ in range(n):
        sync(gen.device)
        t0 = time.perf_counter()
        gen.next_chunk()
        sync(gen.device)
        out.append(time.perf_counter() - t0)
    return out


def _model(size: str, cfg: BenchConfig, device) -> FlowDiT:
    torch.manual_seed(0)
    return FlowDiT(replace(MODEL_PRESETS[size], context_chunks=cfg.context_chunks)).to(device).eval()


def bandwidth_gb_s(device: torch.device, megabytes: int = 64, repeats: int = 15) -> float:
    """Memory bandwidth a plain matrix product reaches on this device: 8 tokens through a `megabytes` fp32 matrix
    (too large for any cache), as a cached generation step does; GB/s, median of `repeats`."""
    n = int((megabytes * 2**20 / 4) ** 0.5)
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(n, n, generator=g).to(device), torch.randn(TOKENS_PER_CHUNK, n, generator=g).to(device)
    times = []
    for i in range(repeats + 3):  # 3 warm-ups
        sync(device)
        t0 = time.perf_counter()
        x @ w.T
        sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return n * n * w.element_size() / _median(times) / 1e9


def streamed_bytes(model: FlowDiT) -> int:
    """Bytes of weights one cached evaluation reads: all but the time embedding and the adaLN projections, whose
    outputs the generator keeps per time value."""
    kept = [model.time, model.ada_out, *(block.ada for block in model.blocks)]
    skip = {id(p) for module in kept for p in module.parameters()}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in skip)


def bench_generation(size: str, cfg: BenchConfig, device, amp, codec, say, bandwidth: float | None = None) -> list[dict]:
    model = _model(size, cfg, device)
    stats = LatentStats.identity()
    prompt = torch.randn(cfg.context_chunks, TOKENS_PER_CHUNK, LATENT_DIM, generator=torch.Generator().manual_seed(1))
    decode_s = _codec_seconds(codec) if codec is not None else None
    ort_model = None
    if "onnxruntime" in cfg.backends:  # exported once per size; run on the CPU with torch's thread count
        ort_model = load_onnx(model, stats)
    rows = []
    for solver in cfg.solvers:
        k = get_solver(solver).evals_per_step
        for nfe in cfg.nfes:
            if nfe % k:
                continue
            sc = SampleConfig(solver=solver, nfe=nfe)
            exact_s = None  # the exact path: eager torch at fp32, what every other variant is compared with
            for backend, precision in _variants(cfg):
                if backend == "torch":
                    gen = StreamGenerator(model, stats, replace(sc, precision=precision), device, amp)
                elif backend == CUDA_GRAPHS:
                    gen = StreamGenerator(model, stats, replace(sc, cuda_graphs=True), device, amp)
                else:
                    gen = OrtStreamGenerator(model, stats, sc, ort_model)
                row = _cached_row(gen, model, prompt, size, cfg, backend, bandwidth)
                row["precision"], row["packed"] = precision, is_packed(gen.model)  # packing.py: MKL-packed fp32
                if (backend, precision) == ("torch", "fp32"):
                    exact_s = row["cached_s"]
                    if cfg.rerun_chunks > 0:
                        ref = WindowRerunGenerator(model, stats, sc, device, amp)
                        ref.prefill(prompt)
                        ref.next_chunk()  # warm-up, untimed, as the cached path's first chunk is
                        rerun = _median(time_chunks(ref, cfg.rerun_chunks))
                        row.update(rerun_s=rerun, rerun_rtf=CHUNK_SECONDS / rerun, speedup=rerun / row["cached_s"])
                elif exact_s is not None:  # above 1: faster than the exact path
                    row["vs_torch" if backend != "torch" else "vs_fp32"] = exact_s / row["cached_s"]
                if decode_s is not None:
                    row.update(with_codec_s=row["cached_s"] + decode_s,
                               with_codec_rtf=CHUNK_SECONDS / (row["cached_s"] + decode_s))
                say(f"  {size} {solver} NFE {nfe} {backend} {precision}{' packed' * row['packed']}: cached {1000 * row['cached_s']:.1f} ms/chunk"
                    + (f", re-run {1000 * row['rerun_s']:.0f} ms ({row['speedup']:.1f}x)" if "rerun_s" in row else "")
                    + (f", {row['vs_torch']:.2f}x torch's speed" if "vs_torch" in row else "")
                    + (f", {row['vs_fp32']:.2f}x fp32's speed" if "vs_fp32" in row else ""))
                rows.append(row)
    return rows


def _variants(cfg: BenchConfig) -> list[tuple[str, str]]:
    """(backend, precision) pairs to time: torch at each precision first (fp32 leading), then other backends."""
    torch_rows = [("torch", p) for p in sorted(cfg.precisions, key=lambda p: p != "fp32")] if "torch" in cfg.backends else []
    return torch_rows + [(b, "fp32") for b in cfg.backends if b != "torch"]


def _cached_row(gen: StreamGenerator, model: FlowDiT, prompt: torch.Tensor, size: str, cfg: BenchConfig, backend: str,
                bandwidth: float | None) -> dict:
    """First-chunk latency after the prompt, then the median cached chunk of the steady state, of one generator.

    The timed chunks come after the cache's ring has turned once (W chunks, untimed): from then on a stream of hours
    reuses its attention masks, where its first W chunks each make one (cache.py)."""
    sync(gen.device)
    t0 = time.perf_counter()
    gen.prefill(prompt)
    gen.next_chunk()
    sync(gen.device)
    first = time.perf_counter() - t0
    for _ in range(cfg.context_chunks):
        gen.next_chunk()
    cached = _median(time_chunks(gen, cfg.measure_chunks))
    row = {"size": size, "params_m": model.num_params() / 1e6, "solver": gen.cfg.solver, "nfe": gen.cfg.nfe,
           "backend": backend, "context_chunks": cfg.context_chunks, "cached_s": cached,
           "cached_rtf": CHUNK_SECONDS / cached, "first_chunk_latency_s": first}
    if bandwidth:  # NFE passes, each reading the streamed weights once (the finished chunk joins the first pass)
        floor = gen.evals * streamed_bytes(model) / (bandwidth * 1e9)
        row.update(bandwidth_floor_s=floor, over_floor=cached / floor)
    return row


def _codec_seconds(codec, n: int = 3) -> float:
    """Median seconds of one streaming decode_next."""
    z = torch.randn(n + 1, TOKENS_PER_CHUNK, LATENT_DIM, generator=torch.Generator().manual_seed(2))
    codec.reset()
    codec.decode_next(z[0])  # warm-up
    times = []
    for i in range(1, n + 1):
        t0 = time.perf_counter()
        codec.decode_next(z[i])
        times.append(time.perf_counter() - t0)
    return _median(times)


def bench_long_stream(size: str, cfg: BenchConfig, device, amp, say) -> dict:
    """One stream of long_chunks chunks: per-chunk time and memory early (chunks 10-19) and late (last 10)."""
    model = _model(size, cfg, device)
    gen = StreamGenerator(model, LatentStats.identity(), LIVE_SAMPLING, device, amp)
    times, mem = [], {}
    for i in range(cfg.long_chunks):
        times += time_chunks(gen, 1)
        if i + 1 in (20, cfg.long_chunks):
            mem[i + 1] = memory_mb(device)
        if (i + 1) % 200 == 0:
            say(f"  long stream: {i + 1}/{cfg.long_chunks} chunks")
    early, late = _median(times[10:20]), _median(times[-10:])
    return {"size": size, "solver": LIVE_SAMPLING.solver, "nfe": LIVE_SAMPLING.nfe, "chunks": cfg.long_chunks, "early_s": early, "late_s": late,
            "late_over_early": late / early, "memory_mb_early": mem.get(20), "memory_mb_late": mem.get(cfg.long_chunks)}


def bench_training(size: str, cfg: BenchConfig, device, amp) -> dict:
    """Seconds per step of the step `train` runs (train.optimiser_step: the two-stream loss, AdamW with train's
    defaults, gradient clipping, the EMA update) before its closing rollout stage, on random crops; the first step
    warms up and is not counted."""
    gpu = device.type != "cpu"
    batch = cfg.train_batch or (8 if gpu else 1)
    crop = cfg.train_crop or (768 if gpu else 128)
    n = crop // TOKENS_PER_CHUNK
    tcfg = TrainConfig(data_dir="", out_dir="", device=str(device), batch_size=batch, crop_tokens=crop,
                       noisy_chunks=cfg.train_noisy_chunks, noisy_share=cfg.train_noisy_share,
                       max_steps=cfg.train_steps + 1, rollout_p=0.0)
    run = Run(tcfg, MODEL_PRESETS[size], FlowConfig(), None)
    noisy_chunks_check(tcfg, run.model, "--train-noisy-chunks")
    tr = bench_trainer(run, device, amp)
    g = torch.Generator().manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(cfg.train_steps + 1):
        crops = [MicroBatch(torch.randn(batch, crop, LATENT_DIM, generator=g), torch.ones(batch, n, dtype=torch.bool),
                            g.get_state())]
        sync(device)
        t0 = time.perf_counter()
        optimiser_step(tr, crops)
        sync(device)
        if step:
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
            else memory_mb(device))
    step_s = _median(times)
    return {"size": size, "batch": batch, "crop_tokens": crop, "noisy_chunks": noisy_count(tcfg, run.model) or n,
            "dtype": "bf16" if amp else "fp32", "attention": attention_kernel(device), "step_s": step_s,
            "tokens_per_s": batch * crop / step_s, "peak_memory_mb": peak}


def bench_trainer(run: Run, device, amp) -> Trainer:
    """train's training state for `run` (model, EMA, AdamW, schedule) without data: optimiser_step reads none."""
    model, ema, opt, sched = fresh_state(run, device)
    return Trainer(run, 0, 1, device, amp, None, [], model, model, ema, opt, sched, 0)


def attention_kernel(device) -> str:
    """How the training step attends on this device (streams.py: KERNEL_AUTO)."""
    return KERNEL_AUTO.get(torch.device(device).type, "blocks")


def run_bench(cfg: BenchConfig, say=log.info) -> dict:
    """Every figure of `bench`, as a dict (see the module docstring); `say` receives a line per finished figure."""
    device = resolve_device(cfg.device)
    if CUDA_GRAPHS in cfg.backends and device.type != "cuda" and not cfg.train_only:
        raise FlowError(f"--backends {CUDA_GRAPHS} times CUDA graphs: it needs --device cuda (this run: {device.type})")
    amp = autocast_dtype("auto", device)
    report = {"machine": machine(device), "config": asdict(cfg), "dtype": "bf16" if amp else "fp32",
              "generation": [], "training": []}
    say(f"machine: {report['machine']}")
    if cfg.train_only:
        return _training_figures(cfg, device, amp, report, say)
    codec = None
    if cfg.codec != "none":
        name = cfg.codec
        if name == "auto":
            name = local_codec()[0]
        codec = load_codec(name, device)
        report["codec"] = f"{codec.name} {codec.version}"
    report["bandwidth_gb_s"] = bandwidth_gb_s(device)
    say(f"  memory bandwidth of a matrix-vector product: {report['bandwidth_gb_s']:.1f} GB/s")
    for size in cfg.sizes:
        report["generation"] += bench_generation(size, cfg, device, amp, codec, say, report["bandwidth_gb_s"])
    if cfg.long_chunks > 0:
        report["long_stream"] = bench_long_stream(cfg.sizes[0], cfg, device, amp, say)
    _training_figures(cfg, device, amp, report, say)
    if cfg.realtime_chunks > 0 and codec is not None:
        threads = live_threads() if cfg.threads is None else cfg.threads
        report["realtime"] = _realtime(cfg, device, codec, threads)
        say(f"  realtime engine, {threads} thread(s): {report['realtime']['rtf']:.1f}x real time")
        if CUDA_GRAPHS in cfg.backends:
            report["realtime_cuda_graphs"] = _realtime(cfg, device, codec, threads, cuda_graphs=True)
            say(f"  realtime engine with CUDA graphs: {report['realtime_cuda_graphs']['rtf']:.1f}x real time")
        if cfg.competing_load > 0:
            report["realtime_under_load"] = _realtime_under_load(cfg, device, codec, threads, say)
    return report


def _training_figures(cfg: BenchConfig, device, amp, report: dict, say) -> dict:
    for size in cfg.sizes:
        if cfg.train_steps > 0:
            report["training"].append(bench_training(size, cfg, device, amp))
            say(f"  training {size}: {report['training'][-1]['tokens_per_s']:,.0f} tokens/s")
    return report


def _realtime(cfg: BenchConfig, device, codec, threads: int, cuda_graphs: bool = False) -> dict:
    """Sustained real-time factor of the realtime engine (null sink) with the first size, on `threads` threads."""
    model = _model(cfg.sizes[0], cfg, device)
    bundle = Bundle(model, model.cfg, FlowConfig(), LatentStats.identity(), codec.name, codec.version, 0,
                    "(random weights)")
    live = replace(LIVE_SAMPLING, cuda_graphs=cuda_graphs)
    with torch_threads(threads):
        return {**sustained_rtf(bundle, codec, live, cfg.realtime_chunks, device), "threads": threads,
                "cuda_graphs": cuda_graphs}


def _realtime_under_load(cfg: BenchConfig, device, codec, threads: int, say) -> dict:
    """The realtime figure again while cfg.competing_load processes keep CPU cores busy (as a DAW beside it would),
    with the live thread count and, for comparison, torch's own (what the other figures ran with)."""
    runs = []
    with competing_load(cfg.competing_load):
        for n in sorted({threads, torch.get_num_threads()}):
            runs.append(_realtime(cfg, device, codec, n))
            say(f"  realtime engine beside {cfg.competing_load} busy process(es), {n} thread(s): "
                f"{runs[-1]['rtf']:.1f}x real time")
    return {"busy_processes": cfg.competing_load, "runs": runs}


@contextlib.contextmanager
def competing_load(processes: int) -> Iterator[list[int]]:
    """Keep `processes` CPU cores busy with busy-loop Python processes for the block; yields their ids.
    They are killed and reaped at the end, however the block ends."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(processes)]
    try:
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def sustained_rtf(bundle: Bundle, codec: Codec, cfg: SampleConfig, n_chunks: int = 200, device="cpu") -> dict:
    """Generate + decode n_chunks through the realtime engine as fast as possible into a null sink; its summary.

    bundle: loaded on `device`. "rtf" is audio seconds per compute second, "wall_rtf" per wall second.
    """
    device = torch.device(device)
    gen = LiveGenerator(bundle.model, bundle.stats, cfg, device, autocast_dtype("auto", device))
    controls = Controls(solver=cfg.solver, nfe=cfg.nfe, temperature=cfg.temperature, cfg_scale=cfg.cfg_scale,
                        context_chunks=bundle.model_cfg.context_chunks, seed=cfg.seed)
    engine = Engine(gen, codec, NullSink(paced=False), EngineConfig(max_chunks=n_chunks), controls)
    return {**engine.run().to_json(), "solver": controls.solver, "nfe": controls.evals, "device": str(device)}
