"""Finding pretrained encoder weights on disk, or downloading them once.

Every encoder resolves its checkpoint through :func:`resolve_weights`, in this order:

1. an explicit path given by the user (``--weights`` / ``weights=``); a directory is searched
   for the accepted file names; a path that does not exist is an error (never a fallback);
2. ``$DINOREG_WEIGHTS_DIR/<name>``, also one level of sub-folders
   (``$DINOREG_WEIGHTS_DIR/*/<name>``);
3. the user cache: ``$XDG_CACHE_HOME/dinoreg/<name>`` (``~/.cache/dinoreg`` when unset), then
   torch hub's checkpoint folder (``torch.hub.get_dir()/checkpoints``, where
   ``torch.hub.load_state_dict_from_url`` puts the official files);
4. a download of the official URL into ``<cache>/dinoreg/<first name>`` with a progress bar,
   unless downloads are disabled (``download=False`` or ``DINOREG_OFFLINE=1``).

An encoder may accept several file names (e.g. the official ``dinov2_vits14_pretrain.pth`` and
a converted ``dinov2_vits14.safetensors``); every name is tried at each step before the next
step. When nothing is found a :class:`~dinoreg.errors.WeightsNotFoundError` with one line
names the file expected and the three ways of providing it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import torch

from dinoreg.errors import WeightsNotFoundError

ENV_DIR = "DINOREG_WEIGHTS_DIR"
ENV_OFFLINE = "DINOREG_OFFLINE"


def cache_dir() -> Path:
    """dinoreg's weight cache: ``$XDG_CACHE_HOME/dinoreg`` or ``~/.cache/dinoreg``."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "dinoreg"


def hub_checkpoint_dir() -> Path:
    """torch hub's checkpoint folder (``$TORCH_HOME/hub/checkpoints`` by default)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _names(filename: str | Sequence[str]) -> list[str]:
    names = [filename] if isinstance(filename, str) else list(filename)
    if not names:
        raise ValueError("resolve_weights needs at least one file name")
    return names


def _first_existing(folders: Sequence[Path], names: Sequence[str]) -> Path | None:
    for folder in folders:
        for name in names:
            candidate = folder / name
            if candidate.is_file():
                return candidate
    return None


def _from_explicit(explicit: str | os.PathLike, names: Sequence[str], encoder_name: str) -> Path:
    path = Path(explicit).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        found = _first_existing([path, *sorted(p for p in path.iterdir() if p.is_dir())], names)
        if found is not None:
            return found
        raise WeightsNotFoundError(
            f"no {encoder_name} weights ({' or '.join(names)}) in this folder", path)
    raise WeightsNotFoundError(f"{encoder_name} weights file does not exist", path)


def _from_env(env: str, names: Sequence[str]) -> Path | None:
    value = os.environ.get(env)
    if not value:
        return None
    root = Path(value).expanduser()
    if not root.is_dir():
        return None
    return _first_existing([root, *sorted(p for p in root.iterdir() if p.is_dir())], names)


def downloads_allowed(download: bool | None) -> bool:
    """``download`` if given, else True unless ``$DINOREG_OFFLINE`` is set to a true value."""
    if download is not None:
        return download
    return os.environ.get(ENV_OFFLINE, "").strip().lower() not in ("1", "true", "yes", "on")


def _download(url: str, target: Path, progress: bool,
              fetch: Callable[..., None] | None) -> Path | None:
    """Download ``url`` to ``target``; None when it fails (offline, HTTP error, disk)."""
    fetch = fetch or torch.hub.download_url_to_file
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fetch(url, str(target), progress=progress)
    except Exception:  # noqa: BLE001 - any failure means "not available", reported below
        target.unlink(missing_ok=True)
        return None
    return target if target.is_file() else None


def resolve_weights(encoder_name: str, filename: str | Sequence[str],
                    explicit: str | os.PathLike | None = None, url: str | None = None,
                    env: str = ENV_DIR, *, download: bool | None = None, progress: bool = True,
                    fetch: Callable[..., None] | None = None) -> Path:
    """Locate (or download) the weights of one encoder.

    Args:
        encoder_name: used in messages, e.g. ``"dinov2 vits14"``.
        filename: accepted file name(s); the first is the download name.
        explicit: a file or folder the user named; it must exist.
        url: official download URL, or None when the weights cannot be downloaded.
        env: environment variable naming a weights folder.
        download: allow the download step; None means "unless ``$DINOREG_OFFLINE`` is set".
        progress: show a download progress bar.
        fetch: replacement for ``torch.hub.download_url_to_file(url, dst, progress=...)``
            (tests).

    Returns:
        Path of an existing file.

    Raises:
        WeightsNotFoundError: nothing found and no download possible (one line).
    """
    names = _names(filename)
    if explicit is not None:
        return _from_explicit(explicit, names, encoder_name)
    found = _from_env(env, names) or _first_existing([cache_dir(), hub_checkpoint_dir()], names)
    if found is not None:
        return found
    if url is not None and downloads_allowed(download):
        got = _download(url, cache_dir() / names[0], progress, fetch)
        if got is not None:
            return got
    where = f"download {url} (failed or disabled) into {cache_dir()}" if url else \
        f"put it in {cache_dir()}"
    raise WeightsNotFoundError(
        f"{encoder_name} weights not found: expected {' or '.join(names)}; "
        f"pass --weights PATH, set ${env} to a folder holding it, or {where}")
