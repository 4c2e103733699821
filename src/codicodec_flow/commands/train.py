"""`codicodec-flow train`: train the flow model on latent shards (fresh, from another run's weights, or resumed)."""
from __future__ import annotations

import argparse

from ..config import MODEL_PRESETS, FlowConfig, ModelConfig, TrainConfig
from ..plan import plan_run
from ..train import run_train
from ..util.progress import interactive
from .flags import add_device, finite_float

_TRAIN_FLAGS = [  # (flag, TrainConfig field, type, help)
    ("--batch-size", "batch_size", int, "crops per step per process"),
    ("--grad-accum", "grad_accum", int, "micro-batches accumulated per optimiser step"),
    ("--crop-tokens", "crop_tokens", int, "tokens per crop, a multiple of 8"),
    ("--max-steps", "max_steps", int, "optimiser steps to train"),
    ("--dtype", "dtype", str, "auto | bf16 | fp32 (auto: bf16 on CUDA/MPS, fp32 on CPU)"),
    ("--lr", "lr", finite_float, "peak learning rate (linear warm-up, then cosine)"),
    ("--warmup-steps", "warmup_steps", int, "learning-rate warm-up steps"),
    ("--weight-decay", "weight_decay", finite_float, "AdamW weight decay on weight matrices"),
    ("--grad-clip", "grad_clip", finite_float, "gradient-norm clip"),
    ("--ema-decay", "ema_decay", finite_float, "EMA decay of the weights in ema.pt"),
    ("--save-every", "save_every", int, "steps between checkpoints"),
    ("--val-every", "val_every", int, "steps between validation passes (0 disables)"),
    ("--val-fraction", "val_fraction", finite_float, "share of files held out for validation"),
    ("--audio-sample-every", "audio_sample_every", int, "steps between audio samples (0 disables)"),
    ("--log-every", "log_every", int, "steps between log lines"),
    ("--seed", "seed", int, "seed for weights, crops and noise"),
    ("--num-workers", "num_workers", int, "background processes that read the crops ahead (0: the training process "
                                          "reads them); the crops are the same either way"),
    ("--noisy-chunks", "noisy_chunks", int, "noisy chunks trained per crop, drawn at random: a cheaper step, each "
                                            "still seeing its whole context (0: as --noisy-share says)"),
    ("--noisy-share", "noisy_share", finite_float, "share of each crop's chunks trained as noisy chunks, drawn at "
                                                   "random (1: all; 1 with --distill-from)"),
    ("--rollout-p", "rollout_p", finite_float, "share of steps (from --rollout-start on) whose context is the model's "
                                               "own cached continuation of the crop's real opening, against drift "
                                               "(0: off; 0 with --distill-from unless given)"),
    ("--rollout-solver", "rollout_solver", str, "solver of those rollouts"),
    ("--rollout-nfe", "rollout_nfe", int, "evaluations per rolled-out chunk"),
    ("--rollout-start", "rollout_start", finite_float, "fraction of --max-steps after which rollout steps are mixed "
                                                       "in: a closing stage of the same run (0: from the first step)"),
    ("--rollout-anchor-p", "rollout_anchor_p", finite_float, "share of rollouts whose chunks the model finishes from "
                                                             "the real chunks noised to --rollout-anchor-t: a past "
                                                             "with its own errors at the music's level (0: none)"),
    ("--rollout-context-noise", "rollout_context_noise", finite_float, "noise level the rollouts put on their own "
                                                                       "chunks as context: match the --context-noise "
                                                                       "you generate with"),
    ("--rollout-max-t", "rollout_max_t", finite_float, "highest noise level at which a chunk with the model's own "
                                                       "chunks in its past trains (1: every level)"),
    ("--rollout-anchor-t", "rollout_anchor_t", finite_float, "noise level anchored chunks start from (1: a fresh "
                                                             "chunk, like a free rollout's)"),
    ("--distill-from", "distill_from", str, "teacher checkpoint (ema.pt): train a few-step student on the teacher's "
                                            "own samples (post-training; starts from the teacher's weights unless "
                                            "--init-from names others)"),
    ("--distill-solver", "distill_solver", str, "solver the teacher samples with"),
    ("--distill-nfe", "distill_nfe", int, "teacher evaluations per sampled chunk"),
    ("--distill-cfg", "distill_cfg", finite_float, "guidance scale the teacher samples with, distilled into the "
                                                   "student (1: none)"),
    ("--distill-landing", "distill_landing", finite_float, "share of the student's chunks trained from where its own "
                                                           "first step lands, toward the teacher's chunk (0: plain "
                                                           "reflow)"),
]
_MODEL_FLAGS = [("--dim", "dim", int, "transformer width"), ("--n-layers", "n_layers", int, "transformer blocks"),
                ("--n-heads", "n_heads", int, "attention heads"), ("--cond-dim", "cond_dim", int, "time-embedding width"),
                ("--context-chunks", "context_chunks", int, "sliding window W: past chunks each chunk sees")]
_FLOW_FLAGS = [("--t-dist", "t_dist", str, "logit_normal | uniform: training time distribution"),
               ("--p-uncond", "p_uncond", finite_float, "probability a chunk trains without context (for CFG)"),
               ("--context-noise-max", "context_noise_max", finite_float, "largest noise level put on context chunks")]


def _add_flags(p, table, defaults) -> None:
    """Flags default to None, so a resumed run can tell what was given from the run's saved settings."""
    for flag, field, typ, text in table:
        p.add_argument(flag, dest=field, type=typ, default=None, help=f"{text} (default {getattr(defaults, field)})")


def _given(a: argparse.Namespace, table) -> dict:
    return {field: getattr(a, field) for _, field, _, _ in table if getattr(a, field) is not None}


def register(sub) -> None:
    p = sub.add_parser("train", help="train the flow model on latent shards",
                       description="Train FlowDiT on the latent shards of --data-dir; checkpoints go to --out-dir.")
    p.add_argument("--data-dir", required=True, help="latent folder written by preprocess")
    p.add_argument("--out-dir", required=True, help="run folder: last.pt, ema.pt, metrics.jsonl, samples/")
    add_device(p)
    p.add_argument("--preset", default=None, choices=sorted(MODEL_PRESETS),
                   help="model size: default (~101 M), small (~21 M), tiny (tests); with --resume or --init-from it "
                        "must be the checkpoint's (default: default; with --resume or --init-from, the checkpoint's)")
    _add_flags(p, _TRAIN_FLAGS, TrainConfig("", ""))
    _add_flags(p, _MODEL_FLAGS, ModelConfig())
    _add_flags(p, _FLOW_FLAGS, FlowConfig())
    p.add_argument("--mark-own", dest="mark_own", action=argparse.BooleanOptionalAction, default=None,
                   help="the model learns a mark for context chunks it made itself, which its closing rollout stage "
                        "shows it; in generation its chunks go in under the mark once its window holds no real music "
                        "(default: on for a new run whose closing stage is on, added at zero to --init-from weights "
                        "without it; a resumed run and a student keep what they have)")
    p.add_argument("--audio-continuation", action="store_true", default=None,
                   help="audio samples continue a validation prompt (default: unconditional)")
    p.add_argument("--no-tui", action="store_true", help="plain log lines instead of the live dashboard")
    p.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its last.pt")
    p.add_argument("--init-from", metavar="CKPT", default=None,
                   help="start a new run from the weights of CKPT (an ema.pt, or a last.pt's EMA weights), keeping its "
                        "model shape and latent normalisation; optimiser, schedule and steps start afresh")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    given = {"data_dir": a.data_dir, "out_dir": a.out_dir, "device": a.device, **_given(a, _TRAIN_FLAGS),
             "tui": interactive() and not a.no_tui}
    if a.audio_continuation:
        given["audio_continuation"] = True
    model_given = {**_given(a, _MODEL_FLAGS), **({} if a.mark_own is None else {"mark_own": a.mark_own})}
    run = plan_run(given, model_given, _given(a, _FLOW_FLAGS), a.preset, a.resume, a.init_from)
    metrics = run_train(run)
    print(f"done: step {metrics.get('step')}, loss {metrics.get('loss', float('nan')):.4f}; "
          f"checkpoints in {a.out_dir}/ (ema.pt for sampling, last.pt to resume)")
    return 0
