"""The training loop: two-stream flow matching, AdamW, EMA, bf16, gradient accumulation, DDP, resume, fine-tuning.

Read top to bottom, once plan.py has planned the run (fresh, fine-tuned from another run's weights, or resumed
configs): set up (data, model, optimiser, resume) -> loop (one optimiser step; log, validate, write an audio
sample, save) -> final save.
Launch with `torchrun` for several processes (NCCL on GPUs, gloo on CPU); rank 0 validates,
writes checkpoints and logs.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from .checkpoint import LAST, TrainingCheckpoint, Weights, config_mismatch, load_bundle, save_training
from .codec import CHUNK_SECONDS, load_codec
from .codec.audio import write_wav
from .codec.prompt import decode_latents
from .config import ModelConfig, SampleConfig, TrainConfig
from .data.dataset import LatentData, load_latents, validation_crops
from .data.loader import MicroBatch, StepCrops, step_batches
from .distill import distill_batch
from .errors import CheckpointError, FlowError
from .flow import flow_loss, training_batch, validation_loss
from .generate import StreamGenerator
from .model import FlowDiT
from .plan import Run, distill_config, noisy_chunks_check, noisy_count, rollout_config, rollout_first_step
from .rollout import rollout_context, time_caps
from .util.dashboard import Monitor, QuietMonitor
from .util.devices import autocast, autocast_dtype, resolve_device
from .util.fsutil import remove_stale_temporaries, write_text_atomic

log = logging.getLogger(__name__)

GEN_CONTEXT_NOISE = SampleConfig().context_noise  # validation scores the context noise generation uses


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


@dataclass
class Trainer:
    """Everything the loop works with, built by `setup`: the run, where it runs, its data and its training state."""
    run: Run
    rank: int
    world: int
    device: torch.device
    amp: torch.dtype | None
    data: LatentData
    val_set: list
    model: FlowDiT  # the weights being trained (net wraps them for DDP)
    net: torch.nn.Module
    ema: FlowDiT
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    step: int
    teacher: FlowDiT | None = None  # train --distill-from: the frozen model whose samples the student learns

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def crop_chunks(self) -> int:
        return self.run.train.crop_tokens // self.run.model.chunk_tokens

    @property
    def codec(self) -> dict:
        return {"name": self.data.codec, "version": self.data.codec_version}

    def header(self) -> str:
        cfg, world = self.run.train, self.world
        return (f"{self.model.num_params() / 1e6:.1f} M parameters | {self.data.describe()} | device {self.device}"
                f"{f' x{world}' if world > 1 else ''} | {'bf16' if self.amp else 'fp32'} | crop {cfg.crop_tokens} "
                f"tokens ({self.crop_chunks} chunks), batch {cfg.batch_size}x{cfg.grad_accum}x{world}")

    def save(self) -> None:
        cfg = self.run.train
        save_training(cfg.out_dir, self.model, self.ema, self.opt, self.sched, self.step, _configs(self.run),
                      self.data.stats, self.codec, {"seed": cfg.seed, "world": self.world}, self.run.origin)


def setup(run: Run) -> Trainer:
    """Check the settings, join the process group, load the data, build model, EMA and optimiser (or resume them)."""
    cfg, mcfg = run.train, run.model
    if cfg.crop_tokens % mcfg.chunk_tokens or cfg.crop_tokens <= 0:
        raise FlowError(f"--crop-tokens {cfg.crop_tokens} must be a positive multiple of {mcfg.chunk_tokens} "
                        f"(tokens per chunk); e.g. {max(1, cfg.crop_tokens // mcfg.chunk_tokens) * mcfg.chunk_tokens}")
    if cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise FlowError("--batch-size and --grad-accum must be at least 1")
    rollout_config(cfg)  # a bad rollout or distillation setting fails here, not at the first step
    distill_config(cfg)
    noisy_chunks_check(cfg, mcfg)
    if cfg.num_workers < 0:
        raise FlowError(f"--num-workers must be 0 (crops read in the training process) or more, got {cfg.num_workers}")
    rank, world, device = _dist_setup(cfg.device)
    data = load_latents(cfg.data_dir, cfg.val_fraction)
    if run.resume_from is not None:
        data = _resume_data(data, run.resume_from, cfg.data_dir)
    if run.init_from is not None:
        data = _fine_tune_data(data, run.init_from, cfg.data_dir)
    model, ema, opt, sched = fresh_state(run, device)
    if run.init_from is not None:  # both start from the source's EMA weights; optimiser and schedule are new
        run.init_from.load_into(model)
        run.init_from.load_into(ema)
        log.info(f"starting from the {'EMA ' if run.init_from.kind == 'training' else ''}weights of "
                 f"{run.init_from.path} (its step {run.init_from.step}); this run counts its own steps from 0")
    step = 0 if run.resume_from is None else run.resume_from.restore(model, ema, opt, sched)
    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    val_set = validation_crops(data.val, data.stats, cfg.crop_tokens // mcfg.chunk_tokens, cfg.val_crops)
    teacher = None if cfg.distill_from is None else _load_teacher(cfg.distill_from, mcfg, data, cfg.data_dir, device)
    return Trainer(run, rank, world, device, autocast_dtype(cfg.dtype, device), data, val_set, model, net, ema, opt,
                   sched, step, teacher)


def fresh_state(run: Run, device) -> tuple[FlowDiT, FlowDiT, torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """A new run's model (seeded: identical initial weights on every rank), its fp32 EMA copy, AdamW and schedule."""
    cfg = run.train
    torch.manual_seed(cfg.seed)
    model = FlowDiT(run.model).to(device)
    ema = copy.deepcopy(model).float().requires_grad_(False)
    opt = make_optimizer(model, cfg)
    return model, ema, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))


def step_crops(tr: Trainer) -> StepCrops:
    """This rank's crops for the steps from tr.step to max_steps (each a function of seed, rank and step)."""
    cfg = tr.run.train
    return StepCrops(tr.data.train, tr.data.stats, cfg.batch_size, tr.crop_chunks, cfg.grad_accum, cfg.seed, tr.rank,
                     tr.step, cfg.max_steps)


def optimiser_step(tr: Trainer, crops: list[MicroBatch]) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step over the step's grad_accum micro-batches of crops, then the EMA; (mean loss on the device,
    gradient norm)."""
    cfg, fcfg, mcfg = tr.run.train, tr.run.flow, tr.run.model
    tr.model.train()
    loss_sum = torch.zeros((), device=tr.device)
    for micro, mb in enumerate(crops):
        g = mb.generator()
        context, max_t, own_from = _rollout(tr, mb.x, g)  # None on teacher-forced steps: the real crop is the past
        batch = training_batch(mb.x, mb.valid, fcfg, mcfg.context_chunks, mcfg.chunk_tokens, g, context,
                               noisy_count(cfg, mcfg), max_t, own_from).to(tr.device)
        if tr.teacher is not None:  # the teacher's samples replace the real chunks as the noisy stream's data
            with autocast(tr.device, tr.amp):
                batch = distill_batch(tr.teacher, batch, distill_config(cfg), tr.model, g)
        last = micro == cfg.grad_accum - 1
        with contextlib.nullcontext() if tr.world == 1 or last else tr.net.no_sync():
            with autocast(tr.device, tr.amp):
                loss, _ = flow_loss(tr.net, batch)
            (loss / cfg.grad_accum).backward()
        loss_sum += loss.detach() / cfg.grad_accum  # stays on the device: no sync per step
    grad_norm = torch.nn.utils.clip_grad_norm_(tr.model.parameters(), cfg.grad_clip)
    if torch.isfinite(grad_norm):
        tr.opt.step()
    else:
        log.warning(f"step {tr.step}: non-finite gradient, update skipped")
    tr.opt.zero_grad(set_to_none=True)
    tr.sched.step()
    ema_update(tr.ema, tr.model, ema_decay_at(tr.step, cfg.ema_decay))
    tr.step += 1
    return loss_sum, grad_norm


def _load_teacher(path: str, student: ModelConfig, data: LatentData, data_dir: str, device) -> FlowDiT:
    """The frozen teacher of `train --distill-from`: its chunks, window and latent normalisation must be the
    student's, or its samples would answer another question than the one the student is trained on."""
    teacher = load_bundle(path, device)  # eval mode, no gradients
    _check_codec(data, {"name": teacher.codec, "version": teacher.codec_version}, data_dir, path,
                 "distil on latents of the teacher's codec")
    same = ("latent_dim", "chunk_tokens", "context_chunks")
    problems = config_mismatch(asdict(teacher.model_cfg), {k: getattr(student, k) for k in same})
    if problems:
        raise CheckpointError(f"{path}: --distill-from needs a teacher with the student's chunks and window "
                              f"({'; '.join(problems)})")
    if not (torch.allclose(teacher.stats.mean, data.stats.mean) and torch.allclose(teacher.stats.std, data.stats.std)):
        raise CheckpointError(f"{path}: the teacher was trained with another latent normalisation than this run's; "
                              f"start the student from the teacher's weights (leave out --init-from) or from a run "
                              f"on the same latents")
    log.info(f"distilling {path}: {teacher.model_cfg.n_layers} layers x {teacher.model_cfg.dim}")
    return teacher.model


def _rollout(tr: Trainer, x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor | None, torch.Tensor | None,
                                                                       int | None]:
    """On a share rollout_p of micro-batches from step rollout_start * max_steps on, the model's own cached
    continuation of each crop's real opening as its context (rollout.py), the caps on the chunks' noise levels
    (rollout.time_caps; None at --rollout-max-t 1) and the first chunk the model made (P); drawn from the step's
    generator, so resume stays exact, and steps before the start draw nothing (they are a plain run's). (None, None,
    None) otherwise."""
    cfg = tr.run.train
    if cfg.rollout_p <= 0 or tr.step < rollout_first_step(cfg):
        return None, None, None
    if float(torch.rand((), generator=g)) >= cfg.rollout_p:
        return None, None, None
    context, P = rollout_context(tr.model, x.to(tr.device), rollout_config(cfg), cfg.rollout_context_noise, g)
    return context.cpu(), time_caps(x.shape[1] // tr.run.model.chunk_tokens, P, cfg.rollout_max_t), P


def validate(tr: Trainer) -> dict:
    """Validation loss of the trained and of the EMA weights, in the generation setting."""
    amp = lambda: autocast(tr.device, tr.amp)  # noqa: E731
    val = validation_loss(tr.model.eval(), tr.val_set, GEN_CONTEXT_NOISE, tr.device, autocast=amp)
    val_ema = validation_loss(tr.ema.eval(), tr.val_set, GEN_CONTEXT_NOISE, tr.device, autocast=amp)
    return {"kind": "val", "step": tr.step, "val_loss": val["loss"], "val_loss_ema": val_ema["loss"],
            "val_by_t": {str(k): v for k, v in val["by_t"].items()}}


def run_train(run: Run, sample_hook=None, stop_at: int | None = None) -> dict:
    """Train until max_steps (or, saving first, until `stop_at`, as if interrupted); returns the last metrics.

    `sample_hook(step, ema_model, data, out_dir, device)` writes an audio sample and returns its name;
    by default `audio_sample_hook` does, every --audio-sample-every steps.
    """
    tr = setup(run)
    cfg = run.train
    out = Path(cfg.out_dir)
    if tr.main:
        out.mkdir(parents=True, exist_ok=True)
        stale = remove_stale_temporaries(out, recursive=True)
        if stale:
            log.info(f"removed {len(stale)} temporary file(s) left in {out} by an interrupted save")
        origin = {} if run.origin is None else {"init_from": run.origin}
        write_text_atomic(json.dumps({**_configs(run), **origin}, indent=1), out / "config.json")
    if sample_hook is None and cfg.audio_sample_every > 0:
        sample_hook = audio_sample_hook(cfg.audio_continuation)
    monitor = Monitor(out, cfg.max_steps, cfg.tui, tr.header()) if tr.main else QuietMonitor()
    smooth, t_last = None, time.perf_counter()
    tokens_per_step = cfg.batch_size * cfg.grad_accum * tr.world * cfg.crop_tokens
    interval_loss, interval_start = torch.zeros((), device=tr.device), tr.step
    metrics: dict = {}
    with monitor, step_batches(step_crops(tr), cfg.num_workers) as batches:
        for crops in batches:
            loss, grad_norm = optimiser_step(tr, crops)
            interval_loss += loss
            step = tr.step
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                loss_val = float(interval_loss) / (step - interval_start)  # mean since the last log line
                smooth = loss_val if smooth is None else 0.8 * smooth + 0.2 * loss_val
                dt = (time.perf_counter() - t_last) / (step - interval_start)
                interval_loss, interval_start, t_last = torch.zeros((), device=tr.device), step, time.perf_counter()
                metrics = {"kind": "train", "step": step, "loss": loss_val, "loss_smooth": smooth,
                           "lr": tr.sched.get_last_lr()[0], "grad_norm": float(grad_norm),
                           "tokens_per_s": tokens_per_step / max(dt, 1e-9), "eta_s": dt * (cfg.max_steps - step)}
                monitor.log(metrics)
            if tr.main and tr.val_set and cfg.val_every > 0 and (step % cfg.val_every == 0 or step == cfg.max_steps):
                val = validate(tr)
                monitor.log(val)
                metrics.update(val_loss=val["val_loss"], val_loss_ema=val["val_loss_ema"])
            if tr.main and sample_hook and cfg.audio_sample_every > 0 and step % cfg.audio_sample_every == 0:
                monitor.log({"kind": "sample", "step": step, "sample": sample_hook(step, tr.ema, tr.data, out, tr.device)})
            if tr.main and (step % cfg.save_every == 0 or step == cfg.max_steps or step == stop_at):
                tr.save()
                kind = "final" if step == cfg.max_steps else "periodic"
                monitor.event(f"step {step}: saved {kind} checkpoint to {out}/{LAST} and ema.pt")
            if step == stop_at:
                break
    if tr.world > 1:  # the others wait for rank 0's last validation and save: a rank that leaves the group early
        dist.barrier()  # can abort at exit, and torchrun then stops rank 0 wherever it is
        dist.destroy_process_group()
    return metrics


def audio_sample_hook(continuation: bool = False, seconds: float = 8.0, codec_ckpt: str | None = None):
    """A `run_train` sample hook writing run/samples/stepNNNNNNN.wav: unconditional, or continuing a validation prompt."""
    state: dict = {}

    def hook(step: int, ema: FlowDiT, data: LatentData, out_dir: Path, device) -> str:
        if "codec" not in state:
            try:
                state["codec"] = load_codec(data.codec, device, codec_ckpt)
            except FlowError as exc:
                state["codec"] = None
                log.warning(f"audio samples are off: {exc}")
        if state["codec"] is None:
            return "off (codec unavailable)"
        gen = StreamGenerator(ema, data.stats, SampleConfig(seed=step), device)
        lead = None
        files = data.val or data.train
        if continuation and files:
            lead = files[0].read(0, max(1, min(8, files[0].chunks - 1)))  # up to ~5.5 s of a held-out file
            gen.prefill(lead)
        z = gen.generate(math.ceil(seconds / CHUNK_SECONDS))[0]
        seq = z if lead is None else torch.cat([lead, z])
        path = write_wav(Path(out_dir) / "samples" / f"step{step:07d}.wav", decode_latents(state["codec"], seq, "parallel"))
        return path.name

    return hook


def _resume_data(data: LatentData, ckpt: TrainingCheckpoint, data_dir: str) -> LatentData:
    """A resumed run keeps the normalisation it started with; latents from another codec are refused."""
    _check_codec(data, ckpt.codec, data_dir, "the run", "resume with the original latent folder")
    saved = ckpt.stats
    if not torch.allclose(saved.mean, data.stats.mean, atol=0.05) or not torch.allclose(saved.std, data.stats.std, rtol=0.05):
        log.warning(f"the latent statistics of {data_dir} changed since the run started (files added or "
                    f"re-encoded?); the run keeps its original normalisation")
    return replace(data, stats=saved)


def _fine_tune_data(data: LatentData, source: Weights, data_dir: str) -> LatentData:
    """A fine-tune keeps the normalisation its weights were trained with; latents from another codec are refused."""
    _check_codec(data, source.codec, data_dir, str(source.path), "preprocess the audio with that codec")
    log.info(f"latent normalisation: the statistics of {source.path}, which its weights were trained with "
             f"(not those of {data_dir})")
    return replace(data, stats=source.stats)


def _check_codec(data: LatentData, codec: dict, data_dir: str, trained: str, fix: str) -> None:
    """Refuse latents of another codec (name or version) than the weights were trained on."""
    if (data.codec, data.codec_version) != (codec["name"], codec.get("version")):
        raise CheckpointError(f"{data_dir} holds {data.codec} {data.codec_version} latents but {trained} was trained "
                              f"on {codec['name']} {codec.get('version')}; {fix}")


def _configs(run: Run) -> dict:
    return {"model": asdict(run.model), "flow": asdict(run.flow), "train": asdict(run.train)}
