"""`codicodec-flow eval`: generation quality of a checkpoint on held-out latents, as eval.json and PNG plots."""
from __future__ import annotations

import argparse

from ..config import SampleConfig
from ..errors import FlowError
from ..evaluation.evaluate import EvalConfig, run_eval, summary
from .flags import add_codec_weights, add_device, add_sampling, add_weights, sample_config


def register(sub) -> None:
    d = EvalConfig("", "")
    p = sub.add_parser("eval", help="generation quality on held-out latents: loss, continuations, drift, plots",
                       description="Evaluate a checkpoint on a latent folder it was not trained on; writes eval.json "
                                   "and PNG plots.")
    p.add_argument("--ckpt", required=True, help="ema.pt (or last.pt)")
    p.add_argument("--data-dir", required=True, help="held-out latent folder (from preprocess)")
    p.add_argument("--out-dir", default=d.out_dir, help=f"where eval.json and plots go (default {d.out_dir})")
    p.add_argument("--train-dir", default=None, help="the training latents, for the memorisation check")
    p.add_argument("--prompts", type=int, default=d.prompts, help=f"prompts cut from the held-out data (default {d.prompts})")
    p.add_argument("--prompt-batch", type=int, default=d.prompt_batch,
                   help=f"prompts continued at once; fewer use less memory, same figures (default {d.prompt_batch})")
    p.add_argument("--prompt-chunks", type=int, default=d.prompt_chunks, help=f"chunks per prompt (default {d.prompt_chunks})")
    p.add_argument("--continuation-chunks", type=int, default=d.continuation_chunks,
                   help=f"generated chunks compared with the real ones (default {d.continuation_chunks})")
    p.add_argument("--rollout-chunks", type=int, default=d.rollout_chunks,
                   help=f"length of the long-horizon rollout, 0 to skip (default {d.rollout_chunks}, ~11 min)")
    p.add_argument("--rollout-streams", type=int, default=d.rollout_streams,
                   help=f"rollouts from different held-out prompts, run together (default {d.rollout_streams})")
    p.add_argument("--no-audio", action="store_true", help="skip decoding audio for the spectrogram")
    p.add_argument("--teacher", metavar="CKPT", default=None,
                   help="also continue the same prompts from the same noise with CKPT (e.g. a distilled student's "
                        "teacher) and report both side by side")
    p.add_argument("--teacher-solver", default=d.teacher_solver, help=f"the teacher's solver (default {d.teacher_solver})")
    p.add_argument("--teacher-nfe", type=int, default=d.teacher_nfe, help=f"the teacher's NFE (default {d.teacher_nfe})")
    add_weights(p)
    add_sampling(p, SampleConfig())
    add_device(p)
    add_codec_weights(p)
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    if (a.prompts < 2 or min(a.prompt_chunks, a.continuation_chunks, a.rollout_streams, a.prompt_batch) < 1
            or a.rollout_chunks < 0):
        raise FlowError("--prompts must be >= 2, --prompt-chunks, --prompt-batch, --continuation-chunks and "
                        "--rollout-streams >= 1, "
                        "--rollout-chunks >= 0")
    cfg = EvalConfig(a.ckpt, a.data_dir, a.out_dir, a.train_dir, a.prompts, a.prompt_chunks, a.continuation_chunks,
                     a.rollout_chunks, device=a.device, codec_ckpt=a.codec_ckpt, trust_codec_ckpt=a.trust_codec_ckpt,
                     audio=not a.no_audio, rollout_streams=a.rollout_streams, teacher=a.teacher,
                     teacher_solver=a.teacher_solver, teacher_nfe=a.teacher_nfe, prompt_batch=a.prompt_batch, weights=a.weights)
    report = run_eval(cfg, sample_config(a, SampleConfig()))
    for line in summary(report):
        print(line)
    print(f"all figures: {a.out_dir}/eval.json")
    return 0
