"""Write-then-rename: every file dinoreg writes appears complete or not at all.

A temporary sibling (``.NAME.dinoreg-PID-XXXXXXXX.suffix``, same folder, so the rename is atomic)
is written and renamed into place only when complete; on any error it is removed. Renamed files
get the usual mode (``0666 & ~umask``), not ``mkstemp``'s 0600. Temporary folders are
``.dinoreg-PID-XXXXXXXX``. A process killed outright (SIGKILL) cannot remove its temporaries;
:func:`remove_stale_temporaries` removes those whose process is gone, and only names of this
pattern (never a user's file).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from dinoreg.errors import DinoregError

_TEMP_NAME = re.compile(r"^\.(?:.+\.)?dinoreg-(?P<pid>\d+)-[a-z0-9_]{8}(?:\..+)?$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_prefix(name: str = "") -> str:
    """The prefix of this process's temporaries: ``.NAME.dinoreg-PID-`` (``.dinoreg-PID-``
    without a name)."""
    return f".{name + '.' if name else ''}dinoreg-{os.getpid()}-"


def temporary_owner(name: str) -> int | None:
    """The process id in a dinoreg temporary's name, or ``None`` for any other name."""
    match = _TEMP_NAME.match(name)
    return int(match["pid"]) if match else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike, any_owner: bool = False) -> list[Path]:
    """Remove the dinoreg temporaries (files and folders) in ``folder`` left by processes that no
    longer run (``any_owner``: whatever their process, for a caller holding the folder's lock).
    Other names are never touched. Returns what was removed."""
    removed = []
    for entry in Path(folder).iterdir() if Path(folder).is_dir() else []:
        pid = temporary_owner(entry.name)
        if pid is None or (not any_owner and (pid == os.getpid() or _alive(pid))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def check_output_file(path: str | os.PathLike, suffixes: tuple[str, ...] | None = None,
                      what: str = "output") -> Path:
    """Check, before any work and without creating anything, that ``path`` can be written: not
    empty, not a folder, its folder exists and is writable, and (with ``suffixes``) one of them."""
    p = Path(path)
    if not str(path).strip():
        raise DinoregError(f"{what} path is empty", "-o")
    if suffixes is not None and not any(p.name.lower().endswith(s) for s in suffixes):
        raise DinoregError(f"{what} must end in {', '.join(suffixes)}", p)
    if p.is_dir():
        raise DinoregError(f"{what} is a directory (expected a file name)", p)
    parent = p.parent
    if not parent.exists():
        raise DinoregError("output directory does not exist", parent)
    if not parent.is_dir():
        raise DinoregError("output directory is not a directory", parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DinoregError("output directory is not writable", parent)
    return p


def atomic_dir(parent: str | os.PathLike) -> Path:
    """A new temporary folder inside ``parent`` (``.dinoreg-PID-XXXXXXXX``)."""
    return Path(tempfile.mkdtemp(prefix=temp_prefix(), dir=parent))


def atomic_path(path: str | os.PathLike) -> Path:
    """A new temporary sibling of ``path`` with the same suffixes (ordinary file mode)."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(p.name), suffix="".join(p.suffixes) or ".tmp", dir=p.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    return Path(tmp)


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Rename a finished temporary file into place with the ordinary file mode."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
    return Path(path)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_write(out) as tmp: write(tmp)`` -> ``out`` appears when the block succeeds;
    the temporary file is removed when it fails."""
    tmp = atomic_path(path)
    try:
        yield tmp
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str, fsync: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (``fsync`` before the rename on request)."""
    with atomic_write(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any, fsync: bool = True) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (fsync'd: used for "done" records)."""
    return write_text_atomic(path, json.dumps(obj, indent=2), fsync=fsync)
