"""Unlabelled training volumes for pretraining: listing, reading and per-modality scaling.

:func:`list_volumes` finds images in a folder (recursively: NIfTI, MHA/MHD, NRRD and DICOM
series folders) or in a Learn2Reg ``dataset.json``; files whose name or folder (relative to
the given root) has a ``seg``/``label(s)``/``mask(s)`` token are skipped - pretraining never reads
labels. :func:`preprocess` maps intensities to ``[0, 1]`` by the rule registration applies to its inputs
(:func:`dinoreg.preprocess.normalise`): CT (Hounsfield-looking: the 1st percentile below -500)
through a window ``level +- width/2``; anything else (MR, US) clipped at a high percentile of its
non-zero voxels (99.5 by default; DINO-Reg uses 97).
:func:`load_volumes` reads, scales and, when a volume has more than ``max_voxels`` voxels,
shrinks it by area averaging, keeping everything in memory as float32 tensors ``(I, J, K)``.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dinoreg.errors import DinoregError
from dinoreg.io.images import ITK_SUFFIXES, NIFTI_SUFFIXES, Image, load_image
from dinoreg.preprocess import Intensity, normalise

IMAGE_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
EXCLUDE_PATTERN = r"(labels?|segs?|segmentations?|masks?)(tr|ts|val)?"
JSON_IMAGE_KEYS = ("image", "fixed", "moving")


def _excluded(rel: Path, exclude: str) -> bool:
    """True when a name token (split at ``_ - .`` and spaces) of any part of ``rel`` matches."""
    tokens = [t for part in rel.parts for t in re.split(r"[_\-.\s]+", part.lower()) if t]
    return any(re.fullmatch(exclude, t) for t in tokens)


def _is_dicom_dir(path: Path) -> bool:
    """A folder whose first regular file carries the DICM magic at byte 128."""
    for child in sorted(path.iterdir()):
        if child.is_file():
            with open(child, "rb") as handle:
                handle.seek(128)
                return handle.read(4) == b"DICM"
    return False


def _list_folder(root: Path, exclude: str) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        here = Path(dirpath)
        if here != root and _excluded(here.relative_to(root), exclude):
            dirnames[:] = []
            continue
        if here != root and filenames and _is_dicom_dir(here):
            found.append(here)
            dirnames[:] = []
            continue
        for name in sorted(filenames):
            path = here / name
            if name.lower().endswith(IMAGE_SUFFIXES) and not _excluded(path.relative_to(root), exclude):
                found.append(path)
    return found


def _json_entries(data: object) -> list[str]:
    """All image paths named in a Learn2Reg ``dataset.json`` (lists of dicts or of strings)."""
    out: list[str] = []
    if not isinstance(data, dict):
        return out
    for value in data.values():
        if not isinstance(value, list):
            continue
        for item in value:
            if isinstance(item, dict):
                out += [item[k] for k in JSON_IMAGE_KEYS if isinstance(item.get(k), str)]
    return out


def _list_json(path: Path, exclude: str) -> list[Path]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DinoregError(f"cannot read dataset.json ({exc})", path) from exc
    seen: dict[Path, None] = {}
    for entry in _json_entries(data):
        p = (path.parent / entry).resolve()
        if not _excluded(Path(entry), exclude):
            seen.setdefault(p, None)
    return list(seen)


def list_volumes(source: str | os.PathLike, exclude: str = EXCLUDE_PATTERN) -> list[Path]:
    """Image files (and DICOM folders) for pretraining, sorted, labels excluded.

    Args:
        source: a folder (searched recursively) or a Learn2Reg ``dataset.json`` (its image,
            fixed and moving entries, resolved relative to the file).
        exclude: regular expression; a path (relative to ``source``) is skipped when a token of
            a file or folder name (split at ``_``, ``-``, ``.``, spaces; lower case) matches it in
            full. The default catches ``seg``, ``labels``, ``labelsTr``, ``masksTr``, ``mask``...
            but not ``totalsegmentator`` or ``labelreg``.

    Raises:
        DinoregError: ``source`` missing, or no image found.
    """
    src = Path(source)
    if not src.exists():
        raise DinoregError("pretraining data not found", src)
    if src.is_file() and src.name.lower().endswith(IMAGE_SUFFIXES):
        return [src]
    if src.is_dir() and _is_dicom_dir(src):
        return [src]
    paths = _list_json(src, exclude) if src.is_file() else _list_folder(src, exclude)
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise DinoregError("image listed in dataset.json not found", missing[0])
    if not paths:
        raise DinoregError("no NIfTI/MHA/NRRD/DICOM volumes found", src)
    return paths


def list_label_maps(sources: Sequence[str | os.PathLike]) -> list[Path]:
    """Label maps for synthetic contrasts: files given directly, and in folders (recursively) the
    NIfTI/MHA/NRRD files whose name or folder has a ``seg``/``label(s)``/``mask(s)`` token."""
    found: list[Path] = []
    for source in sources:
        src = Path(source)
        if not src.exists():
            raise DinoregError("label map not found", src)
        if src.is_file():
            found.append(src)
            continue
        for path in sorted(src.rglob("*")):
            if path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES) and \
                    _excluded(path.relative_to(src), EXCLUDE_PATTERN):
                found.append(path)
    if not found:
        raise DinoregError(f"no label maps found in {', '.join(map(str, sources))}")
    return found


def load_label_maps(paths: Sequence[Path], max_voxels: int = 2 ** 24, min_size: int = 8) -> list[torch.Tensor]:
    """Read integer label maps ``(I, J, K)`` (long), shrunk by nearest-neighbour striding when larger
    than ``max_voxels``; maps with an axis shorter than ``min_size`` or a single value are skipped."""
    out: list[torch.Tensor] = []
    for path in paths:
        image = load_image(path, dtype=None)
        lab = torch.from_numpy(np.rint(np.asarray(image.array, dtype=np.float64)).astype(np.int64))
        if min(lab.shape) < min_size or int(lab.max()) == int(lab.min()):
            warnings.warn(f"{path}: skipped as a label map (shape {tuple(lab.shape)}, values {int(lab.min())}"
                          f"..{int(lab.max())})")
            continue
        while lab.numel() > max_voxels:
            lab = lab[::2, ::2, ::2]
        out.append(lab.contiguous())
    if not out:
        raise DinoregError(f"no usable label map among {len(paths)} files")
    return out


def preprocess(array: np.ndarray, ct_window: tuple[float, float] = (50.0, 400.0),
               mr_percentile: float = 99.5, name: str = "<array>") -> np.ndarray:
    """Scale a volume to ``[0, 1]`` (float32) by the rule registration applies to its inputs
    (:func:`dinoreg.preprocess.normalise` with ``modality="auto"``), so the encoder is trained on
    what it will see: CT (Hounsfield-looking) by the window ``(level, width)``, anything else
    clipped at the ``mr_percentile`` of its non-zero voxels. A constant volume is rejected
    (:class:`DinoregError` naming ``name``).

    Args:
        array: intensities ``(I, J, K)``.
        ct_window: ``(level, width)`` in HU (50/400: abdominal soft tissue).
        mr_percentile: upper clipping percentile for other volumes.
    """
    return normalise(np.asarray(array), Intensity("auto", tuple(ct_window), mr_percentile), name)


def shrink(volume: torch.Tensor, max_voxels: int) -> torch.Tensor:
    """Downsample ``(I, J, K)`` by area averaging so it has at most ``max_voxels`` voxels."""
    if volume.numel() <= max_voxels:
        return volume
    factor = (volume.numel() / max_voxels) ** (1.0 / 3.0)
    size = tuple(max(1, int(s / factor)) for s in volume.shape)
    return F.interpolate(volume[None, None], size=size, mode="area")[0, 0]


def load_volumes(paths: list[Path], ct_window: tuple[float, float] = (50.0, 400.0),
                 mr_percentile: float = 99.5, max_voxels: int = 2 ** 24, min_size: int = 8,
                 progress: bool = True) -> list[torch.Tensor]:
    """Read, scale to ``[0, 1]`` and (if needed) shrink volumes; returns float32 ``(I, J, K)`` tensors.

    Volumes with an axis shorter than ``min_size`` voxels (e.g. 2D images) are skipped with a
    warning. Raises :class:`DinoregError` when a file cannot be read or nothing usable remains.
    """
    from tqdm import tqdm

    out: list[torch.Tensor] = []
    for path in tqdm(paths, desc="reading volumes", disable=not progress):
        image: Image = load_image(path)
        if min(image.shape) < min_size:
            warnings.warn(f"{path}: skipped, shape {image.shape} has an axis shorter than {min_size}")
            continue
        vol = torch.from_numpy(preprocess(image.array, ct_window, mr_percentile, str(path)))
        out.append(shrink(vol, max_voxels).contiguous())
    if not out:
        raise DinoregError(f"no usable volume among {len(paths)} files (all smaller than {min_size} voxels)")
    return out
