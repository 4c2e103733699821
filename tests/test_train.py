import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from codicodec_flow.checkpoint import load_bundle, load_checkpoint
from codicodec_flow.commands.cli import main
from codicodec_flow.config import MODEL_PRESETS
from codicodec_flow.data.dataset import load_latents, validation_crops
from codicodec_flow.errors import CheckpointError, FlowError
from codicodec_flow.flow import validation_loss
from codicodec_flow.plan import noisy_count, plan_run
from codicodec_flow.train import run_train
from conftest import ar_latents, write_latent_dir

REPO = Path(__file__).resolve().parents[1]


def drifting_chords(chunks: int, seed: int, rho: float = 0.98) -> torch.Tensor:
    """(chunks, 8, 64): one slowly drifting vector per chunk (AR(1), stationary N(0, 1)) plus a little jitter.

    Without context each chunk looks like fresh Gaussian noise; with the previous chunk it is
    almost known, so a model that uses its context must score far better.
    """
    g = torch.Generator().manual_seed(seed)
    c = torch.empty(chunks, 64)
    c[0] = torch.randn(64, generator=g)
    for k in range(1, chunks):
        c[k] = rho * c[k - 1] + (1 - rho ** 2) ** 0.5 * torch.randn(64, generator=g)
    return c[:, None, :] + 0.05 * torch.randn(chunks, 8, 64, generator=g)


def tiny_run(data_dir, out_dir, resume=False, flow=None, init_from=None, model=None, **over):
    train = dict(data_dir=str(data_dir), out_dir=str(out_dir), device="cpu", batch_size=4, crop_tokens=64,
                 max_steps=6, lr=1e-3, warmup_steps=2, save_every=100, val_every=3, log_every=1, tui=False,
                 ema_decay=0.9, dtype="fp32")
    train.update(over)
    return plan_run(train, model or {}, flow or {}, "tiny", resume, None if init_from is None else str(init_from))


def test_learns_to_use_its_context(tmp_path):
    """Trained for a minute on a predictable process, the model's next-chunk loss with context is far
    below its own loss without context (its unconditional branch), where context matters (t >= 0.5)."""
    data = write_latent_dir(tmp_path / "lat", {f"f{i}.wav": drifting_chords(80, i) for i in range(30)})
    run_train(tiny_run(data, tmp_path / "run", flow={"t_dist": "uniform"}, max_steps=1000, lr=1e-2,
                       warmup_steps=10, val_every=1000, log_every=200, batch_size=16, ema_decay=0.95))
    bundle = load_bundle(tmp_path / "run" / "ema.pt")
    d = load_latents(data)
    crops = validation_crops(d.val, d.stats, 8)
    with_ctx = validation_loss(bundle.model, crops, 0.02, "cpu")["by_t"]
    without = validation_loss(bundle.model, crops, 0.02, "cpu", use_context=False)["by_t"]
    high = [t for t in with_ctx if t >= 0.5]
    cond = sum(with_ctx[t] for t in high) / len(high)
    uncond = sum(without[t] for t in high) / len(high)
    assert cond < 0.5 * uncond, (with_ctx, without)


def test_resume_is_bit_exact(ar_data, tmp_path):
    """N steps straight == N/2 steps, stop, --resume, N/2 steps: identical weights, EMA and optimiser."""
    run_train(tiny_run(ar_data, tmp_path / "straight"))
    run_train(tiny_run(ar_data, tmp_path / "split"), stop_at=3)
    assert load_checkpoint(tmp_path / "split" / "last.pt")["step"] == 3
    run_train(tiny_run(ar_data, tmp_path / "split", resume=True))
    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(tmp_path / "split" / "last.pt")
    assert a["step"] == b["step"] == 6
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_disk_backed_data_and_workers_train_exactly_as_in_memory(tmp_path):
    """The same latents as .pt shards held in memory, and as float32 arrays in segments of 5 chunks read from disk by
    2 background workers, stopped at step 3 and resumed: identical weights, EMA and optimiser state after 6 steps."""
    sources = {f"song{i}.wav": ar_latents(n, seed=i) for i, n in enumerate([40, 36, 30, 24, 12, 5])}
    pt = write_latent_dir(tmp_path / "pt", sources, "pt")
    arrays = write_latent_dir(tmp_path / "f32", sources, "float32", segment=5)
    run_train(tiny_run(pt, tmp_path / "memory"))
    run_train(tiny_run(arrays, tmp_path / "disk", num_workers=2), stop_at=3)
    run_train(tiny_run(arrays, tmp_path / "disk", resume=True, num_workers=2))
    a, b = load_checkpoint(tmp_path / "memory" / "last.pt"), load_checkpoint(tmp_path / "disk" / "last.pt")
    assert a["step"] == b["step"] == 6
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][name], b[key][name]) for name in a[key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_checkpoint_writes_are_atomic(ar_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run_train(tiny_run(ar_data, out, max_steps=2))
    before = (out / "last.pt").read_bytes()
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        Path(f).write_bytes(Path(f).read_bytes()[:1000])
        raise KeyboardInterrupt  # killed in the middle of writing

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        run_train(tiny_run(ar_data, out, max_steps=4, resume=True))
    assert (out / "last.pt").read_bytes() == before
    assert load_checkpoint(out / "last.pt")["step"] == 2
    assert not list(out.glob("*.tmp"))


def test_checkpoints_are_self_contained(ar_data, tmp_path):
    run_train(tiny_run(ar_data, tmp_path / "run", max_steps=3))
    ema = load_checkpoint(tmp_path / "run" / "ema.pt")
    assert set(ema) >= {"model", "config", "stats", "codec", "step"} and "optimizer" not in ema
    assert ema["codec"]["name"] == "spectral"
    bundle = load_bundle(tmp_path / "run" / "ema.pt")
    assert bundle.model_cfg.context_chunks == 4 and bundle.stats.mean.shape == (64,)
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert any('"kind": "val"' in line for line in metrics) and any('"kind": "train"' in line for line in metrics)


def test_resume_refuses_changed_settings(ar_data, tmp_path):
    run_train(tiny_run(ar_data, tmp_path / "run", max_steps=2))
    with pytest.raises(FlowError, match="--resume"):
        tiny_run(ar_data, tmp_path / "run")  # fresh start over an existing run
    with pytest.raises(CheckpointError, match="batch_size"):
        tiny_run(ar_data, tmp_path / "run", resume=True, batch_size=8)
    with pytest.raises(CheckpointError, match="dim"):
        plan_run({"data_dir": str(ar_data), "out_dir": str(tmp_path / "run")}, {"dim": 128}, {}, "tiny", True)
    with pytest.raises(CheckpointError, match="no .*last.pt"):
        tiny_run(ar_data, tmp_path / "other", resume=True)


def test_bad_inputs_give_clear_errors(ar_data, tmp_path, capsys):
    def train(*extra):
        return main(["train", "--data-dir", str(extra[0]), "--out-dir", str(tmp_path / "r"), "--preset", "tiny",
                     "--device", "cpu", "--max-steps", "1", "--no-tui", *extra[1:]])

    assert train(tmp_path / "missing") == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert train(tmp_path / "empty") == 2
    assert "manifest.json: missing" in capsys.readouterr().err
    torch.save({"latents": torch.zeros(3, 4, 64), "meta": {}}, ar_data / "song0.wav.0000.pt")
    assert train(ar_data) == 2
    err = capsys.readouterr().err
    assert "song0.wav.0000.pt" in err and "expected (T, 8, 64)" in err and "Traceback" not in err


def test_crop_tokens_must_be_chunk_aligned(ar_data, tmp_path):
    with pytest.raises(FlowError, match="multiple of 8"):
        run_train(tiny_run(ar_data, tmp_path / "run", crop_tokens=60))


def test_cli_train_end_to_end(ar_data, tmp_path, capsys):
    code = main(["train", "--data-dir", str(ar_data), "--out-dir", str(tmp_path / "run"), "--preset", "tiny",
                 "--device", "cpu", "--max-steps", "4", "--batch-size", "2", "--crop-tokens", "64", "--no-tui",
                 "--val-every", "2", "--dtype", "fp32"])
    out = capsys.readouterr()
    assert code == 0 and "M parameters" in out.err and "h usable" in out.err and (tmp_path / "run" / "ema.pt").exists()
    assert out.out.startswith("done: step 4")  # results on stdout, the training log on stderr


def test_bf16_autocast_trains_on_cpu(ar_data, tmp_path):
    metrics = run_train(tiny_run(ar_data, tmp_path / "run", max_steps=2, dtype="bf16"))
    assert torch.isfinite(torch.tensor(metrics["loss"]))


def test_ddp_two_cpu_processes(ar_data, tmp_path):
    """torchrun with 2 processes and gloo: both train, rank 0 writes the checkpoint. With the own-chunk mark and
    rollouts from the first step: a step whose batch marks no chunk still reduces the mark's gradient."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "codicodec_flow", "train", "--data-dir", str(ar_data), "--out-dir", str(tmp_path / "run"),
           "--preset", "tiny", "--device", "cpu", "--max-steps", "6", "--batch-size", "2", "--crop-tokens", "64",
           "--no-tui", "--dtype", "fp32", "--val-every", "6", "--mark-own", "--rollout-start", "0",
           "--rollout-p", "0.5"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "x2" in proc.stderr
    assert load_checkpoint(tmp_path / "run" / "last.pt")["sampler"]["world"] == 2


def test_periodic_audio_samples(ar_data, tmp_path):
    import soundfile as sf
    from codicodec_flow.train import audio_sample_hook
    run_train(tiny_run(ar_data, tmp_path / "run", max_steps=4, audio_sample_every=2),
              sample_hook=audio_sample_hook(seconds=1.0))
    run_train(tiny_run(ar_data, tmp_path / "cont", max_steps=2, audio_sample_every=2, audio_continuation=True),
              sample_hook=audio_sample_hook(continuation=True, seconds=1.0))
    assert sorted(p.name for p in (tmp_path / "run" / "samples").iterdir()) == ["step0000002.wav", "step0000004.wav"]
    assert sf.info(str(tmp_path / "run" / "samples" / "step0000002.wav")).frames == 2 * 32768
    assert sf.info(str(tmp_path / "cont" / "samples" / "step0000002.wav")).frames > 2 * 32768  # prompt + continuation
    assert '"kind": "sample"' in (tmp_path / "run" / "metrics.jsonl").read_text()


def test_resume_keeps_its_normalisation_and_codec(ar_data, tmp_path, caplog):
    import json
    run_train(tiny_run(ar_data, tmp_path / "run", max_steps=2))
    before = load_checkpoint(tmp_path / "run" / "last.pt")["stats"]
    manifest = json.loads((ar_data / "manifest.json").read_text())
    manifest["stats"]["mean"] = [m + 1.0 for m in manifest["stats"]["mean"]]  # the folder was re-encoded
    (ar_data / "manifest.json").write_text(json.dumps(manifest))
    run_train(tiny_run(ar_data, tmp_path / "run", max_steps=3, resume=True))
    assert "keeps its original normalisation" in caplog.text
    assert load_checkpoint(tmp_path / "run" / "last.pt")["stats"] == before
    manifest["codec"], manifest["codec_version"] = "codicodec", "0.1.2"
    (ar_data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="trained on spectral"):
        run_train(tiny_run(ar_data, tmp_path / "run", max_steps=4, resume=True))


def test_a_kill_between_the_two_checkpoint_writes_leaves_ema_never_behind(ar_data, tmp_path, monkeypatch):
    """Killed after the first of the two files of a save: ema.pt is never older than last.pt, both carry their step,
    and the resume catches up to exactly what an uninterrupted run gives."""
    run_train(tiny_run(ar_data, tmp_path / "straight", max_steps=4))
    out = tmp_path / "run"
    run_train(tiny_run(ar_data, out, max_steps=2))
    real_save, calls = torch.save, []

    def killed_before_second_file(obj, f, *a, **k):
        calls.append(Path(f).name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies between the two writes
        real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", killed_before_second_file)
    with pytest.raises(KeyboardInterrupt):
        run_train(tiny_run(ar_data, out, max_steps=4, resume=True))
    monkeypatch.setattr(torch, "save", real_save)
    ema_step, last_step = load_checkpoint(out / "ema.pt")["step"], load_checkpoint(out / "last.pt")["step"]
    assert (ema_step, last_step) == (4, 2)  # ema.pt first: it may run ahead, never lag
    run_train(tiny_run(ar_data, out, max_steps=4, resume=True))
    a, b = load_checkpoint(tmp_path / "straight" / "ema.pt"), load_checkpoint(out / "ema.pt")
    assert a["step"] == b["step"] == load_checkpoint(out / "last.pt")["step"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.parametrize("damage, said", [
    (lambda ck: ck.pop("optimizer"), "missing optimizer"),
    (lambda ck: ck.pop("rng"), "missing rng"),
    (lambda ck: ck["config"].pop("train"), "missing config.train"),
    (lambda ck: ck.update(kind="inference"), "inference checkpoint"),
    (lambda ck: ck["model"].pop(next(iter(ck["model"]))), "does not fit"),
])
def test_resume_from_an_incomplete_last_pt_is_a_clear_error(ar_data, tmp_path, capsys, damage, said):
    out = tmp_path / "run"
    run_train(tiny_run(ar_data, out, max_steps=2))
    ck = load_checkpoint(out / "last.pt")
    damage(ck)
    torch.save(ck, out / "last.pt")
    code = main(["train", "--data-dir", str(ar_data), "--out-dir", str(out), "--device", "cpu", "--max-steps", "3",
                 "--no-tui", "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and said in err and "last.pt" in err and "Traceback" not in err, err


def test_resume_refuses_a_different_preset(ar_data, tmp_path):
    run_train(tiny_run(ar_data, tmp_path / "run", max_steps=2))
    train = {"data_dir": str(ar_data), "out_dir": str(tmp_path / "run"), "max_steps": 3}
    with pytest.raises(CheckpointError, match=r"--preset small gives dim: checkpoint 64 vs requested 384"):
        plan_run(train, {}, {}, "small", resume=True)
    assert plan_run(train, {}, {}, "tiny", resume=True).model.dim == 64  # the run's own preset is fine
    assert plan_run(train, {}, {}, None, resume=True).model.dim == 64


def test_resume_removes_temporaries_of_a_killed_save(ar_data, tmp_path):
    out = tmp_path / "run"
    run_train(tiny_run(ar_data, out, max_steps=2))
    left = out / ".ema.pt.0123abcd.tmp"
    left.write_bytes(b"half a checkpoint")
    os.utime(left, (1, 1))
    run_train(tiny_run(ar_data, out, max_steps=3, resume=True))
    assert not left.exists()


def test_init_from_starts_a_new_run_from_the_source_ema_weights(ar_data, tmp_path, caplog):
    """A fine-tune starts model and EMA from the source's EMA weights and keeps its normalisation; optimiser,
    schedule, steps and folder are its own, and every file it writes says where it started from."""
    import json
    import logging
    from codicodec_flow.train import setup
    caplog.set_level(logging.INFO, logger="codicodec_flow")
    src = tmp_path / "big"
    run_train(tiny_run(ar_data, src, flow={"t_dist": "logit_normal"}, max_steps=4))
    source = load_checkpoint(src / "last.pt")
    album = write_latent_dir(tmp_path / "album", {f"track{i}.wav": 3.0 * ar_latents(30, seed=10 + i) for i in range(3)})
    for ckpt in ("last.pt", "ema.pt"):  # last.pt: its EMA weights, as load_bundle reads it
        run = tiny_run(album, tmp_path / "ft", init_from=src / ckpt, max_steps=3, flow={"p_uncond": 0.2})
        assert run.flow.t_dist == "logit_normal" and run.flow.p_uncond == 0.2  # flow: the source's unless given anew
        tr = setup(run)
        assert tr.step == 0 and not tr.opt.state and tr.sched.last_epoch == 0
        for net in (tr.model, tr.ema):
            assert all(torch.equal(v, source["ema"][k]) for k, v in net.state_dict().items())
        assert torch.equal(tr.data.stats.mean, torch.tensor(source["stats"]["mean"]))
    assert f"latent normalisation: the statistics of {src / 'ema.pt'}" in caplog.text
    run_train(run, stop_at=2)
    run_train(tiny_run(album, tmp_path / "ft", resume=True, flow={"p_uncond": 0.2}, max_steps=3))  # kept on resume
    record = {"path": str((src / "ema.pt").resolve()), "step": 4}
    last, ema = load_checkpoint(tmp_path / "ft" / "last.pt"), load_checkpoint(tmp_path / "ft" / "ema.pt")
    assert last["step"] == ema["step"] == 3 and last["scheduler"]["last_epoch"] == 3
    assert last["init_from"] == ema["init_from"] == record
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["init_from"] == record
    assert last["stats"] == source["stats"]  # the normalisation the weights were trained with, not the album's
    assert any(not torch.equal(last["ema"][k], source["ema"][k]) for k in source["ema"])  # and it did train
    assert "init_from" not in source and load_checkpoint(src / "ema.pt")["step"] == 4  # the source is untouched


def test_init_from_refuses_another_shape_another_codec_and_resume(ar_data, tmp_path):
    import json
    import shutil
    src = tmp_path / "big"
    run_train(tiny_run(ar_data, src, max_steps=2))
    train = {"data_dir": str(ar_data), "out_dir": str(tmp_path / "ft"), "device": "cpu", "max_steps": 2}
    with pytest.raises(CheckpointError, match=r"--init-from cannot change the model's shape \(dim: checkpoint 64 vs "
                                              r"requested 128\)"):
        plan_run(train, {"dim": 128}, {}, None, init_from=str(src / "ema.pt"))
    with pytest.raises(CheckpointError, match=r"--preset small gives dim: checkpoint 64 vs requested 384"):
        plan_run(train, {}, {}, "small", init_from=str(src / "ema.pt"))
    with pytest.raises(CheckpointError, match=r"context_chunks: checkpoint 4 vs requested 8"):
        plan_run(train, {"context_chunks": 8}, {}, "tiny", init_from=str(src / "ema.pt"))
    assert plan_run(train, {"dim": 64}, {}, "tiny", init_from=str(src / "ema.pt")).model.dim == 64
    with pytest.raises(FlowError, match="--init-from starts a new run and --resume continues"):
        plan_run(train, {}, {}, None, resume=True, init_from=str(src / "ema.pt"))
    with pytest.raises(FlowError, match="last.pt exists"):
        plan_run({**train, "out_dir": str(src)}, {}, {}, None, init_from=str(src / "ema.pt"))
    other = shutil.copytree(ar_data, tmp_path / "other")
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["codec"], manifest["codec_version"] = "codicodec", "0.1.2"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"holds codicodec 0.1.2 latents but .*ema.pt was trained on spectral 1"):
        run_train(tiny_run(other, tmp_path / "ft", init_from=src / "ema.pt"))


def test_cli_train_init_from_end_to_end(ar_data, tmp_path, capsys):
    run_train(tiny_run(ar_data, tmp_path / "big", max_steps=2))

    def train(out, *extra):
        return main(["train", "--data-dir", str(ar_data), "--out-dir", str(tmp_path / out), "--device", "cpu",
                     "--max-steps", "2", "--batch-size", "2", "--crop-tokens", "64", "--no-tui", "--val-every", "2",
                     "--dtype", "fp32", "--init-from", str(tmp_path / "big" / "last.pt"), *extra])

    code = train("ft")
    out = capsys.readouterr()
    assert code == 0 and out.out.startswith("done: step 2") and "starting from the EMA weights of" in out.err
    assert load_checkpoint(tmp_path / "ft" / "ema.pt")["init_from"]["step"] == 2
    assert load_bundle(tmp_path / "ft" / "ema.pt").model_cfg.dim == 64  # the source's shape, no --preset needed
    for out, extra, said in (("ft2", ["--dim", "128"], "dim: checkpoint 64 vs requested 128"),
                             ("ft", ["--resume"], "--init-from starts a new run"), ("ft", [], "last.pt exists")):
        assert train(out, *extra) == 2
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err, err


def test_noisy_chunks_trains_and_refuses_bad_values(ar_data, tmp_path, capsys):
    """--noisy-chunks K trains K of each crop's chunks; K outside 0..n, or K < n beside --distill-from, is refused."""
    metrics = run_train(tiny_run(ar_data, tmp_path / "run", noisy_chunks=3, max_steps=2, val_every=2))
    assert metrics["step"] == 2 and metrics["loss"] > 0 and metrics["val_loss"] > 0  # validation keeps every chunk
    for bad in (9, -1):
        with pytest.raises(FlowError, match=f"--noisy-chunks {bad}: give 1 to 8"):
            run_train(tiny_run(ar_data, tmp_path / f"bad{bad}", noisy_chunks=bad))
    assert main(["train", "--data-dir", str(ar_data), "--out-dir", str(tmp_path / "d"), "--device", "cpu", "--no-tui",
                 "--crop-tokens", "64", "--noisy-chunks", "2", "--distill-from", str(tmp_path / "run" / "ema.pt")]) == 2
    assert "below all with --distill-from" in capsys.readouterr().err


def test_noisy_share_sets_the_noisy_chunks_of_each_step(ar_data, tmp_path, monkeypatch):
    """By default a quarter of each crop's chunks (rounded, at least one) enter the noisy stream; --noisy-share 1 trains
    all, --noisy-chunks K overrides the share, giving both is refused, a share outside (0, 1] too; a student trains all
    its teacher's chunks unless told otherwise."""
    import codicodec_flow.train as train_module
    seen = []
    real = train_module.training_batch

    def spy(*args):
        batch = real(*args)
        seen.append(batch.t.shape[1])  # (B, K): the noisy chunks this micro-batch trains
        return batch

    monkeypatch.setattr(train_module, "training_batch", spy)
    cases = (({}, 2), ({"noisy_share": 1.0}, 8), ({"noisy_share": 0.3}, 2), ({"noisy_share": 0.01}, 1),
             ({"noisy_chunks": 5}, 5))
    for i, (over, k) in enumerate(cases):
        seen.clear()
        run_train(tiny_run(ar_data, tmp_path / f"run{i}", max_steps=2, val_every=99, **over))
        assert seen == [k, k], (over, seen)
    assert noisy_count(tiny_run(ar_data, tmp_path / "x", crop_tokens=768).train, MODEL_PRESETS["tiny"]) == 24
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(FlowError, match=f"--noisy-share {bad}: give a share in"):
            run_train(tiny_run(ar_data, tmp_path / f"bad{bad}", noisy_share=bad))
    with pytest.raises(FlowError, match="--noisy-chunks and --noisy-share both"):
        tiny_run(ar_data, tmp_path / "both", noisy_chunks=2, noisy_share=0.5)
    teacher = tmp_path / "run0" / "ema.pt"
    assert tiny_run(ar_data, tmp_path / "student", distill_from=teacher).train.noisy_share == 1.0


def test_a_run_saved_before_noisy_share_resumes_with_all_its_chunks(ar_data, tmp_path):
    """A checkpoint written before --noisy-share existed trained every chunk: its run goes on so, not with the default."""
    out = tmp_path / "old"
    run_train(tiny_run(ar_data, out, noisy_share=1.0), stop_at=2)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    del ckpt["config"]["train"]["noisy_share"]
    torch.save(ckpt, out / "last.pt")
    assert tiny_run(ar_data, out, resume=True).train.noisy_share == 1.0
    assert tiny_run(ar_data, tmp_path / "new").train.noisy_share == 0.25
