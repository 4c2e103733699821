import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from codicodec_flow.data import shards
from codicodec_flow.latents import LatentStats
from codicodec_flow.commands.cli import main
from codicodec_flow.config import PreprocessConfig
from codicodec_flow.errors import DataError, FlowError
from codicodec_flow.data.preprocess import find_audio, run_preprocess, shard_path
from conftest import write_audio

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def messy(tmp_path):
    """A folder of mixed formats, rates and channel counts, plus broken and too-short files."""
    d = tmp_path / "audio"
    write_audio(d / "a_stereo48k.wav", 2.0)
    write_audio(d / "sub" / "b_mono44k.flac", 1.6, sr=44_100, channels=1)
    write_audio(d / "sub" / "deeper" / "c_22k.ogg", 1.5, sr=22_050, seed=1)
    write_audio(d / "d_quad96k.aiff", 1.4, sr=96_000, channels=4, seed=2)
    write_audio(d / "e_song.mp3", 1.5, sr=44_100, seed=3)
    write_audio(d / "long.wav", 5.0, seed=4)
    write_audio(d / "tiny.wav", 0.1)
    (d / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk" * 10)
    (d / "empty.flac").write_bytes(b"")
    (d / "notes.txt").write_text("not audio")
    (d / ".hidden.wav").write_bytes(b"")
    return d


def cfg(in_dir, out_dir, **kw):
    return PreprocessConfig(in_dir=str(in_dir), out_dir=str(out_dir), codec="spectral", device="cpu",
                            max_seconds=1.5, **kw)


def test_messy_folder(messy, tmp_path):
    out = tmp_path / "lat"
    report = run_preprocess(cfg(messy, out), plain=True)
    assert sorted(report.encoded) == ["a_stereo48k.wav", "d_quad96k.aiff", "e_song.mp3", "long.wav",
                                      "sub/b_mono44k.flac", "sub/deeper/c_22k.ogg"]
    failed = dict(report.failed)
    assert set(failed) == {"corrupt.wav", "empty.flac", "tiny.wav"}
    assert "shorter than one codec chunk" in failed["tiny.wav"]
    assert "notes.txt" not in failed and ".hidden.wav" not in failed
    # folder structure mirrored; 5 s at 1.5 s per shard (2 chunks) -> 7 chunks in shards of 2, 2, 2, 1
    s = shards.load_shard(out / "sub" / "deeper" / "c_22k.ogg.0000.npy")  # a new folder's storage: float32 arrays
    assert s.latents.shape == (2, 8, 64) and s.meta["source"] == "sub/deeper/c_22k.ogg"
    long = [shards.load_shard(shard_path(out, Path("long.wav"), i)) for i in range(4)]
    assert [x.latents.shape[0] for x in long] == [2, 2, 2, 1]
    assert [x.meta["start_s"] for x in long] == pytest.approx([0, 2 * 32768 / 48000, 4 * 32768 / 48000, 6 * 32768 / 48000])
    for key in ("segment", "duration_s", "chunks", "codec", "codec_version", "created_at", "source_sample_rate"):
        assert key in long[3].meta
    assert long[3].meta["codec"] == "spectral"
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["shards"]) == 4 + 5
    assert manifest["chunks"] == sum(e["chunks"] for e in manifest["shards"])
    stats = LatentStats.from_json(manifest["stats"])
    assert stats.mean.shape == (64,) and (stats.std > 0).all()
    all_lat = torch.cat([shards.load_shard(p).latents for p in shards.find_shards(out)]).reshape(-1, 64)
    torch.testing.assert_close(stats.mean, all_lat.mean(0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(stats.std, all_lat.std(0, unbiased=False), atol=1e-4, rtol=1e-3)


def test_segments_equal_whole_file(messy, tmp_path):
    """Splitting a long file by --max-seconds loses nothing: segments concatenate to the whole encode."""
    a = run_preprocess(cfg(messy, tmp_path / "split"), plain=True)
    b = run_preprocess(replace(cfg(messy, tmp_path / "whole"), max_seconds=300), plain=True)
    assert a.ok and b.ok
    split = torch.cat([shards.load_shard(shard_path(tmp_path / "split", Path("long.wav"), i)).latents for i in range(4)])
    whole = shards.load_shard(shard_path(tmp_path / "whole", Path("long.wav"), 0)).latents
    torch.testing.assert_close(split, whole, atol=1e-5, rtol=1e-5)


def test_resume_skips_and_overwrite_reencodes(messy, tmp_path):
    out = tmp_path / "lat"
    first = run_preprocess(cfg(messy, out), plain=True)
    mtimes = {p: p.stat().st_mtime_ns for p in shards.find_shards(out)}
    again = run_preprocess(cfg(messy, out), plain=True)
    assert again.encoded == [] and sorted(again.up_to_date) == sorted(first.encoded)
    assert {p: p.stat().st_mtime_ns for p in shards.find_shards(out)} == mtimes
    os.utime(messy / "a_stereo48k.wav", ns=(1, 1))  # the file changed: only it is re-encoded
    third = run_preprocess(cfg(messy, out), plain=True)
    assert third.encoded == ["a_stereo48k.wav"]
    forced = run_preprocess(cfg(messy, out, overwrite=True), plain=True)
    assert sorted(forced.encoded) == sorted(first.encoded)


def test_shrunk_file_drops_stale_segments(messy, tmp_path):
    out = tmp_path / "lat"
    run_preprocess(cfg(messy, out), plain=True)
    assert shard_path(out, Path("long.wav"), 3).exists()
    write_audio(messy / "long.wav", 3.0)  # 4 chunks: two shards instead of four
    run_preprocess(cfg(messy, out), plain=True)
    assert shard_path(out, Path("long.wav"), 1).exists() and not shard_path(out, Path("long.wav"), 2).exists()


@pytest.mark.parametrize("storage", ["pt", "float16"])
def test_interrupted_write_leaves_nothing_half_written(messy, tmp_path, monkeypatch, storage):
    import numpy as np
    out = tmp_path / "lat"
    run_preprocess(cfg(messy, out, storage=storage), plain=True)
    target = shard_path(out, Path("a_stereo48k.wav"), 0, storage)
    before = {p: p.read_bytes() for p in (target, target.with_suffix(".json")) if p.exists()}

    def truncate_and_die(path):
        Path(path).write_bytes(Path(path).read_bytes()[:100])  # truncated, then the process "dies"
        raise KeyboardInterrupt

    if storage == "pt":
        real_save = torch.save
        monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: (real_save(obj, f, *a, **k), truncate_and_die(f)))
    else:
        real_write = np.lib.format.write_array
        monkeypatch.setattr(np.lib.format, "write_array",
                            lambda fh, arr, *a, **k: (real_write(fh, arr, *a, **k), fh.flush(), truncate_and_die(fh.name)))
    with pytest.raises(KeyboardInterrupt):
        run_preprocess(cfg(messy, out, overwrite=True, storage=storage), plain=True)
    assert {p: p.read_bytes() for p in before} == before and len(before) == (1 if storage == "pt" else 2)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_split_across_workers_then_finalize(messy, tmp_path):
    single = tmp_path / "single"
    run_preprocess(cfg(messy, single), plain=True)
    parts = tmp_path / "parts"
    reports = [run_preprocess(cfg(messy, parts, num_shards=2, shard_index=i), plain=True) for i in range(2)]
    assert not set(reports[0].encoded) & set(reports[1].encoded)
    assert not (parts / "manifest.json").exists()
    assert main(["preprocess", "--in-dir", str(messy), "--out-dir", str(parts), "--finalize"]) == 0
    a = json.loads((single / "manifest.json").read_text())
    b = json.loads((parts / "manifest.json").read_text())
    assert [e["path"] for e in a["shards"]] == [e["path"] for e in b["shards"]]
    assert a["stats"]["mean"] == pytest.approx(b["stats"]["mean"], abs=1e-6)


def test_torchrun_style_launch_splits_by_rank(messy, tmp_path):
    """Two processes with torchrun's environment encode disjoint parts; rank 0 writes the manifest."""
    out = tmp_path / "lat"
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517",
           "PYTHONPATH": str(REPO / "src")}
    args = [sys.executable, "-m", "codicodec_flow", "preprocess", "--in-dir", str(messy), "--out-dir", str(out),
            "--codec", "spectral", "--device", "cpu", "--max-seconds", "1.5"]
    procs = [subprocess.Popen(args, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["shards"]) == 9


def test_missing_or_empty_in_dir(tmp_path, capsys):
    with pytest.raises(FlowError, match="does not exist"):
        run_preprocess(cfg(tmp_path / "nope", tmp_path / "o"))
    (tmp_path / "empty").mkdir()
    assert main(["preprocess", "--in-dir", str(tmp_path / "empty"), "--out-dir", str(tmp_path / "o"),
                 "--codec", "spectral"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --in-dir") and "no audio files" in err and "Traceback" not in err


def test_nothing_encodable_exits_nonzero(tmp_path, capsys):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "x.wav").write_bytes(b"garbage")
    write_audio(d / "y.wav", 0.2)
    code = main(["preprocess", "--in-dir", str(d), "--out-dir", str(tmp_path / "o"), "--codec", "spectral"])
    out = capsys.readouterr()
    assert code == 1 and "skipped x.wav" in out.out and "skipped y.wav" in out.out


def test_shards_never_unpickle_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"latents": torch.zeros(1, 8, 64), "meta": {"x": Evil()}}, tmp_path / "evil.pt")
    with pytest.raises(DataError, match="evil.pt"):
        shards.load_shard(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()
    torch.save({"latents": torch.zeros(3, 4, 64), "meta": {}}, tmp_path / "bad.pt")
    with pytest.raises(DataError, match=r"expected \(T, 8, 64\)"):
        shards.load_shard(tmp_path / "bad.pt")


def test_find_audio_order_is_stable(messy):
    files = [p.as_posix() for p in find_audio(messy)]
    assert files == sorted(files) and "notes.txt" not in files and ".hidden.wav" not in files


def test_entry_points(tmp_path):
    """`python -m codicodec_flow` and the root `python cli.py` expose the same commands."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    for args in ([sys.executable, "-m", "codicodec_flow", "--help"], [sys.executable, str(REPO / "cli.py"), "--help"]):
        out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "preprocess" in out.stdout and "smoke-test" in out.stdout


class LookaheadCodec:
    """A codec whose chunk encoding reads past the chunk's end, like CoDiCodec's last STFT frame."""
    name, version, lookahead_samples = "fake", "1", 1024

    def encode(self, wave):
        n = -(-wave.shape[1] // 32768)
        wave = torch.nn.functional.pad(wave, (0, n * 32768 + 1024 - wave.shape[1]))
        rows = [wave[:, i * 32768: (i + 1) * 32768 + 1024].abs().mean() for i in range(n)]
        return torch.stack(rows)[:, None, None].expand(n, 8, 64).contiguous() if rows else torch.zeros(0, 8, 64)


def test_segments_carry_the_codecs_lookahead(messy, tmp_path, monkeypatch):
    """Segment borders give the same latents as a whole-file encode even when chunks read ahead."""
    import codicodec_flow.data.preprocess as pp
    monkeypatch.setattr(pp, "load_codec", lambda *a, **k: LookaheadCodec())
    run_preprocess(cfg(messy, tmp_path / "split"), plain=True)
    run_preprocess(replace(cfg(messy, tmp_path / "whole"), max_seconds=300), plain=True)
    split = torch.cat([shards.load_shard(shard_path(tmp_path / "split", Path("long.wav"), i)).latents for i in range(4)])
    whole = shards.load_shard(shard_path(tmp_path / "whole", Path("long.wav"), 0)).latents
    torch.testing.assert_close(split, whole)


def test_smoke_test_command(capsys):
    assert main(["smoke-test", "--device", "cpu", "--codec", "spectral"]) == 0
    out = capsys.readouterr().out
    assert "codec round trip" in out and "FAIL" not in out


def test_links_loops_long_names_and_nan_audio_never_stop_the_run(tmp_path):
    """Broken links, link loops, a folder link back up, a second path to one file, a 244-character name and a
    file of NaN samples: each is encoded once or reported as skipped, and the files after them still encode."""
    import numpy as np
    import soundfile as sf
    d = tmp_path / "audio"
    write_audio(d / "good.wav", 1.5)
    write_audio(d / "sub" / "deep.wav", 1.5, seed=1)
    long_name = "L" * 240 + ".wav"
    write_audio(d / long_name, 1.5, seed=2)
    wave = np.full((48_000, 2), 0.1, np.float32)
    wave[30_000] = np.nan
    sf.write(str(d / "nan.wav"), wave, 48_000, subtype="FLOAT")
    write_audio(d / "zz_after.wav", 1.5, seed=3)  # sorted after the bad files
    (d / "dangling.wav").symlink_to("missing.wav")
    (d / "loop_a.wav").symlink_to("loop_b.wav")
    (d / "loop_b.wav").symlink_to("loop_a.wav")
    (d / "alias.wav").symlink_to("good.wav")  # the same audio under a second name
    (d / "sub" / "up").symlink_to("..")  # a folder loop: sub/up/sub/up/...
    (d / "a_link").symlink_to("sub")  # sorted before sub/, but the real path wins
    out = tmp_path / "lat"
    report = run_preprocess(cfg(d, out), plain=True)
    assert sorted(report.encoded) == sorted([long_name, "good.wav", "sub/deep.wav", "zz_after.wav"])
    failed = dict(report.failed)
    assert set(failed) == {"dangling.wav", "loop_a.wav", "loop_b.wav", "nan.wav", "alias.wav"}  # a_link/: seen as sub/
    assert "missing.wav, which does not exist" in failed["dangling.wav"]
    assert "loop of symbolic links" in failed["loop_a.wav"]
    assert "NaN or infinite samples" in failed["nan.wav"]
    assert "same file as good.wav" in failed["alias.wav"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(e["source"] for e in manifest["shards"]) == sorted(report.encoded)  # each audio once
    assert not [p for p in out.rglob("*") if {"up", "a_link"} & set(p.relative_to(out).parts)]


def test_codec_failure_on_one_file_skips_only_that_file(messy, tmp_path, monkeypatch):
    import codicodec_flow.data.preprocess as pp
    from codicodec_flow.codec import load_codec
    from codicodec_flow.errors import CodecError
    real = load_codec("spectral")

    class Picky:
        name, version = real.name, real.version

        def encode(self, wave):
            if wave.shape[1] > 200_000:  # long.wav, and only it
                raise CodecError("spectral codec: the waveform contains NaN or infinite samples")
            return real.encode(wave)

    monkeypatch.setattr(pp, "load_codec", lambda *a, **k: Picky())
    report = run_preprocess(replace(cfg(messy, tmp_path / "lat"), max_seconds=300), plain=True)
    assert "long.wav" in dict(report.failed) and "a_stereo48k.wav" in report.encoded and len(report.encoded) == 5


def test_stale_temporaries_of_a_killed_run_are_removed(messy, tmp_path):
    """kill -9 during a write leaves `.NAME.XXXXXXXX.tmp` beside the shard; the next run removes it (and only it)."""
    out = tmp_path / "lat"
    run_preprocess(cfg(messy, out), plain=True)
    left = out / "sub" / ".b_mono44k.flac.0000.pt.0123abcd.tmp"
    left.write_bytes(b"half a shard")
    os.utime(left, (1, 1))  # written long ago by a process that no longer runs
    mine = out / ".keep.tmp"
    mine.write_text("not ours")
    run_preprocess(cfg(messy, out), plain=True)
    assert not left.exists() and mine.exists()


def test_storage_auto_keeps_a_folders_own_and_another_converts_it(messy, tmp_path, capsys):
    """An older .pt folder stays .pt under the default (nothing re-encoded); --storage float16 converts its shards
    without re-encoding; --convert needs no audio; parallel parts may not convert; a new folder gets float32."""
    out = tmp_path / "lat"
    first = run_preprocess(cfg(messy, out, storage="pt"), plain=True)
    n = len(shards.find_shards(out))
    again = run_preprocess(cfg(messy, out), plain=True)  # auto
    assert again.encoded == [] and again.manifest["storage"] == "pt" and len(list(out.rglob("*.pt"))) == n
    with pytest.raises(FlowError, match="--convert float16 --out-dir"):
        run_preprocess(cfg(messy, out, storage="float16", num_shards=2), plain=True)
    half = run_preprocess(cfg(messy, out, storage="float16"), plain=True)
    assert half.encoded == [] and sorted(half.up_to_date) == sorted(first.encoded)  # converted, not re-encoded
    assert half.manifest["storage"] == "float16" and not list(out.rglob("*.pt"))
    assert {shards.shard_storage(p) for p in shards.find_shards(out)} == {"float16"} and len(shards.find_shards(out)) == n
    assert main(["preprocess", "--out-dir", str(out), "--convert", "float32"]) == 0
    assert "converted 9 shard(s) to float32" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["storage"] == "float32" and manifest["preprocess"]["in_dir"] == str(messy)  # the record is kept
    assert run_preprocess(cfg(messy, out), plain=True).encoded == []
    fresh = run_preprocess(cfg(messy, tmp_path / "new"), plain=True)
    assert fresh.manifest["storage"] == "float32" and shard_path(tmp_path / "new", Path("long.wav"), 3).exists()
    assert main(["preprocess", "--out-dir", str(out)]) == 2
    assert "--in-dir is needed" in capsys.readouterr().err


def test_float16_shards_match_float32_within_half_precision(messy, tmp_path):
    a = run_preprocess(cfg(messy, tmp_path / "f32"), plain=True)
    b = run_preprocess(cfg(messy, tmp_path / "f16", storage="float16"), plain=True)
    assert a.manifest["storage"] == "float32" and b.manifest["storage"] == "float16"
    x = torch.cat([shards.load_shard(p).latents for p in shards.find_shards(tmp_path / "f32")])
    y = torch.cat([shards.load_shard(p).latents for p in shards.find_shards(tmp_path / "f16")])
    assert ((x - y).abs() <= torch.clamp(x.abs() * 2.0 ** -11, min=2.0 ** -25)).all() and not torch.equal(x, y)
    size = lambda d: sum(p.stat().st_size for p in d.rglob("*.npy"))  # noqa: E731
    assert size(tmp_path / "f16") < 0.55 * size(tmp_path / "f32")
