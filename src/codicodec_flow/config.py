"""Typed, frozen settings for every stage; `dataclasses.asdict` of them goes into manifests and checkpoints."""
from __future__ import annotations

from dataclasses import dataclass, fields

from .codec.base import LATENT_DIM, TOKENS_PER_CHUNK


@dataclass(frozen=True)
class PreprocessConfig:
    in_dir: str
    out_dir: str
    codec: str = "codicodec"
    codec_ckpt: str | None = None
    trust_codec_ckpt: bool = False
    device: str = "auto"
    max_seconds: float = 300.0  # longer files are split into shards of at most this length
    overwrite: bool = False
    num_shards: int = 1  # split the file list into this many disjoint parts ...
    shard_index: int = 0  # ... and encode this one
    storage: str = "auto"  # float32 | float16 (memory-mapped arrays) | pt; auto: the folder's own, float32 if new


@dataclass(frozen=True)
class ModelConfig:
    dim: int = 768
    n_layers: int = 10
    n_heads: int = 12
    cond_dim: int = 768  # width of the time embedding that drives adaLN
    context_chunks: int = 32  # sliding window W: a chunk sees at most W past chunks
    latent_dim: int = LATENT_DIM  # channels per latent token (the codec's)
    chunk_tokens: int = TOKENS_PER_CHUNK  # tokens per codec chunk (the codec's)
    mlp_ratio: float = 2.25  # SwiGLU hidden width / dim, rounded up to a multiple of 64
    rope_base: float = 10_000.0
    time_freq_dim: int = 256  # sinusoidal features of t before the time MLP
    # context chunks the model made itself carry a learned mark in their conditioning, so it can tell them from real
    # music (a prompt, a performer's audio), shown in the closing stage's rollouts; generation marks a chunk once its
    # window holds only the model's own (StreamGenerator._marked). False here, as models saved before it have it: a
    # new run gets it with its closing stage (plan.py; train --no-mark-own leaves it out)
    mark_own: bool = False

    def __post_init__(self):
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"dim {self.dim} must split into {self.n_heads} heads of even width")
        if self.context_chunks < 1:
            raise ValueError(f"context_chunks must be >= 1, got {self.context_chunks}")


MODEL_PRESETS = {
    "default": ModelConfig(),  # ~99 M parameters
    "small": ModelConfig(dim=384, n_layers=8, n_heads=6, cond_dim=384),  # ~20 M parameters
    "tiny": ModelConfig(dim=64, n_layers=2, n_heads=4, cond_dim=64, context_chunks=4),  # tests and the demo
}


@dataclass(frozen=True)
class FlowConfig:
    # how the noisy chunks' times are drawn: uniform continues held-out music with a far lower FD than logit_normal
    # (mass in the middle); with train's closing rollout stage its long rollouts hold (README, evaluation)
    t_dist: str = "uniform"  # or "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    context_noise_max: float = 0.1  # clean-stream chunks carry noise up to this level in training
    p_uncond: float = 0.1  # a noisy chunk sees no context with this probability (classifier-free guidance)

    def __post_init__(self):
        if self.t_dist not in ("logit_normal", "uniform"):
            raise ValueError(f"t_dist must be 'logit_normal' or 'uniform', got {self.t_dist!r}")
        if not 0.0 <= self.context_noise_max < 1.0 or not 0.0 <= self.p_uncond < 1.0:
            raise ValueError("context_noise_max and p_uncond must lie in [0, 1)")


@dataclass(frozen=True)
class TrainConfig:
    data_dir: str
    out_dir: str
    device: str = "auto"
    batch_size: int = 8
    grad_accum: int = 1
    crop_tokens: int = 768  # tokens per training crop, a multiple of 8 (768 = 96 chunks, ~66 s)
    max_steps: int = 200_000
    dtype: str = "auto"  # auto: bf16 autocast on CUDA/MPS, fp32 on CPU
    lr: float = 1e-4
    warmup_steps: int = 1000
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    save_every: int = 50
    val_every: int = 500
    val_fraction: float = 0.1
    val_crops: int = 32
    audio_sample_every: int = 0  # 0 disables periodic audio samples
    audio_continuation: bool = False  # samples continue a validation prompt instead of starting from nothing
    log_every: int = 10
    seed: int = 0
    num_workers: int = 0  # background processes reading crops; 0 reads them in the training process
    noisy_chunks: int = 0  # noisy chunks trained per crop, drawn at random per micro-batch; 0: noisy_share of them
    # share of a crop's chunks in the noisy stream when noisy_chunks is 0 (1: all; plan.noisy_count): per second of
    # training a quarter continued held-out music as well as all of them, per step a little worse (README, evaluation)
    noisy_share: float = 0.25
    # share of micro-batches whose context is the model's own rollout (rollout.py); 0: off. A run with the stage on
    # learns the own-chunk mark (ModelConfig.mark_own, plan.py) unless told not to
    rollout_p: float = 0.25
    rollout_solver: str = "midpoint"  # how rollouts are sampled: the live default, where drift hurts most
    rollout_nfe: int = 4
    rollout_start: float = 0.8  # fraction of max_steps after which rollout steps are mixed in (0: from the first)
    rollout_anchor_p: float = 0.0  # share of rollouts finished from the real chunks noised to rollout_anchor_t
    rollout_anchor_t: float = 0.8
    # context noise of the rollouts' own chunks (generation's --context-noise default; 0 was an experiment: livelier
    # continuations, streams that grow more; README, evaluation)
    rollout_context_noise: float = 0.02
    # highest noise level at which a chunk with the model's own chunks in its past trains (1: every level). Without
    # the own-chunk mark a cap (0.8) keeps continuations livelier: trained above it against a self-made past, the real
    # target pulls them toward the collection's average; with the mark the streams need every level (README, evaluation)
    rollout_max_t: float = 1.0
    distill_from: str | None = None  # teacher checkpoint: train on its samples (distill.py, few-step students)
    distill_solver: str = "heun"  # how the teacher samples them
    distill_nfe: int = 16  # its evaluations per chunk: at 16 its students beat its own heun NFE 8 (README evaluation)
    distill_cfg: float = 1.0  # classifier-free guidance the teacher samples with, learnt by the student; 1: none
    distill_landing: float = 1.0  # share of chunks trained from where the student's own first step lands (distill.py)
    tui: bool = True


def config_from_dict(cls, d: dict):
    """Rebuild a config dataclass from its asdict() form, ignoring keys this version does not know."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


PRECISIONS = ("fp32", "int8")


@dataclass(frozen=True)
class SampleConfig:
    """How chunks are drawn. Every sampling default lives here; the commands build their flags from it."""
    solver: str = "heun"
    nfe: int = 16  # model evaluations per chunk, rounded to whole steps of the solver (solvers.steps_for)
    schedule: str = "linear"
    schedule_shift: float = 1.0
    temperature: float = 1.0  # scale of the starting noise (and of pingpong's re-injected noise)
    cfg_scale: float = 1.0  # classifier-free guidance; 1 = off (no extra evaluations)
    context_noise: float = 0.02  # noise level put on each finished chunk before it becomes context
    # noise level put on the prompt's chunks (real music): 0 keeps each continuation nearer its own prompt's character
    # (continuation spread +0.01 on held-out music, rollouts unchanged; README, evaluation)
    prompt_noise: float = 0.0
    seed: int = 0
    num_samples: int = 1
    precision: str = "fp32"  # or "int8": the transformer's linear layers as 8-bit integers (CPU; quantize.py)
    cuda_graphs: bool = False  # replay each cached pass as a CUDA graph (CUDA only; graphs.py)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.nfe < 1:
            raise ValueError(f"--nfe must be at least 1, got {self.nfe}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0.0 <= self.context_noise < 1.0:
            raise ValueError(f"--context-noise must lie in [0, 1), got {self.context_noise}")
        if not 0.0 <= self.prompt_noise < 1.0:
            raise ValueError(f"--prompt-noise must lie in [0, 1), got {self.prompt_noise}")
        if self.num_samples < 1:
            raise ValueError(f"--num-samples must be at least 1, got {self.num_samples}")


# The cheap end: `realtime`, its live controls and their benchmarks. midpoint, not euler: at the same 4 evaluations
# euler's samples were washed out (0.74x the real spread) and midpoint's faithful (README, evaluation).
LIVE_SAMPLING = SampleConfig(solver="midpoint", nfe=4)
