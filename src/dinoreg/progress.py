"""Progress bars for long work (tqdm on stderr); ``enabled=False`` (``--quiet``) silences them."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

from tqdm.auto import tqdm


class Progress:
    """One bar per stage: ``with progress.stage("adam", total=80) as step: ... step(1)``."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    @contextmanager
    def stage(self, name: str, total: int | None = None) -> Iterator:
        bar = tqdm(total=total, desc=name, disable=not self.enabled, file=sys.stderr, leave=False,
                   dynamic_ncols=True)
        try:
            yield bar.update
        finally:
            bar.close()

    def log(self, message: str) -> None:
        if self.enabled:
            tqdm.write(message, file=sys.stderr)
