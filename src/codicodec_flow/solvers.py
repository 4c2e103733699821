"""Samplers for the rectified-flow ODE: schedules, six solvers, and the NFE/steps relation.

Convention (flow.py): x_t = (1 − t)·x0 + t·ε, t = 1 is noise, t = 0 is data, and the model
predicts v = ε − x0. Sampling integrates dx/dt = v(x, t) from t = 1 down to t = 0 over a
schedule ts (decreasing, ts[0] = 1, ts[-1] = 0). Every solver is a plain function of a
velocity callable ``velocity(x (B, L, D), t (B, L)) -> (B, L, D)``; time is per token, so
solvers always pass a (B, L) tensor (the same value for every token of the chunk).

NFE (model evaluations per generated chunk) = evals_per_step × n_steps (`steps_for` rounds any NFE
to whole steps):

    solver     evals/step   NFE for n_steps = 1  2  4  8  16
    euler      1                              1  2  4  8  16
    heun       2                              2  4  8  16 32
    midpoint   2                              2  4  8  16 32
    rk4        4                              4  8  16 32 64
    dpmpp      1                              1  2  4  8  16
    pingpong   1                              1  2  4  8  16

Time arithmetic runs in Python floats (float64) on the host, from a schedule read once before
the loop, so no step syncs with the device; x stays in its own dtype throughout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .errors import FlowError

Velocity = Callable[[Tensor, Tensor], Tensor]  # (x (B, L, D), t (B, L)) -> v (B, L, D)
SCHEDULES = ("linear", "shifted")


# ----------------------------------------------------------------------------- schedules

def make_schedule(n_steps: int, kind: str = "linear", shift: float = 1.0) -> Tensor:
    """Times from 1 (noise) down to 0 (data) as a float64 CPU tensor of n_steps + 1 entries."""
    if n_steps < 1:
        raise FlowError(f"the number of sampling steps must be at least 1, got {n_steps}")
    ts = torch.linspace(1.0, 0.0, n_steps + 1, dtype=torch.float64)       # (n_steps + 1,)
    if kind == "linear":
        return ts
    if kind == "shifted":
        if not shift > 0:
            raise FlowError(f"--shift must be greater than 0 (1 means no shift), got {shift}")
        # SD3 time shift: shift > 1 bends the grid toward t = 1, spending more steps near noise.
        return shift * ts / (1.0 + (shift - 1.0) * ts)
    raise FlowError(f"unknown schedule {kind!r}: choose one of {', '.join(SCHEDULES)}")


def _times(ts: Tensor) -> list[float]:
    """Read the schedule to the host once and check it runs strictly downward inside [0, 1]."""
    if ts.ndim != 1 or ts.numel() < 2:
        raise FlowError(f"a schedule needs at least 2 times in a 1-D tensor, got shape {tuple(ts.shape)}")
    times = [float(t) for t in ts.tolist()]
    if any(not 0.0 <= t <= 1.0 for t in times) or any(b >= a for a, b in zip(times, times[1:])):
        raise FlowError(f"a schedule must decrease strictly within [0, 1], got {times}")
    return times


def _t(t: float, x: Tensor) -> Tensor:
    """Broadcast a time to every token: (B, L), float32 unless x is float64 (bf16 time is too coarse). The tensor
    carries the float too (`time_value`), so a velocity can read it without a round trip to the device."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.full(x.shape[:2], t, dtype=dtype, device=x.device)      # (B, L)
    out.flow_time = t
    return out


def time_value(t: Tensor) -> float:
    """The single time of a chunk's (B, L) time tensor: the float a solver made it from (no device sync), or else
    read from the tensor."""
    value = getattr(t, "flow_time", None)
    return float(t.reshape(-1)[0]) if value is None else value


# ----------------------------------------------------------------------------- deterministic ODE solvers

def euler(velocity: Velocity, x1: Tensor, ts: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """First-order explicit Euler; 1 evaluation per step."""
    times, x = _times(ts), x1
    for t, t_next in zip(times, times[1:]):
        x = x + (t_next - t) * velocity(x, _t(t, x))
    return x


def heun(velocity: Velocity, x1: Tensor, ts: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Euler predictor + trapezoid corrector; 2 evaluations per step, including at t = 0."""
    times, x = _times(ts), x1
    for t, t_next in zip(times, times[1:]):
        dt = t_next - t
        v = velocity(x, _t(t, x))
        # Rectified flow is regular at t = 0, so the corrector is kept on the last step too.
        v_next = velocity(x + dt * v, _t(t_next, x))
        x = x + (0.5 * dt) * (v + v_next)
    return x


def midpoint(velocity: Velocity, x1: Tensor, ts: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Explicit midpoint rule; 2 evaluations per step."""
    times, x = _times(ts), x1
    for t, t_next in zip(times, times[1:]):
        dt = t_next - t
        x_mid = x + (0.5 * dt) * velocity(x, _t(t, x))
        x = x + dt * velocity(x_mid, _t(t + 0.5 * dt, x))
    return x


def rk4(velocity: Velocity, x1: Tensor, ts: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Classic fourth-order Runge-Kutta; 4 evaluations per step."""
    times, x = _times(ts), x1
    for t, t_next in zip(times, times[1:]):
        dt = t_next - t
        k1 = velocity(x, _t(t, x))
        k2 = velocity(x + (0.5 * dt) * k1, _t(t + 0.5 * dt, x))
        k3 = velocity(x + (0.5 * dt) * k2, _t(t + 0.5 * dt, x))
        k4 = velocity(x + dt * k3, _t(t_next, x))
        x = x + (dt / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
    return x


def _log_snr(t: float) -> float:
    """λ = log(α/σ) = log((1 − t)/t); only called for 0 < t < 1."""
    return math.log((1.0 - t) / t)


def dpmpp(velocity: Velocity, x1: Tensor, ts: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """DPM-Solver++ 2M on the data prediction x0 = x − t·v, with α = 1 − t, σ = t; 1 evaluation per step.

    Step t → s: x_s = (s/t)·x + α_s·(1 − e^{−h})·D with h = λ_s − λ_t, where D is x0 (first order)
    or (1 + 1/2r)·x0 − (1/2r)·x0_prev with r = h_prev/h (second order). α_s·(1 − e^{−h}) equals
    α_s − α_t·s/t, which stays finite at t = 1 (λ = −∞), so the first-order step needs no log.
    Second order is used only when the previous time lies strictly inside (0, 1): a step leaving
    t = 1 has h_prev = ∞ (r → ∞ makes it first order anyway). A step landing on s = 0 returns x0,
    the limit of the update (h = ∞) and itself an Euler step, so global order 2 is kept.
    """
    times, x = _times(ts), x1
    x0_prev, t_prev = None, None
    for t, t_next in zip(times, times[1:]):
        x0 = x - t * velocity(x, _t(t, x))                                 # (B, L, D) data prediction
        if t_next == 0.0:
            x = x0
        else:
            d = x0
            if x0_prev is not None and 0.0 < t_prev < 1.0:
                h = _log_snr(t_next) - _log_snr(t)
                r = (_log_snr(t) - _log_snr(t_prev)) / h
                d = (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
            x = (t_next / t) * x + ((1.0 - t_next) - (1.0 - t) * t_next / t) * d
        x0_prev, t_prev = x0, t
    return x


# ----------------------------------------------------------------------------- stochastic sampler

def pingpong(velocity: Velocity, x1: Tensor, ts: Tensor, generator: torch.Generator | None = None,
             noise_scale: float = 1.0) -> Tensor:
    """Predict x0 = x − t·v, then re-noise to the next time with fresh noise × noise_scale; 1 evaluation per step.

    Deterministic given ``generator`` (drawn on its own device, then moved to x's). With a posterior-mean
    model the output is narrower than the data (each x0 prediction is a conditional mean);
    the sampler suits few-step, distilled or consistency-style models that predict samples.
    """
    times, x = _times(ts), x1
    for t, t_next in zip(times, times[1:]):
        x0 = x - t * velocity(x, _t(t, x))                                 # (B, L, D)
        if t_next == 0.0:
            x = x0
        else:
            where = generator.device if generator is not None else x.device
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=where).to(x.device)
            x = (1.0 - t_next) * x0 + t_next * noise_scale * noise
    return x


# ----------------------------------------------------------------------------- registry and NFE

@dataclass(frozen=True)
class SolverSpec:
    """A solver function and how many velocity evaluations each of its steps costs."""
    fn: Callable[..., Tensor]
    evals_per_step: int
    stochastic: bool = False


SOLVERS: dict[str, SolverSpec] = {
    "euler": SolverSpec(euler, 1),
    "heun": SolverSpec(heun, 2),
    "midpoint": SolverSpec(midpoint, 2),
    "rk4": SolverSpec(rk4, 4),
    "dpmpp": SolverSpec(dpmpp, 1),
    "pingpong": SolverSpec(pingpong, 1, stochastic=True),
}


def get_solver(name: str) -> SolverSpec:
    """Look a solver up by name, naming the choices when it is unknown."""
    if name not in SOLVERS:
        raise FlowError(f"unknown solver {name!r}: choose one of {', '.join(SOLVERS)}")
    return SOLVERS[name]


def steps_for(solver: str, nfe: int) -> int:
    """ODE steps per chunk for `nfe` model evaluations: the one NFE-to-steps policy of every command and control.

    NFE = evals_per_step × steps. An NFE the solver cannot spend exactly becomes the nearest whole
    number of steps, halves rounding up, at least one: heun with NFE 5 runs 3 steps (6 evaluations),
    rk4 with NFE 2 runs 1 step (4). Callers report the NFE actually spent (steps × evals_per_step).
    """
    k = get_solver(solver).evals_per_step
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise FlowError(f"NFE (model evaluations per chunk) must be a whole number >= 1, got {nfe!r}")
    return max(1, (nfe + k // 2) // k)


def spent_nfe(solver: str, nfe: int) -> int:
    """The model evaluations per chunk `nfe` actually spends with `solver`: whole steps (steps_for) x evaluations
    per step (before classifier-free guidance doubles them)."""
    return steps_for(solver, nfe) * get_solver(solver).evals_per_step


def integrate(velocity: Velocity, x1: Tensor, solver: str, n_steps: int, schedule: str = "linear",
              shift: float = 1.0, generator: torch.Generator | None = None, noise_scale: float = 1.0,
              t_start: float = 1.0) -> Tensor:
    """Sample x0 from noise x1 (B, L, D) with the named solver over a fresh schedule.

    noise_scale scales the noise a stochastic solver re-injects (deterministic solvers have none).
    t_start < 1 starts the trajectory part way: x1 then holds x(t_start), and the schedule is scaled to run
    from t_start to 0 in the same number of steps (finishing a partly noised chunk).
    """
    if not 0.0 < t_start <= 1.0:
        raise FlowError(f"t_start must lie in (0, 1], got {t_start}")
    spec = get_solver(solver)
    extra = {"noise_scale": noise_scale} if spec.stochastic else {}
    return spec.fn(velocity, x1, make_schedule(n_steps, schedule, shift) * t_start, generator=generator, **extra)
