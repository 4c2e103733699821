"""Atomic file writes and safe loads: a killed process never leaves a truncated shard, checkpoint or WAV, and
opening a file never runs code from it.

A write goes to a hidden temporary `.PREFIX.XXXXXXXX.tmp` beside its target (PREFIX is the target's name, cut
so the whole name fits the file system's limit, 255 bytes on ext4, APFS and NTFS) and is renamed into place.
While it is written the temporary is locked (flock), so a later run can tell the leftover of a process killed
mid-write (unlocked) from a write still in progress, and `remove_stale_temporaries` deletes only the former.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import re
import secrets
import time
from pathlib import Path
from typing import Iterator

import torch

from ..errors import FlowError

try:
    import fcntl
except ImportError:  # Windows: no flock; stale temporaries are then told by their age alone
    fcntl = None

NAME_MAX = 255  # bytes in one file name, where the file system does not say
_TMP_TAIL = ".{}.tmp"  # filled with 8 hex digits
_TMP_NAME = re.compile(r"\..+\.[0-9a-f]{8}\.tmp", re.DOTALL)
UNLOCKED_STALE_S = 10.0  # a writer locks its temporary right after creating it: unlocked and this old is dead
UNLOCKABLE_STALE_S = 3600.0  # where the file system has no locks, only age tells


def name_max(folder: str | Path) -> int:
    """The longest file name (bytes) the file system of `folder`, or of its nearest existing parent, allows."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows) or no answer
        return NAME_MAX


def temporary_name(target: str, limit: int = NAME_MAX) -> str:
    """A fresh `.PREFIX.XXXXXXXX.tmp` for `target` that is at most `limit` bytes long."""
    tail = _TMP_TAIL.format(secrets.token_hex(4))
    prefix = target
    while prefix and len(os.fsencode(f".{prefix}{tail}")) > limit:
        prefix = prefix[:-1]
    return f".{prefix or 'x'}{tail}"


def _create_beside(path: Path) -> tuple[Path, int | None]:
    """Create and lock an empty, uniquely named hidden file in path's folder (permissions as the umask gives new
    files); its descriptor holds the lock until closed (None where locks are unavailable)."""
    limit = name_max(path.parent)
    while True:
        tmp = path.parent / temporary_name(path.name, limit)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 & ~umask, as open() does
        except FileExistsError:
            continue
        if fcntl is None:  # an open handle would block the rename on Windows
            os.close(fd)
            return tmp, None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a file system without locks: the temporary is judged by its age instead
            pass
        return tmp, fd


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, else removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, fd = _create_beside(path)
    try:
        yield tmp
        with open(tmp, "rb") as fh:  # data on disk before the rename makes it visible
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        if fd is not None:
            os.close(fd)  # releases the lock, after the temporary is gone


def is_temporary(name: str) -> bool:
    """Whether a file name has the form atomic_path gives its temporaries."""
    return _TMP_NAME.fullmatch(name) is not None


def remove_stale_temporaries(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Delete the temporaries that killed writes left in `folder` (and below it): only files named as atomic_path
    names them, that no process holds locked and that are older than UNLOCKED_STALE_S. Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    if recursive:
        listing = ((Path(d), names) for d, _, names in os.walk(folder))
    else:
        listing = iter([(folder, [p.name for p in folder.iterdir()])])
    removed = []
    for parent, names in listing:
        for name in names:
            path = parent / name
            if is_temporary(name) and _stale(path):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path)
    return removed


def _stale(path: Path) -> bool:
    try:
        st = path.lstat()
    except OSError:
        return False
    if not os.path.isfile(path) or os.path.islink(path):
        return False
    age = time.time() - st.st_mtime
    if fcntl is None:
        return age > UNLOCKABLE_STALE_S
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # a writer is at work
    except OSError:
        return age > UNLOCKABLE_STALE_S
    finally:
        os.close(fd)
    return age > UNLOCKED_STALE_S


def check_writable(path: str | Path) -> Path:
    """Refuse, before any work is done, an output file that could not be written: a folder, a name longer than
    the file system allows, a folder without write permission. Creates missing parent folders."""
    path = Path(path)
    limit = name_max(path.parent)
    size = len(os.fsencode(path.name))
    if size > limit:
        raise FlowError(f"{path}: the file name is {size} bytes long, the file system allows {limit}; "
                        f"choose a shorter name")
    if path.is_dir():
        raise FlowError(f"{path} is a folder; give a file name, e.g. {path / 'out.wav'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp, fd = _create_beside(path)
        if fd is not None:
            os.close(fd)
        tmp.unlink()
    except OSError as exc:
        raise FlowError(f"{path}: cannot write there ({exc.strerror or type(exc).__name__}); "
                        f"choose a folder you can write to") from None
    return path


def torch_save_atomic(obj, path: str | Path) -> None:
    """torch.save through a temporary file and a rename."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def write_text_atomic(text: str, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def load_error_reason(exc: BaseException) -> str:
    """Why a torch.load failed, in words that never suggest loading the file unsafely."""
    if isinstance(exc, pickle.UnpicklingError):
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        named = f" ({found.group(1)})" if found else ""
        return (f"it holds Python objects{named} or other data that are not plain tensors; they are refused "
                f"for safety, because unpickling them could run code from the file")
    line = (str(exc).strip().splitlines() or [""])[0][:200]
    if not line or "weights_only" in line:
        return type(exc).__name__
    return f"{type(exc).__name__}: {line}"


def load_tensors(path: str | Path, error: type[Exception], what: str, hint: str = ""):
    """torch.load with weights_only=True (a file can never run code); any failure -> error(message naming the file).

    what: the kind of file expected, e.g. "codicodec-flow checkpoint"; hint: what to do, appended."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise error(f"{path}: not a {what}: {load_error_reason(exc)}{hint}") from None
    except Exception as exc:
        raise error(f"{path}: not a readable {what}: unreadable or truncated ({load_error_reason(exc)}){hint}") from None
