"""The `eval` command: how good is a checkpoint on held-out latents? Loss, continuations, drift, pictures.

Every figure goes into eval.json; definitions live in metrics.py. Held-out means a latent folder the
model was not trained on (a separate preprocess of music kept aside).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..checkpoint import Bundle, load_bundle
from ..codec import CHUNK_SAMPLES, CHUNK_SECONDS
from ..codec.prompt import decode_latents
from ..config import SampleConfig
from ..data.dataset import LatentFile, load_latents, validation_crops
from ..errors import DataError, FlowError
from ..flow import validation_loss
from ..generate import StreamGenerator
from ..latents import normalise
from ..solvers import spent_nfe
from ..util.devices import autocast, autocast_dtype, resolve_device
from ..util.fsutil import write_text_atomic
from ..util.progress import Reporter
from .metrics import (SpreadBand, drift_report, frechet_report, memorisation, prompt_relatedness, spread_parts,
                      spread_ratio)
from .plots import curves_png, latent_heatmap_png, spectrogram_png, training_curves_png


@dataclass(frozen=True)
class EvalConfig:
    ckpt: str
    data_dir: str
    out_dir: str = "eval_out"
    train_dir: str | None = None  # the training latents, for the memorisation check
    prompts: int = 256  # fewer are too noisy: on disjoint sets of 64 the token FD ranged 1.0-5.3 (README, eval)
    prompt_chunks: int = 8  # ~5.5 s of prompt
    continuation_chunks: int = 16  # ~11 s compared with the real continuation
    rollout_chunks: int = 1000  # ~11 min long-horizon stream
    rollout_streams: int = 16  # streams from different held-out prompts: one stream is like one piece
    segment_chunks: int = 50  # rollout statistics per segment of this many chunks
    device: str = "auto"
    codec_ckpt: str | None = None
    trust_codec_ckpt: bool = False
    audio: bool = True  # decode one prompt + continuation for a spectrogram
    teacher: str | None = None  # another checkpoint (a distilled student's teacher) continuing the same prompts
    teacher_solver: str = "heun"  # ... with its own sampler, from the same noise
    teacher_nfe: int = 8
    prompt_batch: int = 64  # prompts continued at once (memory: one cache per prompt)
    weights: str = "ema"  # "ema", or "raw": last.pt's raw training weights


def pick_windows(files: list[LatentFile], n: int, length: int, seed: int = 0) -> list[tuple[int, int]]:
    """n (file, start) windows of `length` chunks, spread over files that are long enough, deterministic."""
    usable = [i for i, f in enumerate(files) if f.chunks >= length]
    if not usable:
        return []
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        i = usable[k % len(usable)]
        out.append((i, int(torch.randint(0, files[i].chunks - length + 1, (1,), generator=g))))
    return out


@dataclass
class _Run:
    """What every part of one evaluation shares."""
    cfg: EvalConfig
    sample: SampleConfig
    bundle: Bundle
    device: torch.device
    amp: torch.dtype | None
    files: list[LatentFile]  # the held-out latents
    out: Path
    plain: bool | None

    def generator(self, streams: int) -> StreamGenerator:
        return StreamGenerator(self.bundle.model, self.bundle.stats, replace(self.sample, num_samples=streams),
                               self.device, self.amp)

    def norm(self, z: torch.Tensor) -> torch.Tensor:
        return normalise(z, self.bundle.stats)


def run_eval(cfg: EvalConfig, sample: SampleConfig = SampleConfig(), plain: bool | None = None) -> dict:
    """Compute every figure, write eval.json and the PNGs into cfg.out_dir, and return the figures."""
    dev = resolve_device(cfg.device)
    bundle = load_bundle(cfg.ckpt, dev, cfg.weights)
    held = load_latents(cfg.data_dir, val_fraction=0.0)
    if held.codec != bundle.codec:
        raise DataError(f"{cfg.data_dir} holds {held.codec} latents but {cfg.ckpt} was trained on {bundle.codec}")
    ev = _Run(cfg, sample, bundle, dev, autocast_dtype("auto", dev), held.train, Path(cfg.out_dir), plain)
    ev.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"ckpt": cfg.ckpt, "step": bundle.step, "data_dir": cfg.data_dir, "config": asdict(cfg),
                    "sample": asdict(sample), "held_out_hours": held.hours(ev.files), "plots": {}}
    t0 = time.perf_counter()
    W = bundle.model_cfg.context_chunks
    crops = validation_crops(ev.files, bundle.stats, min(96, 2 * W + 1), max_crops=64)
    val = validation_loss(bundle.model, crops, sample.context_noise, dev, autocast=lambda: autocast(dev, ev.amp))
    report["validation"] = {"loss": val["loss"], "by_t": {str(k): v for k, v in val["by_t"].items()},
                            "crops": len(crops), "definition": "next-chunk velocity MSE in the generation setting, "
                            "fixed noise, t grid " + ", ".join(map(str, val["by_t"]))}
    _continuations(ev, report)
    if cfg.rollout_chunks > 0:
        report["rollout"] = _rollout(ev, plain)
        report["plots"]["drift"] = str(_drift_png(report["rollout"], cfg, ev.out))
    curves = Path(cfg.ckpt).parent / "metrics.jsonl"
    if curves.exists() and (png := training_curves_png(curves, ev.out / "training_curves.png")):
        report["plots"]["training"] = str(png)
    report["seconds"] = time.perf_counter() - t0
    write_text_atomic(json.dumps(report, indent=1), ev.out / "eval.json")
    return report


def _continuations(ev: _Run, report: dict) -> None:
    """Continue held-out prompts; Fréchet distances and relatedness against the real continuations, memorisation,
    a latent heat-map and a spectrogram, into report."""
    cfg, files, norm = ev.cfg, ev.files, ev.norm
    P, K = cfg.prompt_chunks, cfg.continuation_chunks
    windows = pick_windows(files, cfg.prompts, P + K)
    if len(windows) < 2:
        report["continuation"] = {"skipped": f"fewer than 2 held-out windows of {P + K} chunks"}
        return
    prompts = torch.stack([files[i].latents[s:s + P] for i, s in windows])  # (N, P, 8, 64)
    real = torch.stack([files[i].latents[s + P:s + P + K] for i, s in windows])  # (N, K, 8, 64)
    cont = _continue(ev, ev.bundle, ev.sample, prompts, "continuations")  # (N, K, 8, 64)
    if cfg.teacher:
        report["teacher"] = _teacher(ev, prompts, real, cont)
    report["continuation"] = {
        "prompts": len(windows), "prompt_chunks": P, "chunks": K,
        "frechet": frechet_report(norm(cont), norm(real)),
        "frechet_definition": "fd_token: Gaussians over every 64-channel token; fd_chunk: over chunk means "
                              "of the 8 tokens; normalised latents; generated vs the real next chunks",
        "relatedness": prompt_relatedness(norm(cont), norm(prompts)),
        "relatedness_real": prompt_relatedness(norm(real), norm(prompts)),
        "spread": (spread := spread_ratio(norm(cont), norm(real))),
        "spread_verdict": SpreadBand.verdict(spread, SpreadBand().continuation),
        "spread_definition": "mean over the 64 channels of std(generated) / std(real continuations), every token "
                             f"a sample; faithful within {SpreadBand().continuation}",
        "spread_parts": spread_parts(norm(cont), norm(real)),
        "spread_parts_definition": "within: each continuation's own std over its tokens; between: the std of the "
                                   "continuations' means across prompts; each generated / real (metrics.spread_parts)",
    }
    if cfg.train_dir:
        bank = torch.cat([f.latents for f in load_latents(cfg.train_dir, val_fraction=0.0).train])
        if bank.shape[0] > 20000:  # a fixed subsample keeps the check to seconds
            bank = bank[torch.randperm(bank.shape[0], generator=torch.Generator().manual_seed(0))[:20000]]
        report["memorisation"] = memorisation(norm(cont), norm(real), norm(bank))
    else:
        report["memorisation"] = {"skipped": "pass --train-dir (the training latents) to check for copying"}
    report["plots"]["latents"] = str(latent_heatmap_png(
        norm(torch.cat([prompts[0], cont[0]])), ev.out / "latents_prompt_continuation.png",
        "prompt | continuation (normalised latents)", boundary=P))
    if cfg.audio:
        report["plots"]["spectrogram"] = _spectrogram(ev.bundle, cfg, ev.device, prompts[0], cont[0], ev.out)


def _continue(ev: _Run, bundle: Bundle, sample: SampleConfig, prompts: torch.Tensor, label: str) -> torch.Tensor:
    """Continue prompts (N, P, 8, 64) for continuation_chunks, prompt_batch prompts at a time; batch b draws its
    noise from seed + b, so another model given the same sample seed continues them from the same noise."""
    cfg, B = ev.cfg, max(1, ev.cfg.prompt_batch)
    K, batches = cfg.continuation_chunks, range(0, prompts.shape[0], B)
    out = []
    with Reporter(K * len(batches), label, plain=ev.plain) as bar:
        for b, start in enumerate(batches):
            part = prompts[start:start + B]
            gen = StreamGenerator(bundle.model, bundle.stats,
                                  replace(sample, num_samples=part.shape[0], seed=sample.seed + b), ev.device, ev.amp)
            gen.prefill(part)
            out.append(gen.generate(K, lambda i, _: bar.advance(f"{prompts.shape[0]} prompts")))
    return torch.cat(out)


def _teacher(ev: _Run, prompts: torch.Tensor, real: torch.Tensor, cont: torch.Tensor) -> dict:
    """The teacher's continuations of the same prompts from the same noise (same seed: the generators draw it in the
    same order), scored like the model's, and how far the model's first chunk lies from the teacher's."""
    cfg, dev = ev.cfg, ev.device
    teacher = load_bundle(cfg.teacher, dev)
    if teacher.codec != ev.bundle.codec:
        raise DataError(f"--teacher {cfg.teacher} was trained on {teacher.codec} latents, {cfg.ckpt} on "
                        f"{ev.bundle.codec}: they cannot continue the same prompts")
    sample = replace(ev.sample, solver=cfg.teacher_solver, nfe=cfg.teacher_nfe)
    theirs = _continue(ev, teacher, sample, prompts, "teacher")
    norm = ev.norm
    fd, fd_own = frechet_report(norm(theirs), norm(real)), frechet_report(norm(cont), norm(real))
    return {"ckpt": cfg.teacher, "solver": cfg.teacher_solver, "nfe": spent_nfe(sample.solver, sample.nfe) * (1 + (sample.cfg_scale != 1.0)),
            "frechet": fd, "spread": spread_ratio(norm(theirs), norm(real)),
            "relatedness": prompt_relatedness(norm(theirs), norm(prompts)),
            "fd_token_ratio": fd_own["fd_token"] / max(fd["fd_token"], 1e-12),
            "first_chunk_rms": float((norm(cont[:, 0]) - norm(theirs[:, 0])).pow(2).mean().sqrt()),
            "definition": "the teacher continues the same prompts from the same noise; fd_token_ratio = this "
                          "model's FD token / the teacher's; first_chunk_rms: RMS distance between the two first "
                          "continuation chunks (normalised latents; later chunks follow different pasts)"}


def _rollout(ev: _Run, plain: bool | None) -> dict:
    """Long streams from several held-out prompts at once; per-segment statistics against the held-out data."""
    cfg, files = ev.cfg, ev.files
    windows = pick_windows(files, cfg.rollout_streams, cfg.prompt_chunks, seed=1)
    prompts = (torch.stack([files[i].latents[s:s + cfg.prompt_chunks] for i, s in windows]) if windows
               else files[0].latents[None, : cfg.prompt_chunks])  # (S, P, 8, 64)
    gen = ev.generator(prompts.shape[0])
    gen.prefill(prompts)
    times = []
    with Reporter(cfg.rollout_chunks, "rollout", plain=plain, plain_every_s=5.0) as bar:
        def tick(i, _):
            times.append(time.perf_counter())
            bar.advance(f"{(i + 1) * CHUNK_SECONDS / 60:.1f} min of music x {prompts.shape[0]} streams")
        z = gen.generate(cfg.rollout_chunks, tick)  # (S, R, 8, 64)
    seg = min(cfg.segment_chunks, max(1, cfg.rollout_chunks // 4))
    drift = drift_report(ev.norm(z), [ev.norm(f.latents) for f in files], seg,
                         stream_pieces=[i for i, _ in windows] if windows else [0])
    per_chunk = torch.tensor(times).diff()
    return {"chunks": cfg.rollout_chunks, "minutes": cfg.rollout_chunks * CHUNK_SECONDS / 60, "segment_chunks": seg,
            **drift, "seconds_per_chunk_median": float(per_chunk.median()) if len(per_chunk) else None}


def _drift_png(rollout: dict, cfg: EvalConfig, out: Path) -> Path:
    """The rollout's per-segment Fréchet distance (with real held-out segments for scale), mean shift and spread."""
    segs, seg, (lo, hi) = rollout["segments"], rollout["segment_chunks"], SpreadBand().segment
    xs = [(s["start"] + seg / 2) * CHUNK_SECONDS / 60 for s in segs]
    fd_series = {"rollout segment vs held-out data": (xs, [s["fd"] for s in segs])}
    if rollout["real_segment_fd"] is not None:
        fd_series["real segments (median)"] = (xs, [rollout["real_segment_fd"]] * len(xs))
    return curves_png([("Fréchet distance", fd_series),
                       ("mean shift (data std)", {"segment": (xs, [s["mean_shift"] for s in segs])}),
                       ("spread: generated / real", {"segment": (xs, [s["spread"] for s in segs]),
                                                     f"faithful from {lo}": (xs, [lo] * len(xs)),
                                                     f"faithful to {hi}": (xs, [hi] * len(xs))})],
                      out / "rollout_drift.png", title=f"{rollout['streams']} x {cfg.rollout_chunks}-chunk rollouts: "
                      f"{'stable' if not rollout['drift'] else 'fails (see eval.json reasons)'}",
                      xlabel="minutes")


def _spectrogram(bundle: Bundle, cfg: EvalConfig, dev, prompt, cont, out: Path) -> str:
    try:
        codec = bundle.open_codec(dev, cfg.codec_ckpt, cfg.trust_codec_ckpt)
    except FlowError as exc:
        return f"skipped: {exc}"
    wave = decode_latents(codec, torch.cat([prompt, cont]), "parallel")
    cut = prompt.shape[0] * CHUNK_SAMPLES
    return str(spectrogram_png([("prompt", wave[:, :cut]), ("continuation", wave[:, cut:])],
                               out / "spectrogram_prompt_continuation.png", title=f"{bundle.codec} decode"))


def summary(report: dict) -> list[str]:
    """The headline figures, for the terminal."""
    v = report["validation"]
    lines = [f"validation loss {v['loss']:.4f} over {v['crops']} crops ({report['held_out_hours'] * 60:.1f} min held out)"]
    c = report.get("continuation", {})
    if "frechet" in c:
        f, r, rr = c["frechet"], c["relatedness"], c["relatedness_real"]
        parts = c["spread_parts"]
        band = SpreadBand().continuation
        lines.append(f"continuations: spread {SpreadBand.show(c['spread'], band)}x the real ones "
                     f"({c['spread_verdict']}; faithful {band[0]}-{band[1]}; within a continuation "
                     f"{parts['within']:.2f}x, between prompts {parts['between']:.2f}x); FD token {f['fd_token']:.3f}, "
                     f"FD chunk {f['fd_chunk']:.3f}; prompt relatedness ratio {r['ratio']:.2f} (real continuations "
                     f"{rr['ratio']:.2f}; below 1 = follows its prompt)")
    elif c:
        lines.append(f"continuations: {c['skipped']}")
    if "teacher" in report:
        te = report["teacher"]
        lines.append(f"teacher {te['ckpt']} ({te['solver']}, NFE {te['nfe']}) on the same prompts and noise: FD token "
                     f"{te['frechet']['fd_token']:.3f} (this model's is {te['fd_token_ratio']:.2f}x), spread "
                     f"{te['spread']:.2f}x, relatedness {te['relatedness']['ratio']:.2f}; first chunks "
                     f"{te['first_chunk_rms']:.3f} apart (RMS)")
    m = report.get("memorisation", {})
    if m.get("held_out_in_train"):
        lines.append("memorisation: not meaningful: the held-out chunks are themselves in --train-dir")
    else:
        lines.append(f"memorisation: NN ratio {m['nn_ratio']:.2f} (below 1 = closer to the training set than new "
                     f"music is), copied {100 * m['copied_fraction']:.1f}%" if "nn_ratio" in m
                     else f"memorisation: {m.get('skipped', 'n/a')}")
    if "rollout" in report:
        ro = report["rollout"]
        base = ro.get("real_segment_fd")
        lines.append(f"rollout of {ro['streams']} x {ro['chunks']} chunks ({ro['minutes']:.1f} min): {ro['verdict']}; spread "
                     f"{ro['spread_min']:.2f}-{ro['spread_max']:.2f}x real music's; segment FD "
                     f"{ro['segments'][0]['fd']:.1f} -> {ro['segments'][-1]['fd']:.1f}"
                     + (f" (real held-out segments: {base:.1f})" if base is not None else "")
                     + _growth(ro) if ro["segments"] else
                     f"rollout of {ro['chunks']} chunks: {ro['verdict']}")
    lines += [f"plot: {p}" for p in report["plots"].values()]
    return lines


def _growth(ro: dict) -> str:
    """The rollout's FD growth figures for the summary line, each with its interval over streams where known."""
    iv = ro.get("growth_intervals") or {}

    def figure(name: str, value: float) -> str:
        span = iv.get(f"{name}_interval")
        return f"{value:.2f}x" + (f" ({span[0]:.2f}-{span[1]:.2f})" if span else "")
    if ro.get("fd_growth") is None:
        return ""
    text = f"; FD growth last / first segment {figure('fd_growth', ro['fd_growth'])}"
    if ro.get("fd_growth_quarters") is not None:
        text += f", last / first quarter {figure('fd_growth_quarters', ro['fd_growth_quarters'])}"
    return text + (f" ({100 * iv['interval_level']:.0f} % intervals over streams)" if iv else "")
