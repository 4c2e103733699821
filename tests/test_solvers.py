"""Solvers against a closed-form rectified flow: Gaussian data x0 ~ N(μ, σ²) per dimension.

With a = 1 − t, b = t and S = a²σ² + b², x_t ~ N(aμ, S) and the marginal velocity is
v(x, t) = E[ε|x_t] − E[x0|x_t] = (b − aσ²)/S·(x − aμ) − μ, linear in x. The standardised
coordinate z = (x − aμ)/√S is constant along the ODE, so the exact map is x0 = μ + σ·x1.
"""
import math

import pytest
import torch

from codicodec_flow.errors import FlowError
from codicodec_flow.solvers import (
    SOLVERS, dpmpp, euler, integrate, make_schedule, spent_nfe, steps_for,
)

MU, SIGMA = 0.7, 0.4
ORDERS = {"euler": 1, "heun": 2, "midpoint": 2, "rk4": 4, "dpmpp": 2}
# dpmpp on a uniform-t grid takes O(1) steps in log-SNR near both ends, so it reaches its
# asymptotic order later (its error even plateaus between 16 and 32 steps); measure it further out.
STEP_RANGES = {"euler": (8, 16, 32), "heun": (8, 16, 32), "midpoint": (8, 16, 32),
               "rk4": (8, 16, 32), "dpmpp": (64, 128, 256)}


def gaussian_velocity(x, t):
    """Exact marginal velocity for N(MU, SIGMA²) data; t is per token (B, L)."""
    t = t[..., None].to(x.dtype)                                           # (B, L, 1)
    a, b = 1.0 - t, t
    s2 = a * a * SIGMA**2 + b * b
    return (b - a * SIGMA**2) / s2 * (x - a * MU) - MU


def noise(shape=(4, 8, 3), seed=0, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def max_error(solver, n_steps, x1, **kw):
    return (integrate(gaussian_velocity, x1, solver, n_steps, **kw) - (MU + SIGMA * x1)).abs().max().item()


def test_exact_map_matches_fine_rk4():
    x1 = noise()
    assert max_error("rk4", 200, x1) < 1e-9


@pytest.mark.parametrize("solver", sorted(ORDERS))
def test_convergence_order(solver):
    x1 = noise()
    errs = [max_error(solver, n, x1) for n in STEP_RANGES[solver]]
    slopes = [math.log2(e0 / e1) for e0, e1 in zip(errs, errs[1:])]  # steps double each time
    assert all(s >= ORDERS[solver] - 0.5 for s in slopes), (errs, slopes)


@pytest.mark.parametrize("solver", sorted(ORDERS))
def test_converges_on_shifted_schedule(solver):
    x1 = noise()
    coarse, fine = (max_error(solver, n, x1, schedule="shifted", shift=3.0) for n in (16, 64))
    assert fine < coarse / 2


def test_dpmpp_single_step_is_the_x0_prediction():
    x1 = noise()
    ts = make_schedule(1)
    out = dpmpp(gaussian_velocity, x1, ts)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, euler(gaussian_velocity, x1, ts))


def pingpong_std(n_steps):
    """Exact output std of pingpong with the posterior-mean field, by the variance recursion."""
    ts = make_schedule(n_steps).tolist()
    var_y = 1.0                                                            # Var(x_t − aμ) at t = 1
    for t, t_next in zip(ts, ts[1:]):
        a, s2 = 1.0 - t, (1.0 - t) ** 2 * SIGMA**2 + t * t
        var_x0 = (a * SIGMA**2 / s2) ** 2 * var_y                          # Var of E[x0 | x_t]
        var_y = (1.0 - t_next) ** 2 * var_x0 + t_next**2
    return math.sqrt(var_x0)


def test_pingpong_distribution_and_reproducibility():
    n_steps, x1 = 8, noise((64, 8, 16), seed=1)                            # 8192 samples
    out = integrate(gaussian_velocity, x1, "pingpong", n_steps, generator=torch.Generator().manual_seed(5))
    again = integrate(gaussian_velocity, x1, "pingpong", n_steps, generator=torch.Generator().manual_seed(5))
    other = integrate(gaussian_velocity, x1, "pingpong", n_steps, generator=torch.Generator().manual_seed(6))
    assert torch.equal(out, again)
    assert not torch.allclose(out, other)
    # Mean is exact; the std is narrower than SIGMA because each x0 prediction is a conditional mean.
    assert abs(out.mean().item() - MU) < 0.015
    assert abs(out.std().item() - pingpong_std(n_steps)) < 0.01
    assert pingpong_std(n_steps) < SIGMA


def test_schedules():
    lin = make_schedule(8)
    assert lin.shape == (9,) and lin.dtype == torch.float64
    assert lin[0] == 1.0 and lin[-1] == 0.0 and (lin.diff() < 0).all()
    torch.testing.assert_close(lin, torch.linspace(1, 0, 9, dtype=torch.float64))
    assert torch.equal(make_schedule(8, "shifted", 1.0), lin)
    shifted = make_schedule(8, "shifted", 3.0)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0 and (shifted.diff() < 0).all()
    assert (shifted[1:-1] > lin[1:-1]).all()                               # more steps near noise
    assert (make_schedule(8, "shifted", 0.5)[1:-1] < lin[1:-1]).all()


@pytest.mark.parametrize("args", [(0,), (4, "cosine"), (4, "shifted", 0.0), (4, "shifted", -2.0)])
def test_schedule_errors(args):
    with pytest.raises(FlowError):
        make_schedule(*args)


def test_solver_rejects_bad_schedule():
    with pytest.raises(FlowError, match="decrease"):
        euler(gaussian_velocity, noise(), torch.tensor([0.0, 0.5, 1.0]))
    with pytest.raises(FlowError, match="at least 2"):
        euler(gaussian_velocity, noise(), torch.tensor([1.0]))


def test_steps_for_table():
    table = {"euler": 1, "heun": 2, "midpoint": 2, "rk4": 4, "dpmpp": 1, "pingpong": 1}
    assert {name: spec.evals_per_step for name, spec in SOLVERS.items()} == table
    for name, k in table.items():
        assert steps_for(name, 8 * k) == 8


def test_steps_for_rounds_to_whole_steps_halves_up():
    """One policy everywhere: the nearest whole number of steps, halves up, at least one."""
    assert [steps_for("euler", n) for n in (1, 2, 4, 8)] == [1, 2, 4, 8]
    assert [steps_for("heun", n) for n in (1, 2, 3, 4, 5, 8)] == [1, 1, 2, 2, 3, 4]
    assert [steps_for("rk4", n) for n in (1, 2, 4, 6, 7, 8, 10)] == [1, 1, 1, 2, 2, 2, 3]
    assert [spent_nfe("heun", n) for n in (1, 3, 5, 8)] == [2, 4, 6, 8]  # what is reported: whole steps' evaluations
    assert [spent_nfe("rk4", n) for n in (2, 7)] == [4, 8] and spent_nfe("euler", 3) == 3


def test_steps_for_errors():
    for bad in (0, -3, 2.5, True):
        with pytest.raises(FlowError, match="whole number >= 1"):
            steps_for("heun", bad)
    with pytest.raises(FlowError, match="euler, heun, midpoint, rk4, dpmpp, pingpong"):
        steps_for("ddim", 4)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_per_token_time_and_nfe(solver):
    calls = []

    def counted(x, t):
        assert t.shape == x.shape[:2] and t.device == x.device
        assert (t == t[0, 0]).all()                                        # one time for the whole chunk
        calls.append(t[0, 0].item())
        return gaussian_velocity(x, t)

    x1 = noise((2, 8, 3), dtype=torch.float32)
    out = integrate(counted, x1, solver, 5, generator=torch.Generator().manual_seed(0))
    assert out.shape == x1.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert len(calls) == SOLVERS[solver].evals_per_step * 5
    assert all(0.0 <= t <= 1.0 for t in calls)
    if solver == "heun":
        assert calls[-1] == 0.0                                            # corrector runs at t = 0


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_low_precision_keeps_dtype(solver):
    seen = []

    def velocity(x, t):
        seen.append(t.dtype)
        return gaussian_velocity(x.float(), t).to(x.dtype)

    out = integrate(velocity, noise(dtype=torch.bfloat16), solver, 3, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.bfloat16 and set(seen) == {torch.float32}


@pytest.mark.parametrize("solver", ["heun", "midpoint", "rk4"])
@pytest.mark.parametrize("t_start", [0.3, 0.8])
def test_starts_part_way(solver, t_start):
    """From x(t_start) on the exact trajectory, a run over the scaled schedule lands on that trajectory's end;
    a run from 1 would not (x(t_start) is not the noise)."""
    z = noise()
    x_t = (1 - t_start) * MU + math.sqrt((1 - t_start) ** 2 * SIGMA**2 + t_start**2) * z  # x(t_start) of noise z
    out = integrate(gaussian_velocity, x_t, solver, 64, t_start=t_start)
    assert (out - (MU + SIGMA * z)).abs().max().item() < 1e-3
    assert (integrate(gaussian_velocity, x_t, solver, 64) - (MU + SIGMA * z)).abs().max().item() > 0.05


@pytest.mark.parametrize("t_start", [0.0, 1.5])
def test_start_outside_the_flow_is_refused(t_start):
    with pytest.raises(FlowError, match="t_start"):
        integrate(gaussian_velocity, noise(), "euler", 4, t_start=t_start)
