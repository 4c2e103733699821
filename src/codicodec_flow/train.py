"""The training loop: two-stream flow matching, AdamW, EMA, bf16, gradient accumulation, DDP, resume.

Read top to bottom: set up (configs, data, model, optimiser, resume) -> loop (accumulate, clip,
step, EMA, log, validate, sample, save) -> final save. Launch with `torchrun` for several
processes (NCCL on GPUs, gloo on CPU); rank 0 validates, writes checkpoints and logs.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from .checkpoint import config_mismatch, inference_dict, load_checkpoint, save_checkpoint
from .config import MODEL_PRESETS, FlowConfig, ModelConfig, SampleConfig, TrainConfig, config_from_dict
from .dashboard import Monitor
from .data import load_latents, random_crops, step_generator, validation_crops
from .devices import autocast, autocast_dtype, resolve_device
from .errors import CheckpointError, FlowError
from .flow import flow_loss, training_batch, validation_loss
from .fsutil import write_text_atomic
from .model import FlowDiT
from .shards import LatentStats

# Train settings that change what a resumed run computes; a resume may not change them.
RESUME_LOCKED = ("batch_size", "grad_accum", "crop_tokens", "seed", "lr", "warmup_steps", "weight_decay",
                 "ema_decay", "min_lr_ratio", "grad_clip", "val_fraction")
GEN_CONTEXT_NOISE = SampleConfig().context_noise  # validation scores the context noise generation uses


@dataclass
class Run:
    train: TrainConfig
    model: ModelConfig
    flow: FlowConfig
    resume_from: dict | None  # the last.pt contents when resuming


def plan_run(train_given: dict, model_given: dict, flow_given: dict, preset: str = "default",
             resume: bool = False) -> Run:
    """Configs for a run: fresh (preset + given flags) or resumed (checkpoint's configs, given flags must agree)."""
    train = TrainConfig(**train_given)
    last = Path(train.out_dir) / "last.pt"
    if not resume:
        if last.exists():
            raise FlowError(f"{last} exists: pass --resume to continue that run, or choose a new --out-dir")
        if preset not in MODEL_PRESETS:
            raise FlowError(f"unknown model preset {preset!r}: choose one of {', '.join(MODEL_PRESETS)}")
        try:
            return Run(train, replace(MODEL_PRESETS[preset], **model_given), FlowConfig(**flow_given), None)
        except ValueError as exc:
            raise FlowError(str(exc)) from None
    if not last.exists():
        raise CheckpointError(f"--resume: no {last} to resume from")
    ckpt = load_checkpoint(last)
    saved = ckpt["config"]
    problems = (config_mismatch(saved["model"], model_given) + config_mismatch(saved["flow"], flow_given)
                + config_mismatch(saved["train"], {k: v for k, v in train_given.items() if k in RESUME_LOCKED}))
    if problems:
        raise CheckpointError(f"{last}: cannot resume with different settings: " + "; ".join(problems))
    train = replace(config_from_dict(TrainConfig, saved["train"]), **train_given)
    return Run(train, config_from_dict(ModelConfig, saved["model"]), config_from_dict(FlowConfig, saved["flow"]), ckpt)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases and norm gains)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.99), eps=1e-8)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().float(), 1 - decay)


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay warmed up so early averages are not dominated by the random initialisation."""
    return min(decay, (1 + step) / (10 + step))


def _dist_setup(device_name: str) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, resolve_device(device_name)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def run_train(run: Run, sample_hook=None, stop_at: int | None = None) -> dict:
    """Train until max_steps (or, saving first, until `stop_at`, as if interrupted); returns the last metrics.

    `sample_hook(step, ema_model, data, out_dir, device)` writes an audio sample and returns its path.
    """
    cfg, mcfg, fcfg = run.train, run.model, run.flow
    if cfg.crop_tokens % mcfg.chunk_tokens or cfg.crop_tokens <= 0:
        raise FlowError(f"--crop-tokens {cfg.crop_tokens} must be a positive multiple of {mcfg.chunk_tokens} "
                        f"(tokens per chunk); e.g. {max(8, cfg.crop_tokens // 8 * 8)}")
    if cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise FlowError("--batch-size and --grad-accum must be at least 1")
    rank, world, device = _dist_setup(cfg.device)
    main_proc = rank == 0
    out = Path(cfg.out_dir)
    data = load_latents(cfg.data_dir, cfg.val_fraction)
    if run.resume_from is not None:
        data = _resume_data(data, run.resume_from, cfg.data_dir)
    crop_chunks = cfg.crop_tokens // mcfg.chunk_tokens
    amp = autocast_dtype(cfg.dtype, device)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = FlowDiT(mcfg).to(device)
    ema = copy.deepcopy(model).float().requires_grad_(False)
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    step = 0
    if run.resume_from is not None:
        ck = run.resume_from
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        step = int(ck["step"])
        torch.set_rng_state(ck["rng"]["torch"])
    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    codec = {"name": data.codec, "version": data.codec_version}
    val_set = validation_crops(data.val, data.stats, crop_chunks, cfg.val_crops)
    header = (f"{model.num_params() / 1e6:.1f} M parameters | {data.describe()} | device {device}"
              f"{f' x{world}' if world > 1 else ''} | {'bf16' if amp else 'fp32'} | crop {cfg.crop_tokens} tokens "
              f"({crop_chunks} chunks), batch {cfg.batch_size}x{cfg.grad_accum}x{world}")
    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(json.dumps(_configs(run), indent=1), out / "config.json")

    monitor = Monitor(out, cfg.max_steps, cfg.tui, header) if main_proc else _Quiet()

    def save(kind: str) -> None:
        state = {"kind": "training", "model": model.state_dict(), "ema": ema.state_dict(),
                 "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
                 "rng": {"torch": torch.get_rng_state()}, "config": _configs(run),
                 "stats": data.stats.to_json(), "codec": codec, "sampler": {"seed": cfg.seed, "world": world}}
        save_checkpoint(state, out / "last.pt")
        save_checkpoint(inference_dict(ema.state_dict(), mcfg, fcfg, data.stats, codec, step), out / "ema.pt")
        monitor.event(f"step {step}: saved {kind} checkpoint to {out}/last.pt and ema.pt")

    smooth, t_last, tokens_per_step = None, time.perf_counter(), cfg.batch_size * cfg.grad_accum * world * cfg.crop_tokens
    interval_loss, interval_start = torch.zeros((), device=device), step
    metrics: dict = {}
    with monitor:
        while step < cfg.max_steps:
            model.train()
            for micro in range(cfg.grad_accum):
                g = step_generator(cfg.seed, rank, step, micro)
                x, valid = random_crops(data.train, data.stats, cfg.batch_size, crop_chunks, g)
                batch = training_batch(x, valid, fcfg, mcfg.context_chunks, mcfg.chunk_tokens, g).to(device)
                sync = contextlib.nullcontext() if world == 1 or micro == cfg.grad_accum - 1 else net.no_sync()
                with sync:
                    with autocast(device, amp):
                        loss, _ = flow_loss(net, batch)
                    (loss / cfg.grad_accum).backward()
                interval_loss += loss.detach() / cfg.grad_accum  # stays on the device: no sync per step
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if torch.isfinite(grad_norm):
                opt.step()
            else:
                monitor.event(f"step {step}: non-finite gradient, update skipped")
            opt.zero_grad(set_to_none=True)
            sched.step()
            ema_update(ema, model, ema_decay_at(step, cfg.ema_decay))
            step += 1

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                loss_val = float(interval_loss) / (step - interval_start)  # mean since the last log line
                smooth = loss_val if smooth is None else 0.8 * smooth + 0.2 * loss_val
                dt = (time.perf_counter() - t_last) / (step - interval_start)
                interval_loss, interval_start = torch.zeros((), device=device), step
                t_last = time.perf_counter()
                metrics = {"kind": "train", "step": step, "loss": loss_val, "loss_smooth": smooth,
                           "lr": sched.get_last_lr()[0], "grad_norm": float(grad_norm),
                           "tokens_per_s": tokens_per_step / max(dt, 1e-9), "eta_s": dt * (cfg.max_steps - step)}
                monitor.log(metrics)
            if main_proc and val_set and cfg.val_every > 0 and (step % cfg.val_every == 0 or step == cfg.max_steps):
                val = validation_loss(model.eval(), val_set, GEN_CONTEXT_NOISE, device, autocast=lambda: autocast(device, amp))
                val_ema = validation_loss(ema.eval(), val_set, GEN_CONTEXT_NOISE, device, autocast=lambda: autocast(device, amp))
                monitor.log({"kind": "val", "step": step, "val_loss": val["loss"], "val_loss_ema": val_ema["loss"],
                             "val_by_t": {str(k): v for k, v in val["by_t"].items()}})
                metrics.update(val_loss=val["loss"], val_loss_ema=val_ema["loss"])
            if main_proc and sample_hook and cfg.audio_sample_every > 0 and step % cfg.audio_sample_every == 0:
                monitor.log({"kind": "sample", "step": step, "sample": sample_hook(step, ema, data, out, device)})
            if main_proc and (step % cfg.save_every == 0 or step == cfg.max_steps or step == stop_at):
                save("final" if step == cfg.max_steps else "periodic")
            if step == stop_at:
                break
    if world > 1:
        dist.destroy_process_group()
    return metrics


def _resume_data(data, ckpt: dict, data_dir: str):
    """A resumed run keeps the normalisation it started with; latents from another codec are refused."""
    codec = ckpt["codec"]
    if (data.codec, data.codec_version) != (codec["name"], codec.get("version")):
        raise CheckpointError(f"{data_dir} holds {data.codec} {data.codec_version} latents but the run was trained on "
                              f"{codec['name']} {codec.get('version')}; resume with the original latent folder")
    saved = LatentStats.from_json(ckpt["stats"])
    if not torch.allclose(saved.mean, data.stats.mean, atol=0.05) or not torch.allclose(saved.std, data.stats.std, rtol=0.05):
        print(f"note: the latent statistics of {data_dir} changed since the run started (files added or "
              f"re-encoded?); the run keeps its original normalisation")
    return replace(data, stats=saved)


def _configs(run: Run) -> dict:
    return {"model": asdict(run.model), "flow": asdict(run.flow), "train": asdict(run.train)}


class _Quiet:
    """The monitor of ranks other than 0: says nothing."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def log(self, record: dict) -> None:
        pass

    def event(self, message: str) -> None:
        pass

