"""Few-step generation by distillation: a student trained on its teacher's own samples (reflow).

A trained model's ODE trajectories are curved: its velocity at t = 1 points at the average of every
chunk the noise could become, so one or two Euler steps land on a blurred average. Reflow
(Liu et al., "Flow straight and fast", 2022) straightens them. The teacher samples a chunk z from
noise eps with many evaluations; the student learns the straight path between the two,

    x_t = (1 - t) * z + t * eps,    target velocity v = eps - z,

the ordinary flow objective with the teacher's sample in place of the data. Along a straight path
one Euler step from t = 1 already lands on z, so the student needs few evaluations, and it stays an
ordinary velocity model: any solver, any NFE, the same cache and checkpoint format.

Teacher samples come from the two-stream batch itself, for every chunk of the crop in parallel:
noisy chunk i sees exactly the clean chunks i-W..i-1 it sees at generation time (streams.py), so
integrating the noisy stream from its noise with the clean stream held fixed gives, for every
chunk at once, the chunk the teacher would generate after that past. A test checks it equals the
cached StreamGenerator chunk by chunk. With `cfg_scale` the teacher samples with classifier-free
guidance, and the student's conditional branch learns the guided chunk: one evaluation does what
the teacher needed two for. The student's unconditional chunks keep learning the teacher's
unconditional samples, so guidance on the student still has a branch to push against.

Landing (`landing`, a share of the chunks): a student is never perfectly straight, so its first Euler step
from the noise lands beside the line, and its second step starts from a point the line never trained.
For a share of the chunks whose time t is at least 1/4, the student's own first step is taken (without a
gradient) to t, x_t = eps - (1 - t) * v(eps, 1), and the chunk trains there with the velocity that
takes it straight to the teacher's chunk, (x_t - z) / t. For a straight student that is the reflow pair
itself, so the two objectives agree at their goal; on the way the second step learns to correct the
first's error. (Below t = 1/4 the correction's size, error / t, grows too large to learn from.)
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .config import TrainConfig
from .flow import FlowBatch, target_velocity
from .model import FlowDiT
from .solvers import integrate, steps_for


@dataclass(frozen=True)
class DistillConfig:
    """How the teacher samples the chunks its student learns from (defaults: train's, TrainConfig.distill_*)."""
    solver: str = TrainConfig.distill_solver
    nfe: int = TrainConfig.distill_nfe
    cfg_scale: float = TrainConfig.distill_cfg  # guidance distilled into the student's conditional branch; 1 = none
    landing: float = TrainConfig.distill_landing  # share of chunks trained from where the student's own first step
    #                                               lands (landing_batch)

    def __post_init__(self):
        steps_for(self.solver, self.nfe)  # FlowError naming the solvers, or the NFE's problem
        if not self.cfg_scale >= 0.0:
            raise ValueError(f"--distill-cfg must be 0 or more (1 = no guidance), got {self.cfg_scale}")
        if not 0.0 <= self.landing <= 1.0:
            raise ValueError(f"--distill-landing must lie in [0, 1] (a share of the chunks), got {self.landing}")


LANDING_MIN_T = 0.25  # landing chunks only at t >= this: the correction (x_t - z) / t grows as 1 / t


def batch_noise(batch: FlowBatch) -> torch.Tensor:
    """The noise eps (B, L, D) the batch's noisy stream was drawn from: x_t + (1 - t) * (eps - x) = eps."""
    L = batch.target.shape[1]
    t = batch.times[:, L:, None].to(batch.target.dtype)  # (B, L, 1)
    return batch.inputs[:, L:] + (1 - t) * batch.target


def chunk_velocity(model: FlowDiT, batch: FlowBatch, cfg_scale: float = 1.0):
    """The model's velocity for the batch's noisy stream as a solver's callable (x (B, L, D), t (B, L)) ->
    (B, L, D): every noisy chunk after the clean past the batch shows it (its unconditional chunks: after no past);
    with cfg_scale != 1 guided, both branches in one batch of 2B."""
    L = batch.target.shape[1]
    clean, clean_t = batch.inputs[:, :L], batch.times[:, :L]
    streams, own = batch.streams, batch.own  # the training layout: the model's fast attention path, no dense mask
    if cfg_scale != 1.0:  # the second half's noisy chunks see no past
        B, K = batch.t.shape
        cond = streams.uncond if streams.uncond is not None else torch.zeros(B, K, dtype=torch.bool)
        both = lambda a: None if a is None else torch.cat([a, a])  # noqa: E731
        streams = replace(streams, valid=both(streams.valid),
                          uncond=torch.cat([cond.to(clean.device), torch.ones_like(cond, device=clean.device)]))
        clean, clean_t, own = both(clean), both(clean_t), both(own)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if cfg_scale != 1.0:
            x, t = torch.cat([x, x]), torch.cat([t, t])
        v = model(torch.cat([clean, x], dim=1), torch.cat([clean_t, t.to(clean_t.dtype)], dim=1), batch.pos,
                  streams, own)[:, L:].float()
        if cfg_scale == 1.0:
            return v
        cond, uncond = v.chunk(2)
        return uncond + cfg_scale * (cond - uncond)
    return velocity


@torch.no_grad()
def teacher_samples(teacher: FlowDiT, batch: FlowBatch, cfg: DistillConfig) -> torch.Tensor:
    """The teacher's chunk (B, L, D) for every noisy chunk of the batch, from the batch's own noise, each after
    the clean past the batch shows it (its unconditional chunks: after no past)."""
    was_training = teacher.training
    teacher.eval()
    try:
        return integrate(chunk_velocity(teacher, batch, cfg.cfg_scale), batch_noise(batch).float(), cfg.solver,
                         steps_for(cfg.solver, cfg.nfe))
    finally:
        teacher.train(was_training)


def reflow_batch(batch: FlowBatch, z: torch.Tensor) -> FlowBatch:
    """The batch with the teacher's samples z (B, L, D) as the noisy stream's data: same noise, times, context."""
    L = batch.target.shape[1]
    eps = batch_noise(batch).float()
    t = batch.times[:, L:, None].float()
    noisy = ((1 - t) * z + t * eps).to(batch.inputs.dtype)
    return replace(batch, inputs=torch.cat([batch.inputs[:, :L], noisy], dim=1),
                   target=target_velocity(z, eps).to(batch.target.dtype))


def distill_batch(teacher: FlowDiT, batch: FlowBatch, cfg: DistillConfig, student: FlowDiT | None = None,
                  generator: torch.Generator | None = None) -> FlowBatch:
    """A two-stream training batch turned into the student's: its noisy chunks lead to the teacher's samples (a
    share `cfg.landing` of them from where the student's own first step lands: `student` and `generator` needed)."""
    z = teacher_samples(teacher, batch, cfg)
    if cfg.landing == 0.0:
        return reflow_batch(batch, z)
    if student is None or generator is None:
        raise ValueError("landing chunks need the student and the step's generator")
    return landing_batch(student, batch, z, cfg.landing, generator)


@torch.no_grad()
def landing_batch(student: FlowDiT, batch: FlowBatch, z: torch.Tensor, share: float,
                  generator: torch.Generator) -> FlowBatch:
    """The reflow batch toward the teacher's chunks z (B, L, D), in which a share of the noisy chunks with
    t >= LANDING_MIN_T start instead where the student's own first Euler step from the noise lands at t,
    x_t = eps - (1 - t) * v(eps, 1), with the velocity that takes them from there straight to z, (x_t - z) / t."""
    L = batch.target.shape[1]
    out = reflow_batch(batch, z)
    B, K = batch.t.shape
    pick = (torch.rand(B, K, generator=generator) < share) & (batch.t.cpu() >= LANDING_MIN_T)  # (B, K)
    if not pick.any():
        return out
    was_training = student.training
    student.eval()
    try:
        eps = batch_noise(batch).float()
        v1 = chunk_velocity(student, batch)(eps, torch.ones(eps.shape[:2], device=eps.device))
    finally:
        student.train(was_training)
    t = batch.times[:, L:, None].float()
    land = eps - (1 - t) * v1
    m = pick.to(eps.device).repeat_interleave(L // K, dim=1)[..., None]  # (B, L, 1) per token
    noisy = torch.where(m, land, out.inputs[:, L:].float()).to(batch.inputs.dtype)
    target = torch.where(m, (land - z) / t.clamp_min(LANDING_MIN_T), out.target.float()).to(batch.target.dtype)
    return replace(out, inputs=torch.cat([batch.inputs[:, :L], noisy], dim=1), target=target)
