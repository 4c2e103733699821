"""Presets: a whole control state saved under a name as a small JSON file, recalled (or morphed to) live.

A preset is `DIR/NAME.json`: {"format": 1, "name": NAME, "controls": {...}} where the controls are
what state.Controls.preset_json() writes (every control but the display events, LFOs included).
Files are written atomically (util.fsutil), so a crash never leaves half a preset; they are read as
plain JSON and every value goes through state.apply_message's checks on recall, so a hand-edited
file can be wrong but never harmful. Names are kept to safe file names: letters, digits, '_', '-',
'.' and spaces, 1..64 characters, not starting with '.' or a space.

The folder defaults to the user's config folder ($XDG_CONFIG_HOME/codicodec-flow/presets, else
~/.config/codicodec-flow/presets), so presets follow the performer from one checkpoint to the next;
`realtime --presets DIR` picks another. It is created on the first save.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..errors import FlowError
from ..util.fsutil import write_text_atomic

FORMAT = 1
NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_. -]{0,63}")
MAX_BYTES = 256 * 1024  # a preset is a few kB; anything far bigger is not one


def default_dir() -> Path:
    """Where presets live unless --presets says otherwise."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "codicodec-flow" / "presets"


def name_problem(name: object) -> str | None:
    """Why `name` cannot name a preset (what is wrong with it, then the rule), or None if it can."""
    if isinstance(name, str) and NAME.fullmatch(name) and not name.endswith((" ", ".")):
        return None
    if not isinstance(name, str):
        why = f"{name!r:.40} is a {type(name).__name__}, not text"
    elif not name:
        why = "it is empty"
    elif len(name) > 64:
        why = f"{name[:20]!r}... has {len(name)} characters"
    else:
        bad = sorted({ch for ch in name if not (ch.isascii() and (ch.isalnum() or ch in "_-. "))})
        why = f"{name!r}: " + (f"{', '.join(map(repr, bad))} cannot be in a name" if bad else
                               f"it starts with {name[0]!r}" if name[0] in ". " else f"it ends with {name[-1]!r}")
    return (f"bad preset name ({why}); a preset name is 1..64 letters, digits, '_', '-', '.' or spaces, not "
            f"starting with '.' or a space nor ending with one")


class PresetStore:
    """The presets in one folder."""

    def __init__(self, folder: str | Path | None = None):
        self.folder = Path(folder) if folder is not None else default_dir()

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def names(self) -> list[str]:
        """Every preset's name, sorted (case-insensitively); [] when the folder does not exist yet."""
        try:
            found = [p.stem for p in self.folder.iterdir() if p.suffix == ".json" and p.is_file()]
        except OSError:
            return []
        return sorted((n for n in found if name_problem(n) is None), key=lambda n: (n.lower(), n))

    def get(self, name: str) -> dict | None:
        """The controls saved under `name` (unchecked: apply_message checks them), or None if there is none.

        FlowError names the file if it exists but is not a preset."""
        path = self.path(name)
        if not path.is_file():
            return None
        try:
            if path.stat().st_size > MAX_BYTES:
                raise ValueError(f"larger than {MAX_BYTES // 1024} KiB")
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            raise FlowError(f"{path}: not a readable preset ({exc}); save it again or delete the file") from None
        if not isinstance(obj, dict) or obj.get("format") != FORMAT or not isinstance(obj.get("controls"), dict):
            raise FlowError(f"{path}: not a codicodec-flow preset (format {FORMAT}); save it again or delete it")
        return obj["controls"]

    def save(self, name: str, controls: dict) -> Path:
        """Write (or overwrite) preset `name` atomically; FlowError naming the folder if it cannot be written."""
        path = self.path(name)
        text = json.dumps({"format": FORMAT, "name": name, "controls": controls}, indent=1) + "\n"
        try:
            write_text_atomic(text, path)
        except OSError as exc:
            raise FlowError(f"cannot save preset {name!r} in {self.folder} ({exc.strerror or exc}); choose a "
                            f"folder you can write to with --presets DIR") from None
        return path

    def delete(self, name: str) -> bool:
        """Remove preset `name`; False if there was none."""
        try:
            self.path(name).unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise FlowError(f"cannot delete preset {name!r} from {self.folder} ({exc.strerror or exc})") from None
        return True
