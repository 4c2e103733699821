"""Export: the streaming model as pure tensor functions with the cache as explicit inputs and outputs, for ONNX
(onnxruntime) and Core ML.

Three graphs, each a plain function of tensors (static shapes, batch B = 1, no Python value read from a tensor):

    conditioning(t (B, 8)[, own (B, 8)])                     -> mods (B, 8, M)    adaLN modulations, once per time
    step(x (B, 8, 64), mods, keys_rot, values, n, context)   -> velocity (B, 8, 64)      the ODE's v; cache only read
    append(x, mods, keys, keys_rot, values, n, context)      -> keys', keys_rot', values'    a finished chunk in

M = n_layers * 6 * dim + 2 * dim (every block's modulations, then the head's). A model with the own-chunk mark has
the second input of conditioning, `own`: 1 for a context chunk the model made itself, 0 for real music and for the
chunk being generated. The cache is three tensors of shape
(n_layers, B, heads, W * 8, head_dim), kept as a sliding window rather than KVCache's ring: window chunk c
(0 oldest .. W - 1 newest) is the chunk appended W - c chunks ago. `keys` are projected keys (not rotated),
`keys_rot` the same keys rotated to window-relative positions c * 8 + j, `values` the values; the chunk being
evaluated sits at W * 8 + j. KVCache rotates keys at absolute positions (chunk m at m * 8 + j, float64 tables made
on the host per chunk); rotary attention depends only on offsets, and every offset here is the same, so the two
compute the same function. Here every position is below (W + 1) * 8 whatever n is: the rotary tables are constants
of the graph, and no position, index or angle grows with the stream. `append` shifts the window by one chunk (the
oldest leaves, the new one enters at c = W - 1) and rotates the unrotated keys afresh, so no rotation accumulates.
n (int64, (1,)) counts the chunks appended so far and context (int64, (1,)) is how many past chunks may be seen
(1..W; 0: none, the unconditional branch of classifier-free guidance): chunk c is seen iff W - c <= min(n, context).
Prefill is `append` once per prompt chunk into an empty (zero) cache: FlowDiT.prefill computes the same keys and
values in one masked pass (each chunk sees the ones before it; the cache holds nothing older).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .config import ModelConfig
from .errors import FlowError
from .latents import LatentStats
from .model import FlowDiT
from .rope import apply_rope, rope_table
from .util.fsutil import atomic_path, write_text_atomic

log = logging.getLogger(__name__)

GRAPHS = ("conditioning", "step", "append")
DESCRIPTION = "export.json"  # beside the graphs: inputs, outputs, shapes, model config, latent statistics
OPSET = 18


def mods_width(cfg: ModelConfig) -> int:
    """M: the widths of every block's adaLN modulations (6 * dim) and the head's (2 * dim), concatenated."""
    return cfg.n_layers * 6 * cfg.dim + 2 * cfg.dim


def cache_shape(cfg: ModelConfig, batch: int = 1) -> tuple[int, ...]:
    """(n_layers, B, heads, W * 8, head_dim): each of keys, keys_rot and values."""
    return (cfg.n_layers, batch, cfg.n_heads, cfg.context_chunks * cfg.chunk_tokens, cfg.dim // cfg.n_heads)


def empty_cache(cfg: ModelConfig, batch: int = 1) -> dict[str, torch.Tensor]:
    """The cache of a stream before its first chunk: zeros, hidden by the masks until written."""
    return {name: torch.zeros(cache_shape(cfg, batch)) for name in ("keys", "keys_rot", "values")}


class Conditioning(nn.Module):
    """t (B, 8)[, own (B, 8)] -> mods (B, 8, M): FlowDiT.conditioning, concatenated."""

    def __init__(self, model: FlowDiT):
        super().__init__()
        self.model = model

    def forward(self, t: torch.Tensor, own: torch.Tensor | None = None) -> torch.Tensor:
        return torch.cat(self.model.conditioning(t, own), dim=-1)  # (B, 8, M)


class _Cached(nn.Module):
    """What step and append share: the blocks over one chunk against the window, the mask from n and context."""

    def __init__(self, model: FlowDiT):
        super().__init__()
        cfg = model.cfg
        self.model, self.W, self.T = model, cfg.context_chunks, cfg.chunk_tokens
        self.widths = [6 * cfg.dim] * cfg.n_layers + [2 * cfg.dim]
        cos, sin = rope_table(torch.arange((self.W + 1) * self.T), cfg.dim // cfg.n_heads, cfg.rope_base)
        self.register_buffer("cos", cos, persistent=False)  # ((W + 1) * 8, hd/2), the same table as KVCache's
        self.register_buffer("sin", sin, persistent=False)
        self.register_buffer("chunk", torch.arange(self.W), persistent=False)  # (W,) window chunk index c

    def mask(self, n: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """(1, 1, 1, (W + 1) * 8): window chunk c is seen iff W - c <= min(n, context); the chunk itself always."""
        seen = torch.minimum(n, context)  # (1,)
        ctx = (self.W - self.chunk) <= seen  # (W,)
        ctx = ctx[:, None].expand(self.W, self.T).reshape(self.W * self.T)  # (W * 8,)
        own = torch.ones(self.T, dtype=torch.bool, device=ctx.device)
        return torch.cat([ctx, own])[None, None, None]  # (1, 1, 1, (W + 1) * 8)

    def blocks(self, x, mods, keys_rot, values, n, context):
        """Run the chunk through every block; returns the last hidden state (B, 8, D) and the chunk's keys
        (unrotated) and values, each (n_layers, B, H, 8, hd)."""
        m = self.model
        mods = torch.split(mods, self.widths, dim=-1)  # per block (B, 8, 6D), then the head's (B, 8, 2D)
        mask = self.mask(n, context)
        rope = (self.cos[self.W * self.T:], self.sin[self.W * self.T:])  # (8, hd/2): positions W * 8 + j
        h = m.proj_in(x)  # (B, 8, D)
        new_k, new_v = [], []
        for i, block in enumerate(m.blocks):
            def attend(q, k, v, i=i):
                new_k.append(k)
                new_v.append(v)
                keys = torch.cat([keys_rot[i], apply_rope(k, *rope)], dim=2)  # (B, H, (W + 1) * 8, hd)
                vals = torch.cat([values[i], v], dim=2)
                return m.blocks[i].attn.attend(q, keys, vals, mask)
            h = block(h, mods[i], rope, attend)
        return h, mods[-1], torch.stack(new_k), torch.stack(new_v)


class Step(_Cached):
    """velocity(x, mods, keys_rot, values, n, context) for one chunk: FlowDiT.forward_cached as a pure function."""

    def forward(self, x, mods, keys_rot, values, n, context):
        h, head, _, _ = self.blocks(x, mods, keys_rot, values, n, context)
        return self.model._head(h, head)  # (B, 8, 64)


class Append(_Cached):
    """(keys, keys_rot, values) after a finished chunk x joins the window: FlowDiT.append_context as a pure function."""

    def forward(self, x, mods, keys, keys_rot, values, n, context):
        _, _, k, v = self.blocks(x, mods, keys_rot, values, n, context)
        R = self.W * self.T
        keys = torch.cat([keys[:, :, :, self.T:], k], dim=3)  # (L, B, H, W * 8, hd): the oldest chunk leaves
        values = torch.cat([values[:, :, :, self.T:], v], dim=3)
        rotated = torch.stack([apply_rope(k, self.cos[:R], self.sin[:R]) for k in keys.unbind(0)])  # per layer: rank <= 5
        return keys, rotated, values  # keys rotated afresh to positions c * 8 + j (Core ML allows rank 5 at most)


# ---------------------------------------------------------------------------------------------- signatures

def signatures(cfg: ModelConfig, batch: int = 1, ints: str = "int64") -> dict[str, dict]:
    """Every graph's inputs and outputs: name -> (shape, dtype), in call order (`ints`: Core ML's are int32)."""
    T, D = cfg.chunk_tokens, cfg.latent_dim
    cache = (list(cache_shape(cfg, batch)), "float32")
    x, mods, count = ([batch, T, D], "float32"), ([batch, T, mods_width(cfg)], "float32"), ([1], ints)
    times = {"t": ([batch, T], "float32"), **({"own": ([batch, T], "float32")} if cfg.mark_own else {})}
    return {
        "conditioning": {"inputs": times, "outputs": {"mods": mods}},
        "step": {"inputs": {"x": x, "mods": mods, "keys_rot": cache, "values": cache, "n": count, "context": count},
                 "outputs": {"velocity": x}},
        "append": {"inputs": {"x": x, "mods": mods, "keys": cache, "keys_rot": cache, "values": cache, "n": count,
                              "context": count},
                   "outputs": {"keys_out": cache, "keys_rot_out": cache, "values_out": cache}},
    }


def example_inputs(cfg: ModelConfig, graph: str) -> tuple[torch.Tensor, ...]:
    """Inputs of the right shapes for tracing `graph` (n = context = W)."""
    out = []
    for name, (shape, dtype) in signatures(cfg)[graph]["inputs"].items():
        if dtype == "int64":
            out.append(torch.full(shape, cfg.context_chunks, dtype=torch.int64))
        elif name == "t":
            out.append(torch.full(shape, 0.5))
        elif name == "own":
            out.append(torch.ones(shape))
        else:
            out.append(0.1 * torch.randn(shape, generator=torch.Generator().manual_seed(len(out))))
    return tuple(out)


def modules(model: FlowDiT) -> dict[str, nn.Module]:
    """The three graphs as modules over a float32 CPU copy of `model` (the model itself is left as it is)."""
    m = FlowDiT(model.cfg)
    m.load_state_dict(model.state_dict())
    m = m.float().cpu().eval().requires_grad_(False)
    return {"conditioning": Conditioning(m).eval(), "step": Step(m).eval(), "append": Append(m).eval()}


def weights_digest(model: FlowDiT) -> str:
    """sha256 of the weights (float32, state_dict order): tells which weights an export was made from."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def describe(model: FlowDiT, stats: LatentStats, fmt: str, extra: dict | None = None) -> dict:
    """What export.json says beside the graphs: files, signatures, conventions, model config, latent statistics."""
    cfg = model.cfg
    ints = "int32" if fmt == "coreml" else "int64"
    suffix = ".mlpackage" if fmt == "coreml" else ".onnx"
    return {"format": fmt, "graphs": {g: g + suffix for g in GRAPHS},
            "signatures": {g: {side: {k: {"shape": s, "dtype": d} for k, (s, d) in ports.items()}
                               for side, ports in sig.items()} for g, sig in signatures(cfg, ints=ints).items()},
            "model": asdict(cfg), "stats": stats.to_json(), "weights_sha256": weights_digest(model), "batch": 1,
            "cache": "keys, keys_rot, values: (n_layers, batch, heads, W * 8, head_dim); window chunk c (0 oldest) "
                     "was appended W - c chunks ago; keys not rotated, keys_rot rotated to positions c * 8 + j; "
                     "the chunk being evaluated sits at W * 8 + j; zeros before the first chunk",
            "counts": "n: chunks appended so far; context: past chunks seen, 1..W (0: none, the unconditional "
                      "branch of guidance); chunk c is seen iff W - c <= min(n, context)",
            "mods": "conditioning(t) for the chunk's times, passed to step and append; it depends on t alone"
                    + (" and own: 1 for context chunks the model made itself" if cfg.mark_own else ""),
            "time": "x_t = (1 - t) x + t eps, t = 1 noise, t = 0 data; velocity = eps - x; times per token",
            "latents": "the graphs work on normalised latents (z - stats.mean) / stats.std",
            "prefill": "append once per prompt chunk, oldest first, from the zero cache with n = 0, 1, ...",
            "torch": torch.__version__, **(extra or {})}


@contextlib.contextmanager
def _quiet(*loggers: str):
    """Silence other libraries' chatter (warnings, notes about packages we do not use) for the block."""
    saved = [(logging.getLogger(name), logging.getLogger(name).level) for name in loggers]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def _need(*packages: str, what: str) -> None:
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise FlowError(f"{what} needs the {' and '.join(missing)} package{'s' * (len(missing) > 1)}: "
                        f"pip install -e '.[export]'")


# ---------------------------------------------------------------------------------------------- ONNX

def export_onnx(model: FlowDiT, stats: LatentStats, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write conditioning.onnx, step.onnx, append.onnx and export.json into out_dir (each atomically); returns it."""
    _need("onnx", "onnxscript", what="export --format onnx")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sig = signatures(model.cfg)
    for name, module in modules(model).items():
        with _quiet("torch.onnx", "onnxscript"), atomic_path(out / f"{name}.onnx") as tmp:
            program = torch.onnx.export(module, example_inputs(model.cfg, name), dynamo=True, opset_version=OPSET,
                                        input_names=list(sig[name]["inputs"]), output_names=list(sig[name]["outputs"]),
                                        external_data=False, verbose=False)
            program.save(str(tmp), external_data=False)
        log.debug(f"wrote {out / name}.onnx")
    write_text_atomic(json.dumps(describe(model, stats, "onnx", {"opset": OPSET, **(extra or {})}), indent=1),
                      out / DESCRIPTION)
    return out


# ---------------------------------------------------------------------------------------------- Core ML

def _coremltools():
    """coremltools, quietly imported, taught the one operator of ours it does not convert (aten::addcmul)."""
    _need("coremltools", what="export --format coreml")
    with _quiet("coremltools", "torch"), contextlib.redirect_stderr(io.StringIO()):  # notes on parts we do not use
        import coremltools as ct
        from coremltools.converters.mil import Builder as mb
        from coremltools.converters.mil.frontend.torch import register_torch_op

    def addcmul(context, node):  # x + value * a * b
        x, a, b = (context[name] for name in node.inputs[:3])
        product = mb.mul(x=a, y=b)
        if len(node.inputs) > 3:
            value = context[node.inputs[3]]
            if value.val is None or float(value.val) != 1.0:
                product = mb.mul(x=product, y=value)
        context.add(mb.add(x=x, y=product, name=node.name))

    try:
        register_torch_op(addcmul)
    except ValueError:  # registered already: by an earlier export, or by a coremltools that converts it itself
        pass
    return ct


def export_coreml(model: FlowDiT, stats: LatentStats, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write conditioning.mlpackage, step.mlpackage, append.mlpackage (ML programs, float32, macOS 13 or later) and
    export.json into out_dir; each package appears whole or not at all. Converting runs anywhere; predicting needs
    macOS."""
    ct = _coremltools()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sig = signatures(model.cfg, ints="int32")
    for name, module in modules(model).items():
        args = example_inputs(model.cfg, name)
        inputs = [ct.TensorType(name=k, shape=s, dtype=np.int32 if d == "int32" else np.float32)
                  for k, (s, d) in sig[name]["inputs"].items()]
        with _quiet("coremltools", "torch"), torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):  # progress bars
            traced = torch.jit.trace(module, args)
            mlmodel = ct.convert(traced, inputs=inputs, outputs=[ct.TensorType(name=k) for k in sig[name]["outputs"]],
                                 convert_to="mlprogram", compute_precision=ct.precision.FLOAT32,
                                 minimum_deployment_target=ct.target.macOS13)
        _save_package(mlmodel, out / f"{name}.mlpackage")
        log.debug(f"wrote {out / name}.mlpackage")
    write_text_atomic(json.dumps(describe(model, stats, "coreml", extra), indent=1), out / DESCRIPTION)
    return out


def _save_package(mlmodel, path: Path) -> None:
    """Save an .mlpackage (a folder) beside its place and rename it there, replacing an older one."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    old = path.parent / f".{path.name}.old"
    try:
        mlmodel.save(str(tmp / path.name))
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
