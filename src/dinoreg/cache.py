"""On-disk feature cache: encoder outputs keyed by image content, encoder and settings.

A key is a SHA-256 over the image array (bytes, shape, dtype), the encoder name, its settings
(JSON, sorted keys) and the content hash of its weights file, so a changed image, setting or
checkpoint never returns stale features. Entries are ``torch.save`` files under
``root/<k[:2]>/<k>.pt``, written to a temporary name and renamed into place (readers never see
a partial file; two workers computing the same key both write, the last rename wins with
identical content). The total size is bounded: after each ``put`` the least recently *used*
entries (modification time, refreshed on every hit) are removed until the cache fits.

Activation is process-wide so encoders need no extra argument::

    with use_cache("/tmp/feats", max_bytes=2 * 2**30):
        dinoreg.register(...)           # encoders call cached(...) internally

or set ``DINOREG_CACHE_DIR`` (and optionally ``DINOREG_CACHE_SIZE_GB``, default 10).
An encoder wraps its per-image work as
``feats = cached(image, "dinov2", settings, weights_path, lambda: encode(image))``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch

from dinoreg.errors import DinoregError

ENV_DIR = "DINOREG_CACHE_DIR"
ENV_SIZE = "DINOREG_CACHE_SIZE_GB"
DEFAULT_MAX_BYTES = 10 * 2**30
_SUFFIX = ".pt"

_ACTIVE: "FeatureCache | None" = None
_ACTIVE_SET = False  # True inside use_cache(), even use_cache(None): the env var is then ignored
_WEIGHT_HASHES: dict[tuple[str, int, int], str] = {}


def file_hash(path: str | os.PathLike) -> str:
    """SHA-256 of a file's content (memoised per path, size and mtime: weights are large)."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise DinoregError(f"cannot read weights file for the cache key ({exc.strerror})", p) from exc
    memo = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _WEIGHT_HASHES:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _WEIGHT_HASHES[memo] = h.hexdigest()
    return _WEIGHT_HASHES[memo]


def cache_key(array: Any, encoder: str, settings: Mapping[str, Any] | None = None,
              weights: str | os.PathLike | None = None) -> str:
    """The cache key (64 hex characters) of one encoding.

    Args:
        array: the image exactly as the encoder receives it (numpy array or tensor).
        encoder: encoder name (``dinov2``, ``dino3d``, ...).
        settings: every option that changes the output (slicing axis, stride, PCA rank, ...);
            JSON-serialisable, other values are hashed through ``str``.
        weights: the weights file (hashed by content), or ``None``.
    """
    arr = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    arr = np.ascontiguousarray(arr)
    h = hashlib.sha256()
    h.update(f"{arr.dtype.str}|{arr.shape}|".encode())
    h.update(arr.tobytes())
    h.update(f"|{encoder}|".encode())
    h.update(json.dumps(dict(settings or {}), sort_keys=True, default=str).encode())
    h.update(b"|" + (file_hash(weights).encode() if weights is not None else b"-"))
    return h.hexdigest()


class FeatureCache:
    """A size-bounded directory of tensors keyed by :func:`cache_key`.

    Args:
        root: cache directory (created).
        max_bytes: size limit; least recently used entries are evicted beyond it.
        half: store floating tensors as float16 (half the disk); :meth:`get` returns them in
            their original dtype.
    """

    def __init__(self, root: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES, half: bool = False) -> None:
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self.half = half
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DinoregError(f"cannot create the feature cache ({exc.strerror})", self.root) from exc

    def path(self, key: str) -> Path:
        """Where the entry of ``key`` lives."""
        if len(key) < 3 or not all(c in "0123456789abcdef" for c in key):
            raise DinoregError(f"invalid cache key {key!r}", self.root)
        return self.root / key[:2] / f"{key}{_SUFFIX}"

    def get(self, key: str) -> torch.Tensor | None:
        """The stored tensor (on the CPU), or ``None`` on a miss. A hit refreshes its LRU time."""
        p = self.path(key)
        try:
            entry = torch.load(p, map_location="cpu", weights_only=True)
            os.utime(p)
        except FileNotFoundError:
            return None
        except Exception:  # unreadable (should not happen with atomic writes): drop it, recompute
            p.unlink(missing_ok=True)
            return None
        tensor = entry["tensor"]
        return tensor.to(getattr(torch, entry["dtype"])) if entry["dtype"] != str(tensor.dtype)[6:] else tensor

    def put(self, key: str, tensor: torch.Tensor) -> Path:
        """Store ``tensor`` under ``key`` atomically, then evict to fit ``max_bytes``."""
        p = self.path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        t = tensor.detach().cpu().contiguous()
        dtype = str(t.dtype)[len("torch."):]
        if self.half and t.is_floating_point():
            t = t.half()
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=p.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save({"tensor": t, "dtype": dtype}, fh)
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.evict()
        return p

    def entries(self) -> list[tuple[float, int, Path]]:
        """``(last use, bytes, path)`` of every entry, oldest first."""
        out = []
        for p in self.root.glob(f"??/*{_SUFFIX}"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            out.append((st.st_mtime, st.st_size, p))
        return sorted(out)

    def size(self) -> int:
        """Total bytes of the stored entries."""
        return sum(size for _, size, _ in self.entries())

    def evict(self) -> int:
        """Remove least recently used entries until the cache fits; returns bytes freed.

        One process evicts at a time (a lock file); the others skip, since it frees for all.
        """
        with open(self.root / ".evict.lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0
            entries = self.entries()
            total = sum(size for _, size, _ in entries)
            freed = 0
            for _, size, p in entries:
                if total - freed <= self.max_bytes:
                    break
                p.unlink(missing_ok=True)
                freed += size
            return freed


@contextlib.contextmanager
def use_cache(root: str | os.PathLike | None, max_bytes: int = DEFAULT_MAX_BYTES,
              half: bool = False) -> Iterator["FeatureCache | None"]:
    """Activate a cache for this process inside the ``with`` block (``root=None`` disables it,
    also overriding ``DINOREG_CACHE_DIR``)."""
    global _ACTIVE, _ACTIVE_SET
    previous = (_ACTIVE, _ACTIVE_SET)
    _ACTIVE = FeatureCache(root, max_bytes, half) if root is not None else None
    _ACTIVE_SET = True
    try:
        yield _ACTIVE
    finally:
        _ACTIVE, _ACTIVE_SET = previous


def activate(root: str | os.PathLike | None, max_bytes: int = DEFAULT_MAX_BYTES, half: bool = False) -> None:
    """Activate a cache for the rest of this process (worker initialisers)."""
    global _ACTIVE, _ACTIVE_SET
    _ACTIVE = FeatureCache(root, max_bytes, half) if root is not None else None
    _ACTIVE_SET = True


def active_cache() -> FeatureCache | None:
    """The cache in effect: the one from :func:`use_cache`, else ``DINOREG_CACHE_DIR``, else None."""
    if _ACTIVE_SET:
        return _ACTIVE
    root = os.environ.get(ENV_DIR)
    if not root:
        return None
    try:
        gb = float(os.environ.get(ENV_SIZE, DEFAULT_MAX_BYTES / 2**30))
    except ValueError as exc:
        raise DinoregError(f"{ENV_SIZE} must be a number of gigabytes") from exc
    return FeatureCache(root, int(gb * 2**30))


def cached(array: Any, encoder: str, settings: Mapping[str, Any] | None, weights: str | os.PathLike | None,
           compute: Callable[[], torch.Tensor], device: torch.device | str | None = None) -> torch.Tensor:
    """``compute()``, or its stored result when the active cache holds this key.

    Without an active cache this is just ``compute()``. On a hit the tensor is moved to
    ``device`` (default: left on the CPU); on a miss the computed tensor is stored and returned
    unchanged.
    """
    cache = active_cache()
    if cache is None:
        return compute()
    key = cache_key(array, encoder, settings, weights)
    hit = cache.get(key)
    if hit is not None:
        return hit.to(device) if device is not None else hit
    tensor = compute()
    cache.put(key, tensor)
    return tensor
