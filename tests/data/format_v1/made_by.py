import sys, torch
sys.path.insert(0, "/work/main/tests")
from pathlib import Path
from conftest import write_audio
from codicodec_flow.config import PreprocessConfig
from codicodec_flow.preprocess import run_preprocess
from codicodec_flow.train import plan_run, run_train
from codicodec_flow.generate import StreamGenerator
from codicodec_flow.checkpoint import load_bundle
from codicodec_flow.config import SampleConfig
write_audio(Path("audio/a.wav"), 3.0, seed=1)
write_audio(Path("audio/b.wav"), 2.5, seed=2)
run_preprocess(PreprocessConfig(in_dir="audio", out_dir="latents", codec="spectral", device="cpu"), plain=True)
train = dict(data_dir="latents", out_dir="run", device="cpu", batch_size=2, crop_tokens=32, max_steps=2,
             save_every=2, val_every=0, log_every=1, tui=False, seed=0)
model = dict(dim=32, n_layers=1, n_heads=2, cond_dim=32, context_chunks=2)
run_train(plan_run(train, model, {}, "tiny"))
b = load_bundle("run/ema.pt")
g = StreamGenerator(b.model, b.stats, SampleConfig(solver="euler", nfe=2, seed=3), "cpu")
g.prefill(torch.load("latents/a.wav.0000.pt", weights_only=True)["latents"])
z = g.generate(2)
torch.save({"latents": z}, "expected_generation.pt")
