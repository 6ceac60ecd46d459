"""User-facing errors.

Every problem caused by the user's input (a missing file, a 2D array where a volume was
expected, NaN voxels, an unknown encoder, weights not found, ...) is raised as a
:class:`DinoregError` whose message is one line naming the file (or option) and the problem.
The CLI prints that line and exits with a non-zero status; the Python API lets it propagate.
"""

from __future__ import annotations

import os


class DinoregError(Exception):
    """An input or configuration problem the user can fix; the message is one line."""

    def __init__(self, message: str, path: str | os.PathLike | None = None) -> None:
        text = f"{os.fspath(path)}: {message}" if path is not None else message
        super().__init__(" ".join(text.split()))
        self.path = None if path is None else os.fspath(path)


class WeightsNotFoundError(DinoregError):
    """Pretrained encoder weights could not be resolved."""
