"""`codicodec-flow preprocess`: encode a folder of audio into latent shards."""
from __future__ import annotations

import argparse
import sys
import time

from ..config import PreprocessConfig
from ..data.preprocess import finalize, preprocess_main, summary_lines
from ..data.shards import STORAGES, convert_folder
from ..errors import FlowError
from .flags import add_codec, add_device, finite_float


def register(sub) -> None:
    d = PreprocessConfig("", "")
    p = sub.add_parser("preprocess", help="encode a folder of audio into latent shards",
                       description="Encode every audio file below --in-dir into latent shards under --out-dir.")
    p.add_argument("--in-dir", help="folder of audio (searched recursively); not needed with --finalize or --convert")
    p.add_argument("--out-dir", required=True, help="folder for shards, manifest.json and statistics")
    add_codec(p, d.codec)
    add_device(p, d.device)
    p.add_argument("--max-seconds", type=finite_float, default=d.max_seconds,
                   help=f"split longer files into shards of this length (default {d.max_seconds:g})")
    p.add_argument("--overwrite", action="store_true", help="re-encode files whose shards are up to date")
    p.add_argument("--num-shards", type=int, default=d.num_shards,
                   help="split the file list into K parts (parallel workers)")
    p.add_argument("--shard-index", type=int, default=d.shard_index, help="which part this process encodes (0-based)")
    p.add_argument("--storage", choices=("auto", *STORAGES), default=d.storage,
                   help="how shards store latents: float32 or float16 arrays that training reads crop by crop from "
                        "disk, or pt (the older format, held in memory); auto: the folder's own, float32 for a new "
                        "folder. One that differs from the folder's converts it first (default auto)")
    p.add_argument("--finalize", action="store_true",
                   help="only rebuild manifest.json and statistics from the shards in --out-dir")
    p.add_argument("--convert", choices=STORAGES, metavar="STORAGE",
                   help=f"only convert the shards in --out-dir to STORAGE ({' | '.join(STORAGES)}) in place, without "
                        f"re-encoding, and rebuild the manifest; safe to interrupt and run again")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    cfg = PreprocessConfig(in_dir=a.in_dir or "", out_dir=a.out_dir, codec=a.codec, codec_ckpt=a.codec_ckpt,
                           trust_codec_ckpt=a.trust_codec_ckpt, device=a.device, max_seconds=a.max_seconds,
                           overwrite=a.overwrite, num_shards=a.num_shards, shard_index=a.shard_index,
                           storage=a.storage)
    if a.finalize and a.convert:
        raise FlowError("--convert rebuilds the manifest itself: give --convert or --finalize, not both")
    if a.convert:
        t0 = time.perf_counter()
        r = convert_folder(a.out_dir, a.convert, {"converted_to": a.convert})
        m = r.manifest
        print(f"converted {r.converted} shard(s) to {a.convert} ({r.kept} already were) in {time.perf_counter() - t0:.1f} s")
        print(f"manifest: {len(m['shards'])} shard(s), {m['hours']:.2f} h usable, codec {m['codec']} {m['codec_version']}")
        return 0
    if a.finalize:
        m = finalize(a.out_dir, cfg)
        print(f"manifest: {len(m['shards'])} shard(s), {m['hours']:.2f} h usable, codec {m['codec']} {m['codec_version']}")
        return 0
    if not a.in_dir:
        raise FlowError("--in-dir is needed to encode audio (only --finalize and --convert work without it)")
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
