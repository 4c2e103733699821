"""Training's peak memory does not grow with the latent folder when its shards are arrays read from disk.

Two fresh processes train a tiny model for a few steps, one on 1 h and one on 50 h of latents read from disk; their
peak resident memory (VmHWM) must differ by under MARGIN_MB. The 50 h process then loads its folder into memory
(the way `.pt` shards are held) and its resident memory rises by about the data's 515 MiB: the measurement sees data
when it is there.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from codicodec_flow.codec.base import CHUNK_SECONDS
from codicodec_flow.latents import LatentStats

REPO = Path(__file__).resolve().parents[1]
MARGIN_MB = 40  # README, train: the 50 h index and a few crops, with room for allocator noise
BYTES_PER_HOUR = 3600 / CHUNK_SECONDS * 8 * 64 * 4  # float32 latents: ~10.8 MB

CHILD = """
import sys
from codicodec_flow.data.dataset import load_latents
from codicodec_flow.plan import plan_run
from codicodec_flow.train import run_train
def mb(field):  # VmHWM: the peak resident memory so far; VmRSS: now
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0]) // 1024
data_dir, out_dir = sys.argv[1:3]
cfg = dict(data_dir=data_dir, out_dir=out_dir, device="cpu", batch_size=8, crop_tokens=256, max_steps=2,
           warmup_steps=1, save_every=100, val_every=0, log_every=1, tui=False, dtype="fp32")
run_train(plan_run(cfg, {}, {}, "tiny"))
print(mb("VmHWM"), mb("VmRSS"))
held = load_latents(data_dir, in_memory=True)
print(mb("VmRSS"))
"""


def synthetic_folder(root: Path, hours: float, file_chunks: int = 439) -> Path:
    """A float32 latent folder of `hours` in 5-minute files, written as sparse files (nothing is stored on disk
    but their headers; the values read back are zeros) with their metadata and a manifest."""
    root.mkdir(parents=True)
    total = round(hours * 3600 / CHUNK_SECONDS)
    entries = []
    for i, start in enumerate(range(0, total, file_chunks)):
        n, name = min(file_chunks, total - start), f"song{i:05d}.wav"
        path = root / f"{name}.0000.npy"
        np.lib.format.open_memmap(path, mode="w+", dtype="<f4", shape=(n, 8, 64)).flush()
        meta = {"source": name, "segment": 0, "codec": "spectral", "codec_version": "1"}
        path.with_suffix(".json").write_text(json.dumps({"format": 2, "storage": "float32", "shape": [n, 8, 64],
                                                         "meta": meta}))
        entries.append({"path": path.name, "chunks": n, "source": name, "segment": 0})
    manifest = {"format": 2, "storage": "float32", "codec": "spectral", "codec_version": "1", "shards": entries,
                "chunks": total, "hours": total * CHUNK_SECONDS / 3600, "stats": LatentStats.identity().to_json()}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def start(data_dir: Path, out_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(data_dir), str(out_dir)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={"PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def measure(proc: subprocess.Popen) -> tuple[int, int]:
    """(peak resident memory of training from disk, resident memory the folder takes once loaded into it) in MB."""
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-2000:]
    peak, before, after = map(int, out.split()[-3:])
    return peak, after - before


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak memory is read from /proc (Linux)")
def test_peak_memory_of_train_is_flat_in_the_hours_of_data(tmp_path):
    runs = [start(synthetic_folder(tmp_path / f"{h}h", h), tmp_path / f"run{h}") for h in (1, 50)]  # side by side
    (one_hour, _), (fifty, held) = map(measure, runs)
    print(f"peak resident memory of train: 1 h {one_hour} MB, 50 h {fifty} MB from disk; "
          f"the 50 h held in memory take {held} MB more")
    assert abs(fifty - one_hour) < MARGIN_MB, (one_hour, fifty)
    assert held > 0.7 * 50 * BYTES_PER_HOUR / 2**20, held  # the data, ~515 MiB, less heap the training freed
