"""Command line: argparse sub-commands, thin: parse, build a config, call one function."""
from __future__ import annotations

import argparse
import sys
import time

from .codec import CODEC_NAMES
from .devices import DEVICE_CHOICES
from .errors import FlowError


def _common_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES,
                   help="compute device (auto: cuda, else mps, else cpu)")


def _common_codec(p: argparse.ArgumentParser, default: str = "codicodec") -> None:
    p.add_argument("--codec", default=default, choices=CODEC_NAMES,
                   help="codicodec: the real CoDiCodec (needs its weights); spectral: built-in offline stand-in")
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
    metrics = run_train(run, sample_hook=_sample_hook())
    print(f"done: step {metrics.get('step')}, loss {metrics.get('loss', float('nan')):.4f}; "
          f"checkpoints in {a.out_dir}/ (ema.pt for sampling, last.pt to resume)")
    return 0


def _sample_hook():
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="codicodec-flow",
                                     description="Streaming music continuation in CoDiCodec's latent space.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_preprocess, _add_train, _add_smoke):
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
