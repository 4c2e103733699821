import json

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
