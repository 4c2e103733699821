"""Files written by the 0.1 layout (before the package moved into layers) still load and give the same results.

tests/data/format_v1 was written by that version's code (made_by.py beside it): two shards and a manifest
from `preprocess`, a tiny run's last.pt and ema.pt, and two chunks it generated from the ema weights.
"""
import shutil
from pathlib import Path

import torch

from codicodec_flow import SampleConfig, StreamGenerator, load_bundle, load_latents
from codicodec_flow.data.shards import load_shard
from codicodec_flow.plan import plan_run
from codicodec_flow.train import run_train

V1 = Path(__file__).parent / "data" / "format_v1"


def test_v1_shards_and_manifest_load():
    data = load_latents(V1 / "latents", val_fraction=0.0)
    assert [f.source for f in data.train] == ["a.wav", "b.wav"] and [f.chunks for f in data.train] == [4, 3]
    assert data.codec == "spectral" and data.stats.mean.shape == (64,)
    assert load_shard(V1 / "latents" / "a.wav.0000.pt").meta["source"] == "a.wav"


def test_v1_ema_generates_what_it_generated_then():
    bundle = load_bundle(V1 / "run" / "ema.pt")
    gen = StreamGenerator(bundle.model, bundle.stats, SampleConfig(solver="euler", nfe=2, seed=3), "cpu")
    gen.prefill(load_shard(V1 / "latents" / "a.wav.0000.pt").latents)
    expected = torch.load(V1 / "expected_generation.pt", weights_only=True)["latents"]
    torch.testing.assert_close(gen.generate(2), expected, atol=1e-5, rtol=0)


def test_v1_last_pt_resumes(tmp_path):
    shutil.copytree(V1 / "run", tmp_path / "run")
    train = dict(data_dir=str(V1 / "latents"), out_dir=str(tmp_path / "run"), device="cpu", max_steps=3,
                 tui=False, val_every=0)
    metrics = run_train(plan_run(train, {}, {}, resume=True))
    assert metrics["step"] == 3 and load_bundle(tmp_path / "run" / "ema.pt").step == 3
