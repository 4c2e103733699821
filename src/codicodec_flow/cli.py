"""Command line: argparse sub-commands, thin: parse, build a config, call one function."""
from __future__ import annotations

import argparse
import sys
import time

from .codec import CODEC_NAMES
from .devices import DEVICE_CHOICES
from .errors import FlowError


def _common_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES,
                   help="compute device (auto: cuda, else mps, else cpu)")


def _common_codec(p: argparse.ArgumentParser, default: str = "codicodec") -> None:
    p.add_argument("--codec", default=default, choices=CODEC_NAMES,
                   help="codicodec: the real CoDiCodec (needs its weights); spectral: built-in offline stand-in")
    p.add_argument("--codec-ckpt", default=None, metavar="PATH",
                   help="CoDiCodec weights file (else $CODICODEC_CKPT, else the package's first-use download)")
    p.add_argument("--trust-codec-ckpt", action="store_true",
                   help="allow full unpickling of --codec-ckpt (only for a file you trust, e.g. the official one)")


def _add_preprocess(sub) -> None:
    p = sub.add_parser("preprocess", help="encode a folder of audio into latent shards",
                       description="Encode every audio file below --in-dir into latent shards under --out-dir.")
    p.add_argument("--in-dir", required=True, help="folder of audio (searched recursively)")
    p.add_argument("--out-dir", required=True, help="folder for shards, manifest.json and statistics")
    _common_codec(p)
    _common_device(p)
    p.add_argument("--max-seconds", type=float, default=300.0, help="split longer files into shards of this length")
    p.add_argument("--overwrite", action="store_true", help="re-encode files whose shards are up to date")
    p.add_argument("--num-shards", type=int, default=1, help="split the file list into K parts (parallel workers)")
    p.add_argument("--shard-index", type=int, default=0, help="which part this process encodes (0-based)")
    p.add_argument("--finalize", action="store_true",
                   help="only rebuild manifest.json and statistics from the shards in --out-dir")
    p.set_defaults(func=_cmd_preprocess)


def _cmd_preprocess(a: argparse.Namespace) -> int:
    from .config import PreprocessConfig
    from .preprocess import finalize, preprocess_main, summary_lines
    cfg = PreprocessConfig(in_dir=a.in_dir, out_dir=a.out_dir, codec=a.codec, codec_ckpt=a.codec_ckpt,
                           trust_codec_ckpt=a.trust_codec_ckpt,
                           device=a.device, max_seconds=a.max_seconds, overwrite=a.overwrite,
                           num_shards=a.num_shards, shard_index=a.shard_index)
    if a.finalize:
        m = finalize(a.out_dir, cfg)
        print(f"manifest: {len(m['shards'])} shard(s), {m['hours']:.2f} h usable, codec {m['codec']} {m['codec_version']}")
        return 0
    t0 = time.perf_counter()
    report = preprocess_main(cfg)
    for line in summary_lines(report, time.perf_counter() - t0):
        print(line)
    if cfg.num_shards > 1:
        print(f"part {cfg.shard_index + 1}/{cfg.num_shards} done; when every part has finished run "
              f"`codicodec-flow preprocess --finalize --in-dir {cfg.in_dir} --out-dir {cfg.out_dir}`")
    if not report.ok:
        print("error: no file could be encoded", file=sys.stderr)
        return 1
    return 0


def _add_smoke(sub) -> None:
    p = sub.add_parser("smoke-test", help="check device, dtypes and codec wiring on this machine")
    _common_device(p)
    _common_codec(p, default="spectral")
    p.set_defaults(func=_cmd_smoke)


def _cmd_smoke(a: argparse.Namespace) -> int:
    from .smoke import print_checks, run_smoke
    checks = run_smoke(a.device, a.codec, a.codec_ckpt, a.trust_codec_ckpt)
    print_checks(checks)
    return 0 if all(c.ok for c in checks) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="codicodec-flow",
                                     description="Streaming music continuation in CoDiCodec's latent space.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_preprocess, _add_smoke):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FlowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
