"""Planning a training run: the configs a fresh, fine-tuned (--init-from) or resumed (--resume) run gets, the
settings a resume may not change, and the checks of the closing stages' settings (rollout, distillation,
--noisy-chunks), so that a bad flag fails before the first step."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .checkpoint import LAST, TrainingCheckpoint, Weights, config_mismatch, load_training, load_weights
from .config import MODEL_PRESETS, FlowConfig, ModelConfig, TrainConfig, config_from_dict
from .distill import DistillConfig
from .errors import CheckpointError, FlowError
from .rollout import RolloutConfig
from .solvers import get_solver

# Train settings that change what a resumed run computes; a resume may not change them.
RESUME_LOCKED = ("batch_size", "grad_accum", "crop_tokens", "seed", "lr", "warmup_steps", "weight_decay",
                 "ema_decay", "min_lr_ratio", "grad_clip", "val_fraction")


@dataclass
class Run:
    train: TrainConfig
    model: ModelConfig
    flow: FlowConfig
    resume_from: TrainingCheckpoint | None  # the run's last.pt when resuming
    init_from: Weights | None = None  # the weights a new run starts from (train --init-from)

    @property
    def origin(self) -> dict | None:
        """{"path", "step"} of the checkpoint this run was started from, kept through resumes; None if from scratch."""
        if self.init_from is not None:
            return self.init_from.record
        return None if self.resume_from is None else self.resume_from.init_from


def plan_run(train_given: dict, model_given: dict, flow_given: dict, preset: str | None = None,
             resume: bool = False, init_from: str | None = None) -> Run:
    """Configs for a run: fresh (preset, "default" if None, + given flags), fine-tuned (`init_from`'s model config,
    its flow config unless given) or resumed (the checkpoint's configs; given flags, a given preset included,
    must agree with them)."""
    train = TrainConfig(**train_given)
    if train.distill_from is not None:  # a student learns its teacher's samples: rollout steps only if asked, and
        train = replace(train, rollout_p=train_given.get("rollout_p", 0.0),  # the teacher samples every chunk
                        noisy_share=train_given.get("noisy_share", 1.0))
    if "noisy_chunks" in train_given and "noisy_share" in train_given:
        raise FlowError("--noisy-chunks and --noisy-share both say how many noisy chunks a crop trains: give one")
    last = Path(train.out_dir) / LAST
    if preset is not None and preset not in MODEL_PRESETS:
        raise FlowError(f"unknown model preset {preset!r}: choose one of {', '.join(MODEL_PRESETS)}")
    if resume and init_from is not None:
        raise FlowError("--init-from starts a new run and --resume continues the run in --out-dir: give one of them")
    if not resume:
        if last.exists():
            raise FlowError(f"{last} exists: pass --resume to continue that run, or choose a new --out-dir")
        init_from = init_from or train.distill_from  # a student starts from its teacher's weights by default
        if init_from is not None:
            return _fine_tune_run(train, model_given, flow_given, preset, init_from)
        preset = preset or "default"
        model_given = {"mark_own": _stage_marks(train), **model_given}
        try:
            return Run(train, replace(MODEL_PRESETS[preset], **model_given), FlowConfig(**flow_given), None)
        except ValueError as exc:
            raise FlowError(str(exc)) from None
    if not last.exists():
        raise CheckpointError(f"--resume: no {last} to resume from")
    ckpt = load_training(last)
    saved = ckpt.configs
    saved_model = asdict(config_from_dict(ModelConfig, saved["model"]))  # a run saved before a field has its default
    problems = (_shape_mismatch(saved_model, model_given, preset) + config_mismatch(saved["flow"], flow_given)
                + config_mismatch(saved["train"], {k: v for k, v in train_given.items() if k in RESUME_LOCKED}))
    if problems:
        raise CheckpointError(f"{last}: cannot resume with different settings: " + "; ".join(problems))
    # a run saved before rollouts existed goes on without them, one saved before the stage had a start from step 0,
    # one saved before anchored rollouts with free ones only, one saved before --noisy-share with all its chunks,
    # one saved before --rollout-max-t training its self-continued chunks at every noise level, a student saved before
    # --distill-landing on the plain reflow line
    saved_train = {"rollout_p": 0.0, "rollout_start": 0.0, "rollout_anchor_p": 0.0, "noisy_share": 1.0,
                   "rollout_max_t": 1.0, "distill_landing": 0.0, **saved["train"]}
    train = replace(config_from_dict(TrainConfig, saved_train), **train_given)
    return Run(train, config_from_dict(ModelConfig, saved_model), config_from_dict(FlowConfig, saved["flow"]), ckpt)


def _fine_tune_run(train: TrainConfig, model_given: dict, flow_given: dict, preset: str | None, path: str) -> Run:
    """A new run from another run's weights: their model shape (size flags must agree), flow settings anew or theirs.
    A run with a closing stage of its own adds the own-chunk mark to weights without it (it starts at zero: the same
    function), unless --no-mark-own; a student keeps its teacher's."""
    source = load_weights(path)
    model_given = dict(model_given)
    mark = model_given.pop("mark_own", None)
    if mark is None:
        mark = source.model_cfg.mark_own or _stage_marks(train)
    elif source.model_cfg.mark_own and not mark:
        raise FlowError(f"{path}: its model has the own-chunk mark, which --no-mark-own cannot take away; leave it out")
    problems = _shape_mismatch(asdict(source.model_cfg), model_given, preset)
    if problems:
        raise CheckpointError(f"{path}: --init-from cannot change the model's shape ({'; '.join(problems)}); leave out "
                              f"the size flags and --preset, the shape comes from the checkpoint")
    try:
        model = replace(source.model_cfg, mark_own=mark)
        return Run(train, model, replace(source.flow_cfg, **flow_given), None, source)
    except ValueError as exc:
        raise FlowError(str(exc)) from None


def _stage_marks(train: TrainConfig) -> bool:
    """Whether a new run's model gains the own-chunk mark unless told: when its closing stage is on, which shows the
    model its own chunks; a student's teacher decides for it."""
    return train.rollout_p > 0 and train.distill_from is None


def _shape_mismatch(saved_model: dict, model_given: dict, preset: str | None) -> list[str]:
    """Where the size flags, and the sizes a given preset implies (unless a flag overrides them), differ from a
    checkpoint's model config (the own-chunk mark is not a size: a preset implies nothing about it)."""
    problems = config_mismatch(saved_model, model_given)
    if preset is not None:
        implied = {k: v for k, v in asdict(MODEL_PRESETS[preset]).items()
                   if k not in model_given and k in saved_model and k != "mark_own"}
        problems += [f"--preset {preset} gives {p}" for p in config_mismatch(saved_model, implied)]
    return problems


def noisy_count(cfg: TrainConfig, mcfg: ModelConfig) -> int | None:
    """The noisy chunks a micro-batch trains: --noisy-chunks, else --noisy-share of the crop's chunks (at least one,
    rounded); None when that is all of them (flow.make_batch then draws nothing)."""
    n = cfg.crop_tokens // mcfg.chunk_tokens
    k = cfg.noisy_chunks or max(1, round(cfg.noisy_share * n))
    return None if k >= n else k


def noisy_chunks_check(cfg: TrainConfig, mcfg: ModelConfig, flag: str = "--noisy-chunks") -> None:
    """--noisy-chunks: 1 up to the crop's chunks (0: --noisy-share decides), --noisy-share in (0, 1]; fewer than all
    not with distillation, whose teacher samples them all."""
    n, share_flag = cfg.crop_tokens // mcfg.chunk_tokens, flag.replace("chunks", "share")
    if not 0 <= cfg.noisy_chunks <= n:
        raise FlowError(f"{flag} {cfg.noisy_chunks}: give 1 to {n} (the chunks of a {cfg.crop_tokens}-token "
                        f"crop), or 0 to let {share_flag} decide")
    if not 0.0 < cfg.noisy_share <= 1.0:
        raise FlowError(f"{share_flag} {cfg.noisy_share}: give a share in (0, 1] of the crop's chunks (1: all)")
    if noisy_count(cfg, mcfg) is not None and cfg.distill_from is not None:
        raise FlowError("--noisy-chunks or --noisy-share below all with --distill-from is not supported: the teacher "
                        "samples every chunk of the noisy stream; leave them out")


def rollout_config(cfg: TrainConfig) -> RolloutConfig:
    """The rollout settings of a run, checked (--rollout-p, --rollout-solver, --rollout-nfe, --rollout-start,
    --rollout-anchor-p, --rollout-anchor-t, --rollout-context-noise, --rollout-max-t)."""
    get_solver(cfg.rollout_solver)  # FlowError naming the choices
    if not 0.0 < cfg.rollout_max_t <= 1.0:
        raise FlowError(f"--rollout-max-t must lie in (0, 1] (1: every noise level), got {cfg.rollout_max_t}")
    if not 0.0 <= cfg.rollout_context_noise < 1.0:
        raise FlowError(f"--rollout-context-noise must lie in [0, 1), got {cfg.rollout_context_noise}")
    if not 0.0 <= cfg.rollout_start < 1.0:
        raise FlowError(f"--rollout-start must lie in [0, 1) (a fraction of --max-steps), got {cfg.rollout_start}")
    try:
        return RolloutConfig(p=cfg.rollout_p, solver=cfg.rollout_solver, nfe=cfg.rollout_nfe,
                             anchor_p=cfg.rollout_anchor_p, anchor_t=cfg.rollout_anchor_t)
    except ValueError as exc:
        raise FlowError(str(exc)) from None


def distill_config(cfg: TrainConfig) -> DistillConfig:
    """The distillation settings of a run, checked (--distill-solver, --distill-nfe, --distill-cfg,
    --distill-landing)."""
    try:
        return DistillConfig(solver=cfg.distill_solver, nfe=cfg.distill_nfe, cfg_scale=cfg.distill_cfg,
                             landing=cfg.distill_landing)
    except ValueError as exc:
        raise FlowError(str(exc)) from None


def rollout_first_step(cfg: TrainConfig) -> int:
    """The first step that may be a rollout step (--rollout-start as a step)."""
    return math.ceil(cfg.rollout_start * cfg.max_steps)
