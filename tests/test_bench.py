import json

import pytest
import torch

from codicodec_flow import quantize
from codicodec_flow.packing import packing_available
from codicodec_flow.evaluation.bench import BenchConfig, run_bench
from codicodec_flow.commands.cli import main


def test_bench_reports_every_section():
    cfg = BenchConfig(device="cpu", sizes=("tiny",), solvers=("euler", "rk4"), nfes=(2, 4), context_chunks=4,
                      measure_chunks=2, rerun_chunks=1, long_chunks=25, codec="spectral", train_steps=1,
                      realtime_chunks=5)
    r = run_bench(cfg, say=lambda *_: None)
    assert "cpu" in r["machine"] and r["codec"].startswith("spectral")
    combos = {(g["solver"], g["nfe"]) for g in r["generation"]}
    assert combos == {("euler", 2), ("euler", 4), ("rk4", 4)}  # rk4 cannot do NFE 2
    for g in r["generation"]:
        assert g["cached_s"] > 0 and g["rerun_s"] > 0 and g["with_codec_s"] > g["cached_s"]
        assert g["first_chunk_latency_s"] > 0
        assert g["bandwidth_floor_s"] > 0 and g["over_floor"] == pytest.approx(g["cached_s"] / g["bandwidth_floor_s"])
    assert r["bandwidth_gb_s"] > 0
    assert r["long_stream"]["chunks"] == 25 and r["long_stream"]["memory_mb_late"] > 0
    assert r["training"][0]["tokens_per_s"] > 0
    assert r["realtime"]["chunks"] == 5 and r["realtime"]["rtf"] > 0


def test_bench_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--device", "cpu", "--sizes", "tiny", "--nfes", "2", "--solvers", "euler", "--measure-chunks",
                 "1", "--rerun-chunks", "1", "--long-chunks", "0", "--train-steps", "0", "--realtime-chunks", "0",
                 "--codec", "none", "--context-chunks", "4", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["generation"][0]["nfe"] == 2
    assert "seconds per chunk" in capsys.readouterr().out
    assert main(["bench", "--sizes", "huge"]) == 2


def test_realtime_figure_under_competing_load():
    """--competing-load: the engine's sustained RTF again beside busy processes, at the live thread count and at
    torch's own; structure only (speeds are figures, never test thresholds)."""
    import torch
    cfg = BenchConfig(device="cpu", sizes=("tiny",), solvers=("euler",), nfes=(2,), context_chunks=4, measure_chunks=1,
                      rerun_chunks=0, long_chunks=0, codec="spectral", train_steps=0, realtime_chunks=3, threads=1,
                      competing_load=1)
    r = run_bench(cfg, say=lambda *_: None)
    assert r["realtime"]["threads"] == 1 and r["realtime"]["chunks"] == 3
    load = r["realtime_under_load"]
    assert load["busy_processes"] == 1
    assert [run["threads"] for run in load["runs"]] == sorted({1, torch.get_num_threads()})
    assert all(run["chunks"] == 3 and run["rtf"] > 0 for run in load["runs"])


def test_competing_load_processes_are_stopped():
    import os
    import pytest
    from codicodec_flow.evaluation.bench import competing_load
    with pytest.raises(RuntimeError):
        with competing_load(2) as pids:
            for pid in pids:
                os.kill(pid, 0)  # running
            raise RuntimeError("the measurement failed")
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # killed and reaped however the block ended


def test_bench_cli_reports_the_figure_under_load(capsys):
    assert main(["bench", "--device", "cpu", "--sizes", "tiny", "--nfes", "2", "--solvers", "euler", "--measure-chunks",
                 "1", "--rerun-chunks", "0", "--long-chunks", "0", "--train-steps", "0", "--realtime-chunks", "2",
                 "--codec", "spectral", "--context-chunks", "4", "--threads", "1", "--competing-load", "1"]) == 0
    assert "realtime engine beside 1 busy process(es), 1 thread(s): sustained" in capsys.readouterr().out
    assert main(["bench", "--sizes", "tiny", "--codec", "none", "--competing-load", "1"]) == 2


def test_streamed_bytes_leave_out_what_the_generator_keeps_per_time():
    from codicodec_flow.config import MODEL_PRESETS
    from codicodec_flow.evaluation.bench import streamed_bytes
    from codicodec_flow.model import FlowDiT
    model = FlowDiT(MODEL_PRESETS["tiny"])
    kept = sum(p.numel() for m in (model.time, model.ada_out, *(b.ada for b in model.blocks)) for p in m.parameters())
    assert streamed_bytes(model) == 4 * (model.num_params() - kept) and kept > 0
    assert streamed_bytes(model.to(torch.bfloat16)) == 2 * (model.num_params() - kept)


@pytest.mark.parametrize("min_dim", [0, 10_000])
def test_bench_times_int8_beside_fp32(tmp_path, capsys, monkeypatch, min_dim):
    """Rows say whether the fp32 path they timed multiplies through packed weights (packing.py)."""
    monkeypatch.setattr(quantize, "MIN_PACKED_DIM", min_dim)
    out = tmp_path / "b.json"
    assert main(["bench", "--device", "cpu", "--sizes", "tiny", "--nfes", "2", "--solvers", "euler", "--measure-chunks",
                 "2", "--rerun-chunks", "1", "--long-chunks", "0", "--train-steps", "0", "--realtime-chunks", "0",
                 "--codec", "none", "--precisions", "int8,fp32", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["generation"]
    assert [r["precision"] for r in rows] == ["fp32", "int8"]  # the exact path first: the others compare with it
    assert "speedup" in rows[0] and "speedup" not in rows[1]  # the re-run reference is timed against fp32 only
    assert rows[1]["vs_fp32"] == pytest.approx(rows[0]["cached_s"] / rows[1]["cached_s"])
    printed = capsys.readouterr()
    assert "int8" in printed.out  # the table has a precision column
    packed = min_dim == 0 and packing_available("cpu")
    assert [r["packed"] for r in rows] == [packed, False]
    assert ("fp32 packed" in printed.out + printed.err) == packed  # the progress line names the path
    assert main(["bench", "--sizes", "tiny", "--precisions", "int4"]) == 2


def test_training_figure_times_the_step_train_runs(monkeypatch):
    """bench's training figure is train.optimiser_step (train's AdamW settings, gradient clipping, EMA), with
    --train-noisy-chunks and --train-noisy-share as train's flags; --train-only measures nothing else."""
    from codicodec_flow import train
    from codicodec_flow.evaluation import bench
    assert bench.optimiser_step is train.optimiser_step
    seen = []

    def spy(tr, crops):
        seen.append((tr.step, tr.run.train.grad_clip, tr.run.train.noisy_chunks, tr.run.train.rollout_p,
                     tuple(crops[0].x.shape)))
        return train.optimiser_step(tr, crops)

    monkeypatch.setattr(bench, "optimiser_step", spy)
    cfg = BenchConfig(device="cpu", sizes=("tiny",), train_steps=5, train_batch=2, train_crop=32, train_noisy_chunks=2,
                      train_only=True)
    r = run_bench(cfg, say=lambda *_: None)
    # a warm-up step, then the 5 timed; never a rollout step, though the last would lie in train's closing stage
    assert seen == [(step, 1.0, 2, 0.0, (2, 32, 64)) for step in range(6)]
    row = r["training"][0]
    assert row["noisy_chunks"] == 2 and row["attention"] == "blocks" and row["tokens_per_s"] > 0
    assert r["generation"] == [] and "bandwidth_gb_s" not in r and "realtime" not in r


def test_bench_cli_training_only(capsys):
    assert main(["bench", "--device", "cpu", "--sizes", "tiny", "--train-only", "--train-steps", "1", "--train-batch",
                 "2", "--train-crop", "32"]) == 0
    out = capsys.readouterr().out  # train's default share: a quarter of the crop's 4 chunks
    assert "train's optimiser step" in out and "1 of 4" in out and "seconds per chunk" not in out
    assert main(["bench", "--device", "cpu", "--sizes", "tiny", "--train-only", "--train-steps", "1", "--train-batch",
                 "2", "--train-crop", "32", "--train-noisy-share", "1"]) == 0
    assert "4 of 4" in capsys.readouterr().out
    assert main(["bench", "--device", "cpu", "--sizes", "tiny", "--train-only", "--train-crop", "32",
                 "--train-noisy-chunks", "5"]) == 2
    assert "--train-noisy-chunks 5: give 1 to 4" in capsys.readouterr().err


def test_every_command_flushes_subnormals():
    """A subnormal operand or result takes the CPU's slow path (a fresh model's backward met them: bench's training
    step 1.9 s instead of 1.1 s); every command runs with them flushed to zero."""
    tiny = torch.tensor([1e-30])
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormals")
    try:
        torch.set_flush_denormal(False)
        assert (tiny * 1e-10).item() != 0.0  # 1e-40 is a subnormal float32
        with pytest.raises(SystemExit):
            main(["--help"])
        assert (tiny * 1e-10).item() == 0.0
    finally:
        torch.set_flush_denormal(False)


def test_the_rerun_reference_is_warmed_up_like_the_cached_path(monkeypatch):
    """The re-run reference's first chunk after its prompt is not timed (the cached path's first chunk is its
    latency figure, not part of its median), so a cold first chunk cannot inflate the speed-up."""
    from codicodec_flow.evaluation import bench
    made, timed = [], []
    real_next, real_time = bench.WindowRerunGenerator.next_chunk, bench.time_chunks

    def next_chunk(self, *a, **kw):
        made.append(1)
        return real_next(self, *a, **kw)

    def time_chunks(gen, n):
        if isinstance(gen, bench.WindowRerunGenerator):
            timed.append((len(made), n))  # chunks made before the timed ones, and how many are timed
        return real_time(gen, n)

    monkeypatch.setattr(bench.WindowRerunGenerator, "next_chunk", next_chunk)
    monkeypatch.setattr(bench, "time_chunks", time_chunks)
    cfg = BenchConfig(device="cpu", sizes=("tiny",), solvers=("euler",), nfes=(1,), measure_chunks=1, rerun_chunks=2,
                      long_chunks=0, codec="none", train_steps=0, realtime_chunks=0)
    row = run_bench(cfg, say=lambda *_: None)["generation"][0]
    assert timed == [(1, 2)] and len(made) == 3 and row["rerun_s"] > 0  # 1 untimed, then 2 timed
