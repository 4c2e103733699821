"""Atomic writes, their temporaries (names that fit, leftovers of killed writers) and safe loads."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from codicodec_flow.checkpoint import load_checkpoint
from codicodec_flow.data.shards import load_shard
from codicodec_flow.errors import CheckpointError, DataError, FlowError
from codicodec_flow.util.fsutil import (atomic_path, check_writable, is_temporary, remove_stale_temporaries,
                                        temporary_name)

REPO = Path(__file__).resolve().parents[1]


class Evil:
    def __reduce__(self):
        return (os.system, ("true",))


@pytest.mark.parametrize("loader, error, what", [(load_shard, DataError, "latent shard"),
                                                 (load_checkpoint, CheckpointError, "checkpoint")])
def test_unsafe_pickles_are_refused_without_suggesting_unsafe_loading(tmp_path, loader, error, what):
    torch.save({"format": 1, "config": {}, "latents": torch.zeros(1, 8, 64), "meta": {"x": Evil()}}, tmp_path / "e.pt")
    (tmp_path / "garbage.pt").write_bytes(b"garbage" * 10)
    for name in ("e.pt", "garbage.pt"):
        with pytest.raises(error) as exc:
            loader(tmp_path / name)
        text = str(exc.value)
        assert name in text and f"not a codicodec-flow {what}" in text and "refused for safety" in text
        assert "weights_only" not in text and "trusted source" not in text, text
    with pytest.raises(error, match=r"\(posix.system\)|\(nt.system\)"):  # names what was refused
        loader(tmp_path / "e.pt")


def test_temporary_names_fit_the_file_system_whatever_the_target():
    for target in ("a.wav", "x" * 244 + ".wav.0000.pt", "é" * 200, "y" * 255):
        name = temporary_name(target)
        assert len(os.fsencode(name)) <= 255 and is_temporary(name), name
        assert name.startswith("." + target[:5])
    assert not is_temporary(".notes.tmp") and not is_temporary("song.12345678.tmp")


def test_atomic_write_to_a_long_name(tmp_path):
    target = tmp_path / ("z" * 250 + ".pt")  # fits (255 bytes), its old temporary name did not
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"data")
    assert target.read_bytes() == b"data" and os.listdir(tmp_path) == [target.name]


def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_leftovers_of_a_killed_writer_are_removed_and_live_writes_kept(tmp_path):
    """A process killed with SIGKILL inside atomic_path leaves its temporary; the next cleanup removes it, but not
    a temporary another writer still holds, a fresh one, or a user's file that only looks similar."""
    (tmp_path / "sub").mkdir()
    code = ("import os, signal, sys\nfrom codicodec_flow.util.fsutil import atomic_path\n"
            "with atomic_path(sys.argv[1]) as tmp:\n    tmp.write_bytes(b'half')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "sub" / "shard.pt")],
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")}, timeout=60)
    assert proc.returncode == -9
    dead, = [p for p in (tmp_path / "sub").iterdir() if is_temporary(p.name)]
    user = tmp_path / ".notes.tmp"
    user.write_text("mine")
    assert remove_stale_temporaries(tmp_path, recursive=True) == []  # seconds old: it could be a writer starting
    _age(dead, 60)
    assert remove_stale_temporaries(tmp_path) == []  # not recursive: the sub-folder is not looked at
    with atomic_path(tmp_path / "live.pt") as live:
        live.write_bytes(b"in progress")
        _age(live, 3600)
        _age(user, 3600)
        assert remove_stale_temporaries(tmp_path, recursive=True) == [dead]
        assert live.exists() and user.exists()
    assert (tmp_path / "live.pt").read_bytes() == b"in progress"


def test_output_paths_are_checked_before_any_work(tmp_path):
    with pytest.raises(FlowError, match="is a folder"):
        check_writable(tmp_path)
    with pytest.raises(FlowError, match="file name is 304 bytes long"):
        check_writable(tmp_path / ("n" * 300 + ".wav"))
    (tmp_path / "file").write_text("")
    with pytest.raises(FlowError, match="cannot write there"):
        check_writable(tmp_path / "file" / "out.wav")
    assert check_writable(tmp_path / "new" / "out.wav") == tmp_path / "new" / "out.wav"
    assert os.listdir(tmp_path / "new") == []  # the probe leaves nothing behind


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_folder_is_refused(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o500)
    with pytest.raises(FlowError, match="cannot write there"):
        check_writable(tmp_path / "ro" / "out.wav")
