"""Flags shared by several commands, each declared once and built from the config's defaults."""
from __future__ import annotations

import argparse
import logging
import math

from ..checkpoint import WEIGHTS
from ..codec import CODEC_NAMES
from ..config import PRECISIONS, SampleConfig
from ..errors import FlowError
from ..solvers import SCHEDULES, SOLVERS, get_solver, spent_nfe
from ..util.devices import DEVICE_CHOICES, live_threads

log = logging.getLogger(__name__)


def finite_float(text: str) -> float:
    """argparse type of every float flag: a finite number (nan and inf are refused before any work starts)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


SAMPLING_FLOATS = {"schedule_shift": "--schedule-shift", "temperature": "--temperature", "cfg_scale": "--cfg-scale",
                   "context_noise": "--context-noise", "prompt_noise": "--prompt-noise"}


def check_finite(cfg: SampleConfig) -> SampleConfig:
    """FlowError unless every number of cfg is finite (a NaN temperature would make a whole run of garbage)."""
    bad = [f"{flag} {getattr(cfg, name)}" for name, flag in SAMPLING_FLOATS.items()
           if not math.isfinite(getattr(cfg, name))]
    if bad:
        raise FlowError(f"{', '.join(bad)}: sampling settings must be finite numbers")
    return cfg


def add_device(p: argparse.ArgumentParser, default: str = "auto") -> None:
    p.add_argument("--device", default=default, choices=DEVICE_CHOICES,
                   help=f"compute device (auto: cuda, else mps, else cpu; default {default})")


def add_threads(p: argparse.ArgumentParser, what: str = "generation") -> None:
    """--threads: torch's intra-op threads for live generation (default: live_threads())."""
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help=f"CPU threads for the {what} (default: half the cores, 1 to 4; {live_threads()} here): "
                        f"fewer threads stay fast when other programs, e.g. a DAW, keep cores busy")


def add_codec(p: argparse.ArgumentParser, default: str = "codicodec") -> None:
    """--codec and its weight flags, for commands that choose a codec."""
    p.add_argument("--codec", default=default, choices=CODEC_NAMES,
                   help="codicodec: the real CoDiCodec (needs its weights); spectral: built-in offline stand-in "
                        f"(default {default})")
    add_codec_weights(p)


def add_codec_weights(p: argparse.ArgumentParser) -> None:
    """--codec-ckpt and --trust-codec-ckpt, for every command that may load CoDiCodec."""
    p.add_argument("--codec-ckpt", default=None, metavar="PATH",
                   help="CoDiCodec weights file (else $CODICODEC_CKPT, else the package's first-use download)")
    p.add_argument("--trust-codec-ckpt", action="store_true",
                   help="allow full unpickling of --codec-ckpt (only for a file you trust, e.g. the official one)")


def add_weights(p) -> None:
    """--weights: generate with the EMA weights, or last.pt's raw training weights."""
    p.add_argument("--weights", default="ema", choices=WEIGHTS,
                   help="ema: the EMA weights (default); raw: last.pt's raw training weights (not in ema.pt)")


def add_sampling(p: argparse.ArgumentParser, d: SampleConfig, title: str = "sampling") -> None:
    """Solver, NFE or steps, schedule, temperature, guidance, context noise and seed, defaulting to `d`."""
    g = p.add_argument_group(title)
    g.add_argument("--solver", default=d.solver, choices=sorted(SOLVERS), help=f"ODE solver (default {d.solver})")
    g.add_argument("--nfe", type=int, default=None,
                   help=f"model evaluations per chunk, rounded to whole solver steps (default {d.nfe})")
    g.add_argument("--n-steps", type=int, default=None,
                   help="ODE steps per chunk instead of --nfe: NFE = steps x evaluations per step (euler, dpmpp, "
                        "pingpong 1; heun, midpoint 2; rk4 4); both may be given if they agree")
    g.add_argument("--schedule", default=d.schedule, choices=SCHEDULES, help=f"time grid (default {d.schedule})")
    g.add_argument("--schedule-shift", type=finite_float, default=d.schedule_shift,
                   help=f"SD3-style shift for --schedule shifted; > 1 spends more steps near noise (default {d.schedule_shift:g})")
    g.add_argument("--temperature", type=finite_float, default=d.temperature,
                   help=f"scale of the starting noise, 0..4; < 1 conservative, > 1 more varied (default {d.temperature:g})")
    g.add_argument("--cfg-scale", type=finite_float, default=d.cfg_scale,
                   help=f"classifier-free guidance, 0..10; 1 = off, > 1 follows the context harder (both branches "
                        f"in one pass of twice the tokens) (default {d.cfg_scale:g})")
    g.add_argument("--context-noise", type=finite_float, default=d.context_noise,
                   help=f"noise level put on each generated chunk before it becomes context (default {d.context_noise:g})")
    g.add_argument("--prompt-noise", type=finite_float, default=d.prompt_noise,
                   help=f"noise level put on the prompt's chunks before they become context (default {d.prompt_noise:g}: "
                        f"the prompt as it is)")
    g.add_argument("--seed", type=int, default=d.seed, help=f"same seed, same output on the same device (default {d.seed})")
    g.add_argument("--precision", default=d.precision, choices=PRECISIONS,
                   help="int8: the transformer's linear layers as 8-bit integers, several times faster per chunk on "
                        f"a CPU at a small quality cost (README, bench); CPU only (default {d.precision})")
    g.add_argument("--cuda-graphs", action="store_true", default=d.cuda_graphs,
                   help="replay each evaluation of the cached step as one CUDA graph instead of hundreds of kernel "
                        "launches: several times faster per chunk on a GPU, the same arithmetic (README, bench); "
                        "CUDA only")


def sample_config(a: argparse.Namespace, d: SampleConfig, **extra) -> SampleConfig:
    """The SampleConfig of add_sampling's flags (`d` for what was not given); --n-steps becomes the NFE it spends."""
    nfe = d.nfe if a.nfe is None else a.nfe
    if a.n_steps is not None:
        k = get_solver(a.solver).evals_per_step
        if a.n_steps < 1:
            raise FlowError(f"--n-steps must be at least 1, got {a.n_steps}")
        if a.nfe is not None and a.nfe != a.n_steps * k:
            raise FlowError(f"--nfe {a.nfe} and --n-steps {a.n_steps} contradict each other for {a.solver} "
                            f"({k} evaluation{'s' if k > 1 else ''} per step)")
        nfe = a.n_steps * k
    try:
        cfg = SampleConfig(solver=a.solver, nfe=nfe, schedule=a.schedule, schedule_shift=a.schedule_shift,
                           temperature=a.temperature, cfg_scale=a.cfg_scale, context_noise=a.context_noise,
                           prompt_noise=a.prompt_noise,
                           seed=a.seed, precision=a.precision, cuda_graphs=a.cuda_graphs, **extra)
    except ValueError as exc:
        raise FlowError(str(exc)) from None
    check_finite(cfg)
    spent = spent_nfe(cfg.solver, cfg.nfe)
    if spent != cfg.nfe:
        log.warning(f"{cfg.solver} spends NFE in whole steps: --nfe {cfg.nfe} runs {spent} evaluations per chunk")
    return cfg
