"""`codicodec-flow export`: a checkpoint's streaming step as ONNX (checked in onnxruntime) or Core ML graphs."""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from ..checkpoint import load_bundle
from ..errors import FlowError
from ..export import DESCRIPTION, GRAPHS, export_coreml, export_onnx

FORMATS = ("onnx", "coreml")


def register(sub) -> None:
    p = sub.add_parser("export", help="the streaming step as ONNX (onnxruntime) or Core ML graphs",
                       description="Write the model's cached one-chunk step, its cache append and its time "
                                   "conditioning as graphs with the cache as explicit inputs and outputs, plus "
                                   f"{DESCRIPTION} describing them. Needs pip install -e '.[export]'.")
    p.add_argument("--ckpt", required=True, help="ema.pt (or last.pt) from train")
    p.add_argument("--format", default="onnx", choices=FORMATS,
                   help="onnx: for onnxruntime (realtime --backend onnxruntime --onnx DIR); coreml: ML programs for "
                        "Apple devices (converted here, predicted on macOS only). Default onnx")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write into (created if missing)")
    p.add_argument("--no-check", action="store_true",
                   help="onnx: skip the check that onnxruntime gives PyTorch's velocities on a few random chunks")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise FlowError(f"--out {out} is a file; give a folder to write the graphs into")
    bundle = load_bundle(a.ckpt, "cpu")
    extra = {"checkpoint": str(Path(a.ckpt).resolve()), "step": bundle.step,
             "codec": {"name": bundle.codec, "version": bundle.codec_version}}
    print(f"export: {a.ckpt} (step {bundle.step}, {bundle.model.num_params() / 1e6:.1f} M parameters) as {a.format} "
          f"into {out}", flush=True)
    if a.format == "onnx":
        export_onnx(bundle.model, bundle.stats, out, extra)
        files = [out / f"{g}.onnx" for g in GRAPHS]
    else:
        export_coreml(bundle.model, bundle.stats, out, extra)
        files = [out / f"{g}.mlpackage" for g in GRAPHS]
    for f in files:
        print(f"wrote {f} ({_size_mb(f):.1f} MB)")
    print(f"wrote {out / DESCRIPTION}")
    if a.format == "onnx" and not a.no_check:
        if importlib.util.find_spec("onnxruntime") is None:
            print("note: onnxruntime is not installed, so the export was not checked (pip install -e '.[export]')")
        else:
            from ..realtime.ort_backend import OrtModel, check_against_torch
            err = check_against_torch(bundle.model, OrtModel(out))
            print(f"checked in onnxruntime against PyTorch over {bundle.model_cfg.context_chunks + 2} chunks "
                  f"(past the window): largest velocity difference {err:.1e}")
    if a.format == "coreml":
        print("note: Core ML predictions run on macOS only; the packages were converted, not run, here")
    return 0


def _size_mb(path: Path) -> float:
    files = path.rglob("*") if path.is_dir() else [path]
    return sum(f.stat().st_size for f in files if f.is_file()) / 2**20
