"""Command line: argparse sub-commands, thin: parse, build a config, call one function."""
from __future__ import annotations

import argparse
import sys
import time

from .codec import CODEC_NAMES
from .devices import DEVICE_CHOICES
from .errors import FlowError
from .realtime.command import add_realtime_parser


def _common_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES,
                   help="compute device (auto: cuda, else mps, else cpu)")


def _common_codec(p: argparse.ArgumentParser, default: str = "codicodec") -> None:
    p.add_argument("--codec", default=default, choices=CODEC_NAMES,
                   help="codicodec: the real CoDiCodec (needs its weights); spectral: built-in offline stand-in")
    codec_weight_flags(p)


def codec_weight_flags(p: argparse.ArgumentParser) -> None:
    """--codec-ckpt and --trust-codec-ckpt, for every command that may load CoDiCodec."""
    p.add_argument("--codec-ckpt", default=None, metavar="PATH",
                   help="CoDiCodec weights file (else $CODICODEC_CKPT, else the package's first-use download)")
    p.add_argument("--trust-codec-ckpt", action="store_true",
                   help="allow full unpickling of --codec-ckpt (only for a file you trust, e.g. the official one)")


def _add_preprocess(sub) -> None:
    p = sub.add_parser("preprocess", help="encode a folder of audio into latent shards",
                       description="Encode every audio file below --in-dir into latent shards under --out-dir.")
    p.add_argument("--in-dir", required=True, help="folder of audio (searched recursively)")
    p.add_argument("--out-dir", required=True, help="folder for shards, manifest.json and statistics")
    _common_codec(p)
    _common_device(p)
    p.add_argument("--max-seconds", type=float, default=300.0, help="split longer files into shards of this length")
    p.add_argument("--overwrite", action="store_true", help="re-encode files whose shards are up to date")
    p.add_argument("--num-shards", type=int, default=1, help="split the file list into K parts (parallel workers)")
    p.add_argument("--shard-index", type=int, default=0, help="which part this process encodes (0-based)")
    p.add_argument("--finalize", action="store_true",
                   help="only rebuild manifest.json and statistics from the shards in --out-dir")
    p.set_defaults(func=_cmd_preprocess)


def _cmd_preprocess(a: argparse.Namespace) -> int:
    from .config import PreprocessConfig
    from .preprocess import finalize, preprocess_main, summary_lines
    cfg = PreprocessConfig(in_dir=a.in_dir, out_dir=a.out_dir, codec=a.codec, codec_ckpt=a.codec_ckpt,
                           trust_codec_ckpt=a.trust_codec_ckpt,
                           device=a.device, max_seconds=a.max_seconds, overwrite=a.overwrite,
                           num_shards=a.num_shards, shard_index=a.shard_index)
    if a.finalize:
        m = finalize(a.out_dir, cfg)
        print(f"manifest: {len(m['shards'])} shard(s), {m['hours']:.2f} h usable, codec {m['codec']} {m['codec_version']}")
        return 0
    t0 = time.perf_counter()
    report = preprocess_main(cfg)
    for line in summary_lines(report, time.perf_counter() - t0):
        print(line)
    if cfg.num_shards > 1:
        print(f"part {cfg.shard_index + 1}/{cfg.num_shards} done; when every part has finished run "
              f"`codicodec-flow preprocess --finalize --in-dir {cfg.in_dir} --out-dir {cfg.out_dir}`")
    if not report.ok:
        print("error: no file could be encoded", file=sys.stderr)
        return 1
    return 0


def _add_smoke(sub) -> None:
    p = sub.add_parser("smoke-test", help="check device, dtypes and codec wiring on this machine")
    _common_device(p)
    _common_codec(p, default="spectral")
    p.set_defaults(func=_cmd_smoke)


def _cmd_smoke(a: argparse.Namespace) -> int:
    from .smoke import print_checks, run_smoke
    checks = run_smoke(a.device, a.codec, a.codec_ckpt, a.trust_codec_ckpt)
    print_checks(checks)
    return 0 if all(c.ok for c in checks) else 1


_TRAIN_FLAGS = [  # (flag, TrainConfig field, type, help)
    ("--batch-size", "batch_size", int, "crops per step per process"),
    ("--grad-accum", "grad_accum", int, "micro-batches accumulated per optimiser step"),
    ("--crop-tokens", "crop_tokens", int, "tokens per crop, a multiple of 8"),
    ("--max-steps", "max_steps", int, "optimiser steps to train"),
    ("--dtype", "dtype", str, "auto | bf16 | fp32 (auto: bf16 on CUDA/MPS, fp32 on CPU)"),
    ("--lr", "lr", float, "peak learning rate (linear warm-up, then cosine)"),
    ("--warmup-steps", "warmup_steps", int, "learning-rate warm-up steps"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay on weight matrices"),
    ("--grad-clip", "grad_clip", float, "gradient-norm clip"),
    ("--ema-decay", "ema_decay", float, "EMA decay of the weights in ema.pt"),
    ("--save-every", "save_every", int, "steps between checkpoints"),
    ("--val-every", "val_every", int, "steps between validation passes (0 disables)"),
    ("--val-fraction", "val_fraction", float, "share of files held out for validation"),
    ("--audio-sample-every", "audio_sample_every", int, "steps between audio samples (0 disables)"),
    ("--log-every", "log_every", int, "steps between log lines"),
    ("--seed", "seed", int, "seed for weights, crops and noise"),
]
_MODEL_FLAGS = [("--dim", "dim", int, "transformer width"), ("--n-layers", "n_layers", int, "transformer blocks"),
                ("--n-heads", "n_heads", int, "attention heads"), ("--cond-dim", "cond_dim", int, "time-embedding width"),
                ("--context-chunks", "context_chunks", int, "sliding window W: past chunks each chunk sees")]
_FLOW_FLAGS = [("--t-dist", "t_dist", str, "logit_normal | uniform: training time distribution"),
               ("--p-uncond", "p_uncond", float, "probability a chunk trains without context (for CFG)"),
               ("--context-noise-max", "context_noise_max", float, "largest noise level put on context chunks")]


def _add_flags(p, table, defaults) -> None:
    for flag, field, typ, text in table:
        p.add_argument(flag, dest=field, type=typ, default=None, help=f"{text} (default {getattr(defaults, field)})")


def _given(a: argparse.Namespace, table) -> dict:
    return {field: getattr(a, field) for _, field, _, _ in table if getattr(a, field) is not None}


def _add_train(sub) -> None:
    from .config import MODEL_PRESETS, FlowConfig, ModelConfig, TrainConfig
    p = sub.add_parser("train", help="train the flow model on latent shards",
                       description="Train FlowDiT on the latent shards of --data-dir; checkpoints go to --out-dir.")
    p.add_argument("--data-dir", required=True, help="latent folder written by preprocess")
    p.add_argument("--out-dir", required=True, help="run folder: last.pt, ema.pt, metrics.jsonl, samples/")
    _common_device(p)
    p.add_argument("--preset", default="default", choices=sorted(MODEL_PRESETS),
                   help="model size: default (~99 M), small (~20 M), tiny (tests)")
    _add_flags(p, _TRAIN_FLAGS, TrainConfig("", ""))
    _add_flags(p, _MODEL_FLAGS, ModelConfig())
    _add_flags(p, _FLOW_FLAGS, FlowConfig())
    p.add_argument("--audio-continuation", action="store_true", default=None,
                   help="audio samples continue a validation prompt (default: unconditional)")
    p.add_argument("--no-tui", action="store_true", help="plain log lines instead of the live dashboard")
    p.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its last.pt")
    p.set_defaults(func=_cmd_train)


def _cmd_train(a: argparse.Namespace) -> int:
    from .progress import interactive
    from .train import plan_run, run_train
    given = {"data_dir": a.data_dir, "out_dir": a.out_dir, "device": a.device, **_given(a, _TRAIN_FLAGS),
             "tui": interactive() and not a.no_tui}
    if a.audio_continuation:
        given["audio_continuation"] = True
    run = plan_run(given, _given(a, _MODEL_FLAGS), _given(a, _FLOW_FLAGS), a.preset, a.resume)
    from .sample import training_sample_hook
    metrics = run_train(run, sample_hook=training_sample_hook(run.train.audio_continuation))
    print(f"done: step {metrics.get('step')}, loss {metrics.get('loss', float('nan')):.4f}; "
          f"checkpoints in {a.out_dir}/ (ema.pt for sampling, last.pt to resume)")
    return 0


def _add_sampling_flags(p, solver_default: str, nfe_help: str) -> None:
    from .solvers import SCHEDULES, SOLVERS
    p.add_argument("--solver", default=solver_default, choices=sorted(SOLVERS), help=f"ODE solver (default {solver_default})")
    p.add_argument("--nfe", type=int, default=None, help=nfe_help)
    p.add_argument("--n-steps", type=int, default=None,
                   help="ODE steps per chunk; NFE = steps x evaluations per step (euler, dpmpp, pingpong 1; "
                        "heun, midpoint 2; rk4 4); give one of --nfe/--n-steps, or both if they agree")
    p.add_argument("--schedule", default="linear", choices=SCHEDULES, help="time grid (default linear)")
    p.add_argument("--schedule-shift", type=float, default=1.0,
                   help="SD3-style shift for --schedule shifted; > 1 spends more steps near noise (default 1)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="scale of the starting noise; < 1 conservative, > 1 more varied (default 1)")
    p.add_argument("--cfg-scale", type=float, default=1.0,
                   help="classifier-free guidance strength; 1 = off, > 1 follows the context harder at twice the cost")
    p.add_argument("--context-noise", type=float, default=0.02,
                   help="noise level put on each generated chunk before it becomes context (default 0.02)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same output on the same device (default 0)")


def _sample_config(a: argparse.Namespace, **extra):
    from .config import SampleConfig
    try:
        return SampleConfig(solver=a.solver, nfe=a.nfe, n_steps=a.n_steps, schedule=a.schedule,
                            schedule_shift=a.schedule_shift, temperature=a.temperature, cfg_scale=a.cfg_scale,
                            context_noise=a.context_noise, seed=a.seed, **extra)
    except ValueError as exc:
        raise FlowError(str(exc)) from None


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="continue a prompt WAV (or generate from nothing) into WAV files",
                       description="Generate audio with a trained checkpoint, one codec chunk at a time.")
    p.add_argument("--ckpt", required=True, help="ema.pt (or last.pt) from train")
    p.add_argument("--prompt-wav", default=None, help="audio to continue (any rate/channels); omit to start from nothing")
    p.add_argument("--out", required=True, help="output WAV (48 kHz stereo); OUT_1.wav ... with --num-samples")
    p.add_argument("--duration-s", type=float, default=20.0, help="seconds of continuation (default 20)")
    _add_sampling_flags(p, "heun", "model evaluations per chunk (default 8)")
    p.add_argument("--num-samples", type=int, default=1, help="variations generated together as one batch")
    _common_device(p)
    codec_weight_flags(p)
    p.add_argument("--include-prompt", action="store_true", help="write the (decoded) prompt before the continuation")
    p.add_argument("--decode", default="parallel", choices=("parallel", "stream"),
                   help="codec decoding: whole sequence at once, or chunk by chunk with decode_next")
    p.set_defaults(func=_cmd_sample)


def _cmd_sample(a: argparse.Namespace) -> int:
    from .sample import run_sample
    cfg = _sample_config(a, num_samples=a.num_samples)
    r = run_sample(a.ckpt, a.out, cfg, a.prompt_wav, a.duration_s, a.device, a.codec_ckpt, a.trust_codec_ckpt,
                   a.include_prompt, a.decode)
    print(f"generated {r.chunks} chunks ({r.seconds_generated:.1f} s) per sample in {r.compute_seconds:.1f} s "
          f"({r.realtime_factor:.1f}x real time, flow model)")
    for wav, lat in zip(r.wavs, r.latents):
        print(f"wrote {wav} (latents: {lat})")
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the whole pipeline offline in minutes: songs -> latents -> model -> continuation",
                       description="Make example music, preprocess it, train a small model briefly and continue a "
                                   "prompt; writes WAVs and a spectrogram PNG.")
    p.add_argument("--out-dir", default="demo_out", help="where everything goes (default demo_out)")
    p.add_argument("--device", default="cpu", choices=DEVICE_CHOICES, help="compute device (default cpu)")
    p.add_argument("--steps", type=int, default=800, help="training steps (default 800)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.set_defaults(func=lambda a: _run_demo(a))


def _run_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo
    run_demo(a.out_dir, a.device, steps=a.steps, seed=a.seed)
    return 0


def _add_eval(sub) -> None:
    from .evaluate import EvalConfig
    d = EvalConfig("", "")
    p = sub.add_parser("eval", help="generation quality on held-out latents: loss, continuations, drift, plots",
                       description="Evaluate a checkpoint on a latent folder it was not trained on; writes eval.json "
                                   "and PNG plots.")
    p.add_argument("--ckpt", required=True, help="ema.pt (or last.pt)")
    p.add_argument("--data-dir", required=True, help="held-out latent folder (from preprocess)")
    p.add_argument("--out-dir", default=d.out_dir, help=f"where eval.json and plots go (default {d.out_dir})")
    p.add_argument("--train-dir", default=None, help="the training latents, for the memorisation check")
    p.add_argument("--prompts", type=int, default=d.prompts, help=f"prompts cut from the held-out data (default {d.prompts})")
    p.add_argument("--prompt-chunks", type=int, default=d.prompt_chunks, help=f"chunks per prompt (default {d.prompt_chunks})")
    p.add_argument("--continuation-chunks", type=int, default=d.continuation_chunks,
                   help=f"generated chunks compared with the real ones (default {d.continuation_chunks})")
    p.add_argument("--rollout-chunks", type=int, default=d.rollout_chunks,
                   help=f"length of the long-horizon rollout, 0 to skip (default {d.rollout_chunks}, ~11 min)")
    p.add_argument("--no-audio", action="store_true", help="skip decoding audio for the spectrogram")
    _add_sampling_flags(p, "heun", "model evaluations per chunk (default 8)")
    _common_device(p)
    codec_weight_flags(p)
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(a: argparse.Namespace) -> int:
    from .evaluate import EvalConfig, run_eval, summary
    if a.prompts < 2 or min(a.prompt_chunks, a.continuation_chunks) < 1 or a.rollout_chunks < 0:
        raise FlowError("--prompts must be >= 2, --prompt-chunks and --continuation-chunks >= 1, --rollout-chunks >= 0")
    cfg = EvalConfig(a.ckpt, a.data_dir, a.out_dir, a.train_dir, a.prompts, a.prompt_chunks, a.continuation_chunks,
                     a.rollout_chunks, device=a.device, codec_ckpt=a.codec_ckpt, trust_codec_ckpt=a.trust_codec_ckpt,
                     audio=not a.no_audio)
    report = run_eval(cfg, _sample_config(a))
    for line in summary(report):
        print(line)
    print(f"all figures: {a.out_dir}/eval.json")
    return 0


def _add_bench(sub) -> None:
    from .bench import BenchConfig
    d = BenchConfig()
    p = sub.add_parser("bench", help="speed of generation (cache vs re-run), long streams and training on this machine")
    _common_device(p)
    p.add_argument("--sizes", default=",".join(d.sizes), help=f"model presets, comma-separated (default {','.join(d.sizes)})")
    p.add_argument("--solvers", default=",".join(d.solvers), help=f"solvers (default {','.join(d.solvers)})")
    p.add_argument("--nfes", default=",".join(map(str, d.nfes)), help="NFE values (default 4,8,16)")
    p.add_argument("--context-chunks", type=int, default=d.context_chunks, help="window for every figure (default 32)")
    p.add_argument("--measure-chunks", type=int, default=d.measure_chunks, help="chunks timed per cached setting")
    p.add_argument("--rerun-chunks", type=int, default=d.rerun_chunks,
                   help="chunks timed for the re-run-the-window reference (0 skips it)")
    p.add_argument("--long-chunks", type=int, default=d.long_chunks, help="length of the long stream (0 skips)")
    p.add_argument("--codec", default=d.codec, choices=("auto", "codicodec", "spectral", "none"),
                   help="codec for flow + decode figures (auto: codicodec if installed, else spectral)")
    p.add_argument("--train-steps", type=int, default=d.train_steps, help="timed training steps (0 skips)")
    p.add_argument("--train-batch", type=int, default=None, help="training batch (default 8 on GPUs, 1 on CPU)")
    p.add_argument("--train-crop", type=int, default=None, help="training crop tokens (default 768 on GPUs, 128 on CPU)")
    p.add_argument("--realtime-chunks", type=int, default=d.realtime_chunks,
                   help="chunks for the realtime engine's sustained real-time factor (0 skips)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write every figure to this JSON file")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(a: argparse.Namespace) -> int:
    from .bench import BenchConfig, print_report, run_bench
    try:
        cfg = BenchConfig(a.device, tuple(a.sizes.split(",")), tuple(a.solvers.split(",")),
                          tuple(int(x) for x in a.nfes.split(",")), a.context_chunks, a.measure_chunks, a.rerun_chunks,
                          a.long_chunks, a.codec, a.train_steps, a.train_batch, a.train_crop, a.realtime_chunks)
    except ValueError:
        raise FlowError(f"--nfes must be comma-separated integers, got {a.nfes!r}") from None
    from .config import MODEL_PRESETS
    unknown = [s for s in cfg.sizes if s not in MODEL_PRESETS]
    if unknown:
        raise FlowError(f"unknown --sizes {unknown}: choose from {', '.join(MODEL_PRESETS)}")
    print_report(run_bench(cfg), a.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="codicodec-flow",
                                     description="Streaming music continuation in CoDiCodec's latent space.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_preprocess, _add_train, _add_sample, add_realtime_parser, _add_eval, _add_bench, _add_demo,
                _add_smoke):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FlowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
