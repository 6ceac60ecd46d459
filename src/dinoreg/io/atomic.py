"""Write-then-rename: every file dinoreg writes appears complete or not at all.

A temporary sibling (``.NAME.XXXX.suffix``, same folder, so the rename is atomic) is written
and renamed into place only when complete; on any error it is removed. Renamed files get the
usual mode (``0666 & ~umask``), not ``mkstemp``'s 0600.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_path(path: str | os.PathLike) -> Path:
    """A new temporary sibling of ``path`` with the same suffixes (ordinary file mode)."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix="".join(p.suffixes) or ".tmp", dir=p.parent)
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
