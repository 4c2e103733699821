import json

import pytest
import torch

from codicodec_flow.checkpoint import inference_dict, save_checkpoint
from codicodec_flow.commands.cli import main
from codicodec_flow.config import FlowConfig, ModelConfig
from codicodec_flow.evaluation.evaluate import EvalConfig, pick_windows, run_eval
from codicodec_flow.data.dataset import LatentFile
from codicodec_flow.model import FlowDiT
from codicodec_flow.latents import LatentStats
from conftest import ar_latents, randomised_model, write_latent_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ev")
    held = write_latent_dir(root / "held", {f"h{i}.wav": ar_latents(30, seed=100 + i) for i in range(3)})
    train = write_latent_dir(root / "train", {f"t{i}.wav": ar_latents(40, seed=i) for i in range(4)})
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, cond_dim=32, context_chunks=4)
    torch.manual_seed(0)
    model = FlowDiT(cfg)
    stats = LatentStats(torch.zeros(64), torch.ones(64), 1)
    ckpt = root / "run" / "ema.pt"
    save_checkpoint(inference_dict(model.state_dict(), cfg, FlowConfig(), stats, {"name": "spectral", "version": "1"},
                                   3), ckpt)
    (root / "run" / "metrics.jsonl").write_text(
        "\n".join(json.dumps({"kind": "train", "step": s, "loss": 1.0 / s}) for s in range(1, 6)) + "\n{cut")
    return root, held, train, ckpt


def test_eval_writes_every_figure_and_plot(setup):
    root, held, train, ckpt = setup
    cfg = EvalConfig(str(ckpt), str(held), str(root / "out"), str(train), prompts=4, prompt_chunks=4,
                     continuation_chunks=6, rollout_chunks=40, segment_chunks=10, device="cpu")
    report = run_eval(cfg, plain=True)
    saved = json.loads((root / "out" / "eval.json").read_text())
    assert saved["validation"]["loss"] == pytest.approx(report["validation"]["loss"])
    assert len(saved["validation"]["by_t"]) == 7
    c = saved["continuation"]
    assert c["prompts"] == 4 and set(c["frechet"]) == {"fd_token", "fd_chunk"}
    assert {"nn_ratio", "copied_fraction"} <= set(saved["memorisation"])
    ro = saved["rollout"]
    assert ro["chunks"] == 40 and ro["finite"] and len(ro["segments"]) == 4 and "verdict" in ro
    assert ro["streams"] == 16 and 0 < ro["spread_min"] <= ro["spread_max"]  # the default: 16 prompts at once
    assert c["spread"] > 0 and c["spread_verdict"] in ("faithful", "washed out", "too wide")
    assert set(c["spread_parts"]) == {"within", "between"} and min(c["spread_parts"].values()) > 0
    for name in ("latents", "spectrogram", "drift", "training"):
        assert (root / "out" / saved["plots"][name].split("/")[-1]).read_bytes()[:4] == b"\x89PNG", name


def test_eval_is_deterministic(setup):
    root, held, _, ckpt = setup
    cfg = EvalConfig(str(ckpt), str(held), str(root / "o2"), None, prompts=2, prompt_chunks=2, continuation_chunks=2,
                     rollout_chunks=0, device="cpu", audio=False)
    a, b = run_eval(cfg, plain=True), run_eval(cfg, plain=True)
    assert a["validation"] == b["validation"] and a["continuation"]["frechet"] == b["continuation"]["frechet"]


def test_windows_spread_over_long_enough_files():
    files = [LatentFile("short", torch.zeros(3, 8, 64)), LatentFile("a", torch.zeros(20, 8, 64)),
             LatentFile("b", torch.zeros(12, 8, 64))]
    w = pick_windows(files, 5, 10)
    assert {i for i, _ in w} == {1, 2} and all(s + 10 <= files[i].chunks for i, s in w)
    assert pick_windows(files, 5, 30) == []


def test_eval_cli(setup, capsys):
    root, held, train, ckpt = setup
    code = main(["eval", "--ckpt", str(ckpt), "--data-dir", str(held), "--out-dir", str(root / "cli"), "--prompts", "2",
                 "--prompt-chunks", "2", "--continuation-chunks", "2", "--rollout-chunks", "20", "--rollout-streams", "2",
                 "--device", "cpu", "--no-audio", "--solver", "euler", "--nfe", "2"])
    out = capsys.readouterr().out
    assert code == 0 and "validation loss" in out and "rollout of 2 x 20 chunks" in out


def test_eval_compares_with_a_teacher_on_the_same_prompts_and_noise(setup, capsys):
    """A model compared with itself under the same sampler gives the same chunks (same prompts, same noise);
    under another sampler the first chunks differ, and both sides are reported."""
    root, held, _, _ = setup
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, cond_dim=32, context_chunks=4)
    ckpt = root / "curved" / "ema.pt"  # not zero-initialised: its velocity field is curved, so solvers differ
    save_checkpoint(inference_dict(randomised_model(cfg, scale=0.2).state_dict(), cfg, FlowConfig(),
                                   LatentStats(torch.zeros(64), torch.ones(64), 1), {"name": "spectral", "version": "1"},
                                   3), ckpt)
    args = ["eval", "--ckpt", str(ckpt), "--data-dir", str(held), "--prompts", "3", "--prompt-chunks", "2",
            "--continuation-chunks", "3", "--rollout-chunks", "0", "--device", "cpu", "--no-audio", "--solver", "euler",
            "--nfe", "2", "--teacher", str(ckpt)]
    assert main(args + ["--out-dir", str(root / "t1"), "--teacher-solver", "euler", "--teacher-nfe", "2"]) == 0
    same = json.loads((root / "t1" / "eval.json").read_text())["teacher"]
    assert same["first_chunk_rms"] == 0 and same["fd_token_ratio"] == pytest.approx(1.0)
    assert same["nfe"] == 2 and "same prompts and noise" in capsys.readouterr().out
    assert main(args + ["--out-dir", str(root / "t3"), "--teacher-solver", "euler", "--teacher-nfe", "2",
                        "--prompt-batch", "2"]) == 0  # 2 + 1 prompts: the teacher's batches draw the same noise
    batched = json.loads((root / "t3" / "eval.json").read_text())
    assert batched["teacher"]["first_chunk_rms"] == 0 and batched["continuation"]["prompts"] == 3
    assert main(args + ["--out-dir", str(root / "t2"), "--teacher-solver", "heun", "--teacher-nfe", "8"]) == 0
    other = json.loads((root / "t2" / "eval.json").read_text())["teacher"]
    assert other["first_chunk_rms"] > 1e-3 and other["nfe"] == 8 and other["solver"] == "heun"


def test_eval_scores_the_raw_weights_of_last_pt_when_asked(setup, capsys):
    """--weights raw loads last.pt's training weights (not its EMA); an ema.pt has none and says so."""
    root, held, _, ckpt = setup
    ema = torch.load(ckpt, weights_only=True)
    raw = {k: v + 0.05 * torch.randn_like(v) for k, v in ema["model"].items()}
    last = root / "run" / "last.pt"
    save_checkpoint({**ema, "kind": "training", "model": raw, "ema": ema["model"]}, last)
    args = ["eval", "--data-dir", str(held), "--prompts", "2", "--prompt-chunks", "2", "--continuation-chunks", "2",
            "--rollout-chunks", "0", "--no-audio", "--device", "cpu"]
    out = {}
    for name, ck, which in (("ema", ckpt, "ema"), ("last_ema", last, "ema"), ("last_raw", last, "raw")):
        assert main([*args, "--ckpt", str(ck), "--weights", which, "--out-dir", str(root / name)]) == 0
        out[name] = json.loads((root / name / "eval.json").read_text())
    assert out["last_raw"]["config"]["weights"] == "raw"
    assert out["last_ema"]["validation"]["loss"] == out["ema"]["validation"]["loss"]
    assert out["last_raw"]["validation"]["loss"] != out["ema"]["validation"]["loss"]
    assert main([*args, "--ckpt", str(ckpt), "--weights", "raw", "--out-dir", str(root / "x")]) != 0
    assert "holds only the EMA weights" in capsys.readouterr().err
