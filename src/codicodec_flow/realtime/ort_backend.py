"""The onnxruntime backend: the graphs `export --format onnx` writes, run with the same solvers, controls and noise.

`OrtModel` holds the three sessions and one stream's cache (numpy arrays, the layout of export.py) and stands in
for the generator's KVCache (it answers `n`, `window`, `set_active`, `reset` and `rewind` the same way; each
append returns new arrays, so rewinding is handing back the ones from before, kept for `keep_history`
appends). The generators
below swap only what touches the model: the velocity (with classifier-free guidance as the unconditional
branch, context 0), appending a finished chunk, and the modulations kept per time value. Prefill appends the
prompt's chunks one by one. onnxruntime runs on the CPU (its CPUExecutionProvider) with torch's thread count.
"""
from __future__ import annotations

import json
import logging
import tempfile
from collections import deque
from pathlib import Path

import numpy as np
import torch

from ..config import ModelConfig, config_from_dict
from ..errors import FlowError
from ..export import DESCRIPTION, cache_shape, export_onnx, weights_digest
from ..generate import StreamGenerator
from ..latents import LatentStats
from ..model import FlowDiT
from ..solvers import time_value
from .generator import LiveGenerator

log = logging.getLogger(__name__)
BACKENDS = ("torch", "onnxruntime")


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise FlowError("--backend onnxruntime needs the onnxruntime package: pip install -e '.[export]'") from None
    return onnxruntime


def read_description(folder: str | Path) -> dict:
    """export.json of an ONNX export folder; FlowError naming the folder if it is not one."""
    path = Path(folder) / DESCRIPTION
    try:
        desc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FlowError(f"{folder}: not an ONNX export of codicodec-flow ({path.name}: {exc}); "
                        f"write one with `codicodec-flow export --format onnx --out {folder}`") from None
    if not isinstance(desc, dict) or desc.get("format") != "onnx" or not isinstance(desc.get("model"), dict):
        raise FlowError(f"{path}: not the description of an ONNX export (format {desc.get('format')!r}); "
                        f"write one with `codicodec-flow export --format onnx`")
    return desc


class OrtModel:
    """The exported step, append and conditioning graphs in onnxruntime, with one stream's cache."""

    def __init__(self, folder: str | Path, threads: int | None = None):
        ort = _ort()
        folder = Path(folder)
        desc = read_description(folder)
        self.description = desc
        self.cfg = config_from_dict(ModelConfig, desc["model"])
        self.stats = LatentStats.from_json(desc["stats"])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # errors only
        try:
            self.sessions = {g: ort.InferenceSession(str(folder / f), opts, providers=["CPUExecutionProvider"])
                             for g, f in desc["graphs"].items()}
        except Exception as exc:  # onnxruntime raises its own types for missing or broken files
            raise FlowError(f"{folder}: onnxruntime cannot load the export ({str(exc).splitlines()[0][:200]}); "
                            f"export it again with `codicodec-flow export --format onnx`") from None
        self.window = self.cfg.context_chunks
        self.active: int | None = None
        self._history: deque = deque(maxlen=0)  # (keys, keys_rot, values) from before each of the last appends
        self.reset()

    def reset(self) -> None:
        """Forget the past: a zero cache (hidden by the mask until written) and n = 0."""
        shape = cache_shape(self.cfg)
        self.keys, self.keys_rot, self.values = (np.zeros(shape, np.float32) for _ in range(3))
        self.n = 0
        self._history.clear()

    @property
    def spare(self) -> int:
        """How many appends `rewind` can take back at most (KVCache.spare's meaning)."""
        return self._history.maxlen

    def keep_history(self, chunks: int) -> None:
        """Keep the arrays from before the last `chunks` appends (references, not copies), so they can be rewound."""
        if chunks != self._history.maxlen:
            self._history = deque(self._history, maxlen=chunks)

    def rewind(self, r: int) -> None:
        """Take back the last r appends (at most the history kept): as if they had never been made."""
        if not 0 <= r <= len(self._history):
            raise ValueError(f"can rewind 0..{len(self._history)} chunks here, not {r}")
        for _ in range(r):
            self.keys, self.keys_rot, self.values = self._history.pop()
        self.n -= r

    def set_active(self, chunks: int | None) -> None:
        """Attend to only the last `chunks` chunks (1..W); None restores W (as KVCache.set_active)."""
        if chunks is not None and not 1 <= chunks <= self.window:
            raise ValueError(f"context must be 1..{self.window} chunks, got {chunks}")
        self.active = None if chunks == self.window else chunks

    def _counts(self, use_context: bool = True) -> dict[str, np.ndarray]:
        seen = (self.active or self.window) if use_context else 0
        return {"n": np.array([self.n], np.int64), "context": np.array([seen], np.int64)}

    def conditioning(self, t: np.ndarray, own: bool = False) -> np.ndarray:
        """Times (1, 8) -> the modulations (1, 8, M) that step and append take; `own` marks a context chunk the model
        made itself (graphs of a model with the own-chunk mark take it, others have no such input)."""
        t = np.asarray(t, np.float32)
        feeds = {"t": t, **({"own": np.full_like(t, float(own))} if self.cfg.mark_own else {})}
        return self.sessions["conditioning"].run(None, feeds)[0]

    def velocity(self, x: np.ndarray, mods: np.ndarray, use_context: bool = True) -> np.ndarray:
        """v for a chunk x (1, 8, 64) against the cache, which is only read; use_context=False ignores the past."""
        feeds = {"x": np.asarray(x, np.float32), "mods": mods, "keys_rot": self.keys_rot, "values": self.values,
                 **self._counts(use_context)}
        return self.sessions["step"].run(None, feeds)[0]

    def append(self, x: np.ndarray, mods: np.ndarray) -> None:
        """Run a finished chunk x (1, 8, 64) into the cache as the newest context."""
        feeds = {"x": np.asarray(x, np.float32), "mods": mods, "keys": self.keys, "keys_rot": self.keys_rot,
                 "values": self.values, **self._counts()}
        before = (self.keys, self.keys_rot, self.values)
        self.keys, self.keys_rot, self.values = self.sessions["append"].run(None, feeds)
        if self._history.maxlen:
            self._history.append(before)
        self.n += 1


class OrtBackend:
    """What a StreamGenerator does with its model, done by an OrtModel instead (mixed in before the generator)."""

    def __init__(self, model: FlowDiT, stats: LatentStats, cfg, ort_model: OrtModel):
        if cfg.num_samples != 1:
            raise FlowError(f"the onnxruntime backend generates one stream at a time, not {cfg.num_samples}")
        if cfg.precision != "fp32":
            raise FlowError(f"the onnxruntime backend runs the float32 export; --precision {cfg.precision} applies to "
                            f"--backend torch")
        if ort_model.cfg != model.cfg:
            raise FlowError("the ONNX export was made from another model (its export.json model config differs "
                            "from the checkpoint's); export this checkpoint again")
        super().__init__(model, stats, cfg, "cpu", pack=False)  # onnxruntime runs the products, not torch
        ort_model.reset()  # a new generator starts a new stream
        ort_model.set_active(None)
        self.ort = self.cache = ort_model  # the KVCache's place: configure() sets its context the same way

    def _conditioning(self, t: float, own: bool) -> np.ndarray:
        return self.ort.conditioning(np.full((self.batch, self.tokens), t, np.float32), own)

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        mods = self.modulations(time_value(t))  # solvers give the whole chunk one time
        xn = x.float().cpu().numpy()
        v = torch.from_numpy(self.ort.velocity(xn, mods))
        if self.cfg.cfg_scale != 1.0:  # the unconditional branch: the same step with context 0
            v_u = torch.from_numpy(self.ort.velocity(xn, mods, use_context=False))
            v = v_u + self.cfg.cfg_scale * (v - v_u)
        return v

    def _append(self, ctx: torch.Tensor, s: float, mark: bool) -> None:
        """A context chunk (1, 8, 64) re-noised to level s (under the own-chunk mark) into the cache at once (the
        graphs have no joined pass)."""
        self.ort.append(ctx.float().cpu().numpy(), self.modulations(s, mark))

    def _append_many(self, ctx: torch.Tensor, s: float) -> None:
        for k in range(ctx.shape[1]):  # (B, n, 8, 64): prefill is one append per chunk, of real music
            self._append(ctx[:, k], s, False)

    def reserve_rewind(self, chunks: int) -> None:
        """Keep the cache arrays of the last `chunks` appends, so they can be taken back (appends are not joined)."""
        self.ort.keep_history(max(chunks, self.ort.spare))


class OrtStreamGenerator(OrtBackend, StreamGenerator):
    """StreamGenerator on onnxruntime: OrtStreamGenerator(model, stats, cfg, ort_model)."""


class OrtLiveGenerator(OrtBackend, LiveGenerator):
    """LiveGenerator (controls, seed crossfades, steering, live input) on onnxruntime."""


def load_onnx(model: FlowDiT, stats: LatentStats, folder: str | Path | None = None,
              threads: int | None = None) -> OrtModel:
    """An OrtModel of `model`: from an export folder (checked against the model and its statistics), or exported
    now into a temporary folder (removed once onnxruntime has read it)."""
    _ort()
    if folder is not None:
        ort_model = OrtModel(folder, threads)
        same = (ort_model.cfg == model.cfg and torch.equal(ort_model.stats.mean, stats.mean)
                and torch.equal(ort_model.stats.std, stats.std)
                and ort_model.description.get("weights_sha256") == weights_digest(model))
        if not same:
            raise FlowError(f"{folder}: this export was made from another checkpoint (its weights, model config or "
                            f"latent statistics differ); export this one with `codicodec-flow export --format onnx "
                            f"--out DIR`, or leave --onnx out to export at start-up")
        return ort_model
    with tempfile.TemporaryDirectory(prefix="codicodec-flow-onnx-") as tmp:
        log.info("exporting the model to ONNX for onnxruntime (seconds; `export --format onnx` once and --onnx DIR "
                 "skips this)")
        export_onnx(model, stats, tmp)
        return OrtModel(tmp, threads)


CHECK_TOLERANCE = 1e-3  # a larger velocity difference means a broken export, not float rounding


def check_against_torch(model: FlowDiT, ort_model: OrtModel, chunks: int | None = None, seed: int = 0) -> float:
    """Largest |v_onnxruntime - v_torch| over `chunks` chunks (default W + 2: past the window) of random noisy
    chunks at random times, each followed by a random context chunk appended on both sides; FlowError above
    CHECK_TOLERANCE. `model` is a float32 CPU FlowDiT; the OrtModel is reset before and after."""
    cfg = model.cfg
    T, D = cfg.chunk_tokens, cfg.latent_dim
    g = torch.Generator().manual_seed(seed)
    cache = model.new_cache(1, "cpu", torch.float32)
    ort_model.reset()
    worst = 0.0
    with torch.inference_mode():
        for k in range(cfg.context_chunks + 2 if chunks is None else chunks):
            x, t = torch.randn(1, T, D, generator=g), torch.full((1, T), float(torch.rand(1, generator=g)))
            v = model.forward_cached(x, t, cache)
            v_ort = ort_model.velocity(x.numpy(), ort_model.conditioning(t.numpy()))
            worst = max(worst, float((v - torch.from_numpy(v_ort)).abs().max()))
            ctx, s, own = torch.randn(1, T, D, generator=g), torch.full((1, T), 0.02), k % 2 == 1  # real, own, ...
            model.append_context(ctx, s, cache, mods=model.conditioning(s, torch.full((1, T), own)))
            ort_model.append(ctx.numpy(), ort_model.conditioning(s.numpy(), own))
    ort_model.reset()
    if not worst <= CHECK_TOLERANCE:
        raise FlowError(f"the ONNX graphs give velocities up to {worst:.2e} away from PyTorch's (more than "
                        f"{CHECK_TOLERANCE:g}): this export is broken; please report it with your torch, onnx and "
                        f"onnxruntime versions")
    return worst
