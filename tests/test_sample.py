import soundfile as sf
import pytest
import torch

from codicodec_flow.checkpoint import inference_dict, load_checkpoint, save_checkpoint
from codicodec_flow.commands.cli import main
from codicodec_flow.config import FlowConfig, ModelConfig
from codicodec_flow.model import FlowDiT
from codicodec_flow.data.shards import load_shard
from codicodec_flow.latents import LatentStats
from conftest import write_audio

CHUNK = 32768


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, cond_dim=32, context_chunks=4)
    torch.manual_seed(0)
    model = FlowDiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    stats = LatentStats(torch.full((64,), -1.0), torch.full((64,), 0.8), 100)
    path = tmp_path_factory.mktemp("ck") / "ema.pt"
    save_checkpoint(inference_dict(model.state_dict(), cfg, FlowConfig(), stats, {"name": "spectral", "version": "1"}, 7),
                    path)
    return path


def sample(ckpt, out, *extra):
    return main(["sample", "--ckpt", str(ckpt), "--out", str(out), "--device", "cpu", "--nfe", "2", "--solver", "euler",
                 *map(str, extra)])


def test_continuation_of_a_prompt(ckpt, tmp_path, capsys):
    prompt = write_audio(tmp_path / "prompt.wav", 2.0, sr=44_100, channels=1)  # any rate and channel count
    assert sample(ckpt, tmp_path / "out.wav", "--prompt-wav", prompt, "--duration-s", 2.0) == 0
    data, sr = sf.read(tmp_path / "out.wav")
    assert sr == 48_000 and data.shape == (3 * CHUNK, 2)  # ceil(2.0 / 0.683) = 3 chunks
    lat = load_shard(tmp_path / "out.latents.pt")
    assert lat.latents.shape == (4, 8, 64) and lat.meta["prompt_chunks"] == 1
    assert "x real time" in capsys.readouterr().out
    assert sample(ckpt, tmp_path / "both.wav", "--prompt-wav", prompt, "--duration-s", 1.0, "--include-prompt") == 0
    assert sf.info(str(tmp_path / "both.wav")).frames == (2 + 2) * CHUNK  # 2 prompt chunks + 2 generated


def test_several_samples_seeded_and_stream_decode(ckpt, tmp_path):
    assert sample(ckpt, tmp_path / "v.wav", "--num-samples", 2, "--duration-s", 1.0, "--seed", 4) == 0
    a, b = sf.read(tmp_path / "v_1.wav")[0], sf.read(tmp_path / "v_2.wav")[0]
    assert a.shape == b.shape == (2 * CHUNK, 2) and not (a == b).all()
    assert sample(ckpt, tmp_path / "w.wav", "--duration-s", 1.0, "--seed", 4, "--decode", "stream") == 0
    # same seed, same stream: the spectral codec's decode_next equals its parallel decode
    assert sample(ckpt, tmp_path / "p.wav", "--duration-s", 1.0, "--seed", 4) == 0
    assert abs(sf.read(tmp_path / "w.wav")[0] - sf.read(tmp_path / "p.wav")[0]).max() < 1e-4


@pytest.mark.parametrize("make,expect", [
    (lambda d, ck: (write_audio(d / "short.wav", 0.3), ck), "at least one codec chunk"),
    (lambda d, ck: (None, d / "missing.pt"), "checkpoint not found"),
    (lambda d, ck: (None, _truncated(d, ck)), "unreadable or truncated"),
    (lambda d, ck: (None, _foreign(d)), "not a codicodec-flow checkpoint"),
])
def test_bad_inputs(ckpt, tmp_path, capsys, make, expect):
    prompt, ck = make(tmp_path, ckpt)
    extra = ["--prompt-wav", prompt] if prompt else []
    assert sample(ck, tmp_path / "o.wav", *extra) == 2
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err


def _truncated(d, ck):
    (d / "trunc.pt").write_bytes(ck.read_bytes()[:2000])
    return d / "trunc.pt"


def _foreign(d):
    torch.save({"weights": torch.zeros(3)}, d / "foreign.pt")
    return d / "foreign.pt"


def test_demo_runs_end_to_end(tmp_path):
    from codicodec_flow.commands.demo import run_demo
    paths = run_demo(str(tmp_path / "demo"), "cpu", songs=3, song_seconds=6.0, steps=4, prompt_seconds=2.0,
                     continue_seconds=1.5)
    assert paths["spectrogram"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sf.info(str(paths["continuation"])).frames == 3 * CHUNK
    assert sf.info(str(paths["prompt"])).frames == 2 * CHUNK
    assert load_checkpoint(tmp_path / "demo" / "run" / "ema.pt")["config"]["model"]["mark_own"]  # train's defaults


def _code(fn, *args) -> int:
    try:
        return fn(*args)
    except SystemExit as exc:  # argparse refuses a flag's value with status 2
        return exc.code


@pytest.fixture
def no_work(monkeypatch):
    """Loading the checkpoint (the start of any work) fails the test: refusals must come before it."""
    import codicodec_flow.commands.sample as sample_cmd

    def forbidden(*a, **k):
        raise AssertionError("work started before the flags were checked")

    monkeypatch.setattr(sample_cmd, "load_bundle", forbidden)


@pytest.mark.parametrize("flag, value, said", [
    ("--duration-s", "nan", "finite number"), ("--duration-s", "inf", "finite number"),
    ("--duration-s", "1e9", "at most 14400"), ("--duration-s", "-1", "more than 0"),
    ("--temperature", "nan", "finite number"), ("--cfg-scale", "inf", "finite number"),
    ("--context-noise", "nan", "finite number"), ("--schedule-shift", "-inf", "finite number"),
    ("--prompt-noise", "nan", "finite number"), ("--prompt-noise", "1.5", "--prompt-noise must lie in [0, 1)"),
])
def test_non_finite_and_absurd_numbers_are_refused_up_front(ckpt, tmp_path, capsys, no_work, flag, value, said):
    assert _code(sample, ckpt, tmp_path / "o.wav", f"{flag}={value}") == 2
    err = capsys.readouterr().err
    assert said in err and flag in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [
    ["realtime", "--sink", "null", "--max-chunks", "1", "--temperature", "nan"],
    ["eval", "--data-dir", "x", "--cfg-scale", "inf"],
    ["train", "--data-dir", "x", "--out-dir", "y", "--lr", "nan"],
    ["preprocess", "--in-dir", "x", "--out-dir", "y", "--max-seconds", "inf"],
])
def test_every_command_refuses_non_finite_floats(ckpt, capsys, command):
    extra = ["--ckpt", str(ckpt)] if command[0] in ("realtime", "eval") else []
    assert _code(main, [*command, *extra]) == 2
    assert "must be a finite number" in capsys.readouterr().err


def test_library_refuses_non_finite_settings_and_never_writes_non_finite_audio(ckpt, tmp_path, monkeypatch):
    from codicodec_flow.commands.sample import run_sample
    from codicodec_flow.config import SampleConfig
    from codicodec_flow.errors import FlowError
    from codicodec_flow.generate import StreamGenerator
    with pytest.raises(FlowError, match="--temperature nan"):
        run_sample(str(ckpt), str(tmp_path / "a.wav"), SampleConfig(temperature=float("nan")), device="cpu")
    monkeypatch.setattr(StreamGenerator, "generate", lambda self, n, progress=None: torch.full((1, n, 8, 64), float("nan")))
    with pytest.raises(FlowError, match="generation produced NaN or infinite latents"):
        run_sample(str(ckpt), str(tmp_path / "b.wav"), SampleConfig(), duration_s=1.0, device="cpu")
    assert list(tmp_path.iterdir()) == []  # no garbage WAV, no latents


@pytest.mark.parametrize("make, said", [
    (lambda d: (d / "song.wav").mkdir() or d / "song.wav", "is a folder"),
    (lambda d: d / ("n" * 252 + ".wav"), "file name is 256 bytes long"),
    (lambda d: d / ("n" * 246 + ".wav"), "latents.pt: the file name is 257 bytes long"),  # the WAV fits, its latents not
    (lambda d: (d / "file").write_text("") or d / "file" / "o.wav", "cannot write there"),
])
def test_output_path_is_checked_before_generating(ckpt, tmp_path, capsys, no_work, make, said):
    assert sample(ckpt, make(tmp_path), "--duration-s", 1.0) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err


def test_sample_says_which_step_it_loaded(ckpt, tmp_path, capsys):
    assert sample(ckpt, tmp_path / "o.wav", "--duration-s", 0.5) == 0
    assert f"loaded {ckpt} (step 7)" in capsys.readouterr().err
    assert load_shard(tmp_path / "o.latents.pt").meta["ckpt_step"] == 7


def test_int8_precision_from_the_command_line(ckpt, tmp_path):
    """--precision int8 reaches the generator: the stream differs slightly from fp32's, same length, finite."""
    outs = {}
    for precision in ("fp32", "int8"):
        assert sample(ckpt, tmp_path / f"{precision}.wav", "--duration-s", 1.4, "--precision", precision) == 0
        outs[precision] = sf.read(tmp_path / f"{precision}.wav")[0]
    assert outs["int8"].shape == outs["fp32"].shape
    assert 0 < abs(outs["int8"] - outs["fp32"]).max() < 0.5 * abs(outs["fp32"]).max()


def test_cuda_graphs_need_a_cuda_device(ckpt, tmp_path, capsys):
    assert sample(ckpt, tmp_path / "g.wav", "--duration-s", 1.0, "--cuda-graphs") == 2
    assert "--cuda-graphs needs a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "g.wav").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_sample_on_a_gpu(ckpt, tmp_path):
    out = [tmp_path / "eager.wav", tmp_path / "graphs.wav"]
    for path, extra in zip(out, ([], ["--cuda-graphs"])):
        assert main(["sample", "--ckpt", str(ckpt), "--out", str(path), "--device", "cuda", "--nfe", "4",
                     "--solver", "euler", "--duration-s", "2.0", "--seed", "3", *extra]) == 0
    a, b = (sf.read(p)[0] for p in out)
    assert a.shape == b.shape and abs(a - b).max() < 0.05 * abs(a).max()  # bf16 autocast on both
