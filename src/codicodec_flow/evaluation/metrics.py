"""Quality metrics over latents, each with a stated definition and checked on cases with known answers.

Frames: "token" statistics treat every latent token (64 channels) as one sample; "chunk" statistics
take the mean of a chunk's 8 tokens as one sample (slower structure). Latents are compared in the
checkpoint's normalised space, so every channel counts alike.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch


def gaussian_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and covariance (D, D) of samples x (N, D), in float64."""
    x = x.double()
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.T @ xc / max(1, x.shape[0] - 1)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to samples a (N, D) and b (M, D).

    |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), with the matrix square root's trace taken as
    the sum of square roots of the eigenvalues of S_a^(1/2) S_b S_a^(1/2) (symmetric, so eigh is exact).
    """
    mu_a, s_a = gaussian_stats(a)
    mu_b, s_b = gaussian_stats(b)
    w, v = torch.linalg.eigh(s_a)
    root_a = (v * w.clamp_min(0).sqrt()) @ v.T  # S_a^(1/2)
    inner = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp_min(0)
    value = (mu_a - mu_b).pow(2).sum() + torch.trace(s_a) + torch.trace(s_b) - 2 * inner.sqrt().sum()
    return float(value.clamp_min(0))


def token_frames(z: torch.Tensor) -> torch.Tensor:
    """(..., T, 8, 64) -> (N, 64): every token a sample."""
    return z.reshape(-1, z.shape[-1])


def chunk_frames(z: torch.Tensor) -> torch.Tensor:
    """(..., T, 8, 64) -> (N, 64): the mean of each chunk's 8 tokens a sample."""
    return z.mean(-2).reshape(-1, z.shape[-1])


def frechet_report(generated: torch.Tensor, real: torch.Tensor) -> dict:
    """Fréchet distances of token frames and of chunk-mean frames between two (..., T, 8, 64) sets."""
    return {"fd_token": frechet_distance(token_frames(generated), token_frames(real)),
            "fd_chunk": frechet_distance(chunk_frames(generated), chunk_frames(real))}


def nearest_distances(queries: torch.Tensor, bank: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """For each row of queries (N, D), the Euclidean distance to its nearest row of bank (M, D)."""
    out = []
    for q in queries.split(block):
        d = torch.cdist(q.float(), bank.float())  # (n, M)
        out.append(d.min(1).values)
    return torch.cat(out) if out else torch.zeros(0)


def memorisation(generated: torch.Tensor, real: torch.Tensor, train: torch.Tensor) -> dict:
    """Does generation copy the training set? Nearest-neighbour distances of whole chunks (512 values).

    `nn_ratio` = median NN distance of generated chunks to training chunks / the same for real held-out
    chunks; well below 1 means the model reproduces training material more closely than new music of
    the same kind is to it. `copied_fraction` = share of generated chunks closer to a training chunk
    than 99 % of real held-out chunks are.
    """
    flat = lambda z: z.reshape(-1, z.shape[-2] * z.shape[-1])  # noqa: E731 (chunks, 512)
    d_gen = nearest_distances(flat(generated), flat(train))
    d_real = nearest_distances(flat(real), flat(train))
    threshold = torch.quantile(d_real, 0.01)
    return {"held_out_in_train": bool(d_real.median() < 1e-6),  # the 'held-out' data was trained on
            "nn_gen_median": float(d_gen.median()), "nn_real_median": float(d_real.median()),
            "nn_ratio": float(d_gen.median() / d_real.median().clamp_min(1e-9)),
            "copied_fraction": float((d_gen < threshold).float().mean())}


def prompt_relatedness(continuations: torch.Tensor, prompts: torch.Tensor, seed: int = 0) -> dict:
    """How much continuations stay related to their own prompt versus a random other prompt.

    Distance = Euclidean distance between the mean latent (over chunks and tokens) of a continuation
    and of a prompt. `ratio` = mean own distance / mean distance to a shuffled prompt (a derangement):
    below 1 means continuations follow their own prompt. Inputs (N, T, 8, 64), N >= 2.
    """
    n = continuations.shape[0]
    c, p = continuations.mean((1, 2)), prompts.mean((1, 2))  # (N, 64)
    perm = (torch.arange(n) + 1 + torch.randint(0, n - 1, (1,), generator=torch.Generator().manual_seed(seed))) % n
    own = (c - p).norm(dim=1).mean()
    other = (c - p[perm]).norm(dim=1).mean()
    return {"own_distance": float(own), "other_distance": float(other), "ratio": float(own / other.clamp_min(1e-9))}


def spread_ratio(generated: torch.Tensor, real: torch.Tensor) -> float:
    """Generated / real spread: the mean over channels of std(generated) / std(real), token frames of (..., 8, 64).

    1 is the dynamics of the real music; below 1 the output is washed out (narrow, averaged, under-dynamic),
    above 1 it is noisier than the music. Compare like with like: sets of the same length and kind.
    """
    g, r = token_frames(generated).double(), token_frames(real).double()
    return float((g.std(0) / r.std(0).clamp_min(1e-6)).mean())


def spread_parts(generated: torch.Tensor, real: torch.Tensor) -> dict:
    """Where a continuation spread comes from, for continuations (N, K, 8, 64) of N prompts and the real ones.

    "within": each stream's own dynamics, the mean over streams of the std over its K * 8 tokens;
    "between": how far apart the streams lie, the std over streams of each stream's mean. Each as
    generated / real, averaged over channels. A model that keeps the texture lively but pulls every
    continuation toward the collection's average has within ~1 and between < 1; one whose
    continuations keep their prompt's character but come out flat has the reverse.
    """
    g, r = generated.flatten(1, -2).double(), real.flatten(1, -2).double()  # (N, K * 8, 64)
    within = (g.std(1).mean(0) / r.std(1).mean(0).clamp_min(1e-6)).mean()
    between = (g.mean(1).std(0) / r.mean(1).std(0).clamp_min(1e-6)).mean()
    return {"within": float(within), "between": float(between)}


@dataclass(frozen=True)
class SpreadBand:
    """Where a generated/real spread counts as faithful (stated once, used by eval, its plots and its tests).

    A listener hears 0.8x as clearly flatter and duller than the music; the bands leave room for the
    sampling noise of a few hundred chunks (about ±3 % for 8 prompts of 16 chunks) and no more.
    """
    continuation: tuple[float, float] = (0.9, 1.1)  # continuations vs the real continuations of the same prompts
    segment: tuple[float, float] = (0.85, 1.15)  # each rollout segment vs real segments of the same length

    @staticmethod
    def verdict(value: float, band: tuple[float, float]) -> str:
        lo, hi = band
        return "washed out" if value < lo else "too wide" if value > hi else "faithful"

    @staticmethod
    def show(value: float, band: tuple[float, float]) -> str:
        """A spread ratio for people: two decimals, or three where two would put it on a band edge it lies outside
        of (0.897 is washed out against 0.9; printed as 0.90 it would read as faithful)."""
        short = f"{value:.2f}"
        outside = value < band[0] or value > band[1]
        return f"{value:.3f}" if outside and float(short) in band else short


@dataclass(frozen=True)
class DriftLimits:
    """When a long rollout counts as drifting (stated once, used by eval and its tests)."""
    fd_growth: float = 3.0  # last segment's FD to the data > this x the first segment's (and > fd_floor)
    fd_floor: float = 2.0  # FD below this never counts as drift (segment statistics are noisy)
    mean_shift: float = 0.75  # mean |segment mean - data mean| over channels, in data std units
    spread: tuple[float, float] = SpreadBand().segment  # every segment's spread vs real segments must stay inside


def _segment_stats(z: torch.Tensor, ref: torch.Tensor, ref_mu: torch.Tensor, ref_sd: torch.Tensor) -> tuple:
    """(FD to the reference, mean shift in reference std, mean std ratio) of one segment's token frames (N, 64)."""
    return (frechet_distance(z, ref), float(((z.mean(0) - ref_mu).abs() / ref_sd).mean()),
            float((z.std(0) / ref_sd).mean()))


def fd_growth_quarters(fds: list[float]) -> float | None:
    """The median segment FD of the last quarter of a rollout over the first quarter's (at least one segment each).

    The last segment over the first (`fd_growth`) is what a drift goal names, but one segment of 16 streams is a
    noisy figure: neighbouring segments of a stable stream differ by a third as the streams move through
    louder and quieter passages. The quarters' medians tell a trend from one odd segment."""
    if len(fds) < 2 or not fds[0] > 0:
        return None
    q = max(1, len(fds) // 4)
    return statistics.median(fds[-q:]) / statistics.median(fds[:q])


GROWTH_LEVEL = 0.9  # the bootstrap intervals of the FD growth figures: the central 90 % of redrawn stream sets
GROWTH_DRAWS = 2000


def growth_intervals(stream_fd: torch.Tensor, level: float = GROWTH_LEVEL, draws: int = GROWTH_DRAWS,
                     seed: int = 0) -> dict | None:
    """Bootstrap intervals over streams of `fd_growth` and `fd_growth_quarters`, from each stream's FD per segment
    stream_fd (n_segments, S): the streams are redrawn with replacement, as another set of prompts and noise
    would give, and each figure is recomputed from the redrawn streams' mean segment FDs. How far a run's figure
    can move on a second evaluation, without another run: with 16 streams the last-over-first figure moves by
    tenths. None with fewer than 2 streams or 2 segments."""
    n, S = stream_fd.shape
    if n < 2 or S < 2:
        return None
    g = torch.Generator().manual_seed(seed)
    means = stream_fd.double()[:, torch.randint(S, (draws, S), generator=g)].mean(-1)  # (n, draws)
    q = max(1, n // 4)
    first = means[:q].quantile(0.5, dim=0).clamp_min(1e-12)  # median over segments, as statistics.median
    figures = {"fd_growth_interval": means[-1] / means[0].clamp_min(1e-12),
               "fd_growth_quarters_interval": means[-q:].quantile(0.5, dim=0) / first}
    bounds = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    return {"interval_level": level, **{k: [float(b) for b in v.quantile(bounds)] for k, v in figures.items()}}


def drift_report(rollout: torch.Tensor, reference: torch.Tensor | list[torch.Tensor], segment: int = 50,
                 limits: DriftLimits = DriftLimits(), stream_pieces: list[int] | None = None) -> dict:
    """Per-segment statistics of long rollouts (S, T, 8, 64) (or one, (T, 8, 64)) against reference data: one
    (M, 8, 64) tensor, or the held-out pieces as a list of (M_i, 8, 64) tensors.

    Each statistic is computed per stream and segment and averaged over the S streams: one stream is
    like one piece, and pieces differ (half a minute of real music has 0.44-1.07x the collection's
    spread, 5-95 %), so several streams from different prompts are what can be compared with real music.
    A segment's `spread` is its mean std ratio (segment std / reference std, over channels) divided by
    the mean of the same figure over real segments of equal length (never crossing from one piece into the
    next): 1 means "as dynamic as real music over the same span". With `stream_pieces` (the piece each stream's
    prompt was cut from) each stream is divided by its own piece's figure, so a stream continuing a quiet piece
    is held to that piece, and which pieces the prompts came from does not tilt the verdict; a piece shorter than
    one segment counts as the collection's mean. `fd` is compared with `real_segment_fd`, the real segments' median.
    """
    streams = rollout[None] if rollout.ndim == 3 else rollout  # (S, T, 8, 64)
    finite = bool(torch.isfinite(streams).all())
    pieces = reference if isinstance(reference, (list, tuple)) else [reference]
    ref = token_frames(torch.cat(list(pieces))).double()
    ref_mu, ref_sd = ref.mean(0), ref.std(0).clamp_min(1e-6)
    real_by_piece = [[_segment_stats(token_frames(p[i:i + segment]).double(), ref, ref_mu, ref_sd)
                      for i in range(0, p.shape[0] - segment + 1, segment)] for p in pieces]
    real = [r for rs in real_by_piece for r in rs]
    baseline = float(torch.tensor([r[0] for r in real]).median()) if real else None
    real_spread = sum(r[2] for r in real) / len(real) if real else 1.0
    if stream_pieces is not None:
        if len(stream_pieces) != streams.shape[0]:
            raise ValueError(f"stream_pieces names {len(stream_pieces)} pieces for {streams.shape[0]} streams")
        own = [sum(r[2] for r in rs) / len(rs) if rs else real_spread for rs in real_by_piece]
        per_stream = torch.tensor([own[i] for i in stream_pieces], dtype=torch.float64)
    else:
        per_stream = torch.full((streams.shape[0],), real_spread, dtype=torch.float64)
    segs, stream_fd = [], []
    for start in range(0, streams.shape[1] - segment + 1, segment):
        part = streams[:, start:start + segment].double()  # (S, segment, 8, 64)
        if not torch.isfinite(part).all():
            segs.append({"start": start, "fd": float("inf"), "mean_shift": float("inf"), "std_ratio": float("inf"),
                         "spread": float("inf")})
            continue
        stats = torch.tensor([_segment_stats(token_frames(z), ref, ref_mu, ref_sd) for z in part])  # (S, 3)
        stream_fd.append(stats[:, 0])
        fd, shift, std_ratio = (float(v) for v in stats.mean(0))
        segs.append({"start": start, "fd": fd, "mean_shift": shift, "std_ratio": std_ratio,
                     "spread": float((stats[:, 2] / per_stream).mean())})
    reasons = [] if finite else ["NaN or inf in the rollout"]
    if segs and finite:
        first, last = segs[0], segs[-1]
        if last["fd"] > max(limits.fd_floor, limits.fd_growth * first["fd"]):
            reasons.append(f"Fréchet distance grew from {first['fd']:.2f} to {last['fd']:.2f}")
        if last["mean_shift"] > limits.mean_shift:
            reasons.append(f"channel means moved {last['mean_shift']:.2f} data std away")
        lo, hi = limits.spread
        narrow = [s["spread"] for s in segs if s["spread"] < lo]
        wide = [s["spread"] for s in segs if s["spread"] > hi]
        if narrow:
            reasons.append(f"washed out: spread down to {SpreadBand.show(min(narrow), limits.spread)}x real music's in "
                           f"{len(narrow)} of {len(segs)} segments (faithful: {lo}-{hi})")
        if wide:
            reasons.append(f"too wide: spread up to {SpreadBand.show(max(wide), limits.spread)}x real music's in "
                           f"{len(wide)} of {len(segs)} segments (faithful: {lo}-{hi})")
    spreads = [s["spread"] for s in segs]
    return {"finite": finite, "streams": streams.shape[0], "segments": segs, "real_segment_fd": baseline,
            "fd_growth": segs[-1]["fd"] / segs[0]["fd"] if segs and finite and segs[0]["fd"] > 0 else None,
            "fd_growth_quarters": fd_growth_quarters([s["fd"] for s in segs]) if finite else None,
            "growth_intervals": growth_intervals(torch.stack(stream_fd)) if finite and stream_fd else None,
            "real_segment_std_ratio": real_spread,
            "spread_reference": "each stream's own piece" if stream_pieces is not None else "the collection",
            "spread_min": min(spreads) if spreads else None, "spread_max": max(spreads) if spreads else None,
            "drift": bool(reasons), "reasons": reasons,
            "verdict": "fails: " + "; ".join(reasons) if reasons else "stable"}
