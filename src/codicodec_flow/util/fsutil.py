"""Atomic file writes: a killed process never leaves a truncated shard, checkpoint or WAV."""
from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Iterator

import torch


def _create_beside(path: Path) -> Path:
    """Create an empty, uniquely named hidden file in path's folder, with the permissions the umask gives new files."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # 0o666 & ~umask, as open() does
            return tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, else removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_beside(path)
    try:
        yield tmp
        with open(tmp, "rb") as fh:  # data on disk before the rename makes it visible
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def torch_save_atomic(obj, path: str | Path) -> None:
    """torch.save through a temporary file and a rename."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def write_text_atomic(text: str, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def load_tensors(path: str | Path, error: type[Exception], what: str, hint: str = ""):
    """torch.load with weights_only=True (a file can never run code); any failure -> error(message naming the file)."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise error(f"{path}: not a readable {what} ({type(exc).__name__}: {reason}){hint}") from None
