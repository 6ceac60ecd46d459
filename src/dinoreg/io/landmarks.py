"""Landmark files: CSV point lists converted to voxel coordinates of an image.

A landmark file holds one point per row, columns separated by ``,`` (or by whitespace), with
an optional header row and ``#`` comment lines. Rows are ``i,j,k`` (voxel coordinates, the
Learn2Reg keypoint convention) or ``x,y,z`` world millimetres, in RAS (nibabel) or LPS
(ITK, e.g. BraTS-Reg and most ``.fcsv``-derived tables). A leading id column is accepted when
there are exactly 4 columns (BraTS-Reg's ``Landmark,X,Y,Z``); with more columns, the header
must name the coordinate columns (``x,y,z`` or ``i,j,k``, case-insensitive).

World points are converted through the image's voxel-to-RAS affine (LPS = RAS with x and y
negated). The returned voxel coordinates are ``(N, 3)`` float64 in ``[i, j, k]`` order, each
inside the image's extent ``[-0.5, n - 0.5]`` along every axis.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from dinoreg.errors import DinoregError
from dinoreg.io.atomic import atomic_write
from dinoreg.io.images import Image

SPACES = ("voxel", "ras", "lps")
_LPS = np.array([-1.0, -1.0, 1.0])
_NAMES = {"voxel": ("i", "j", "k"), "ras": ("x", "y", "z"), "lps": ("x", "y", "z")}


def _split(line: str) -> list[str]:
    line = line.strip()
    if "," in line:
        return [f.strip() for f in line.split(",")]
    return line.split()


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _rows(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, fields) of every non-empty, non-comment line."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DinoregError("landmark file not found", path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DinoregError(f"cannot read landmark file ({exc})", path) from exc
    return [(n, _split(line)) for n, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.lstrip().startswith("#")]


def _coordinate_columns(header: list[str] | None, ncols: int, path: Path) -> list[int]:
    """Indices of the three coordinate columns."""
    if header is not None:
        names = [re.sub(r"[^a-z]", "", h.lower()) for h in header]
        for triple in (("x", "y", "z"), ("i", "j", "k")):
            if all(t in names for t in triple):
                return [names.index(t) for t in triple]
    if ncols == 3:
        return [0, 1, 2]
    if ncols == 4:
        return [1, 2, 3]
    raise DinoregError(f"expected 3 coordinate columns (or an id and 3 coordinates), found {ncols} columns; "
                       "with more columns the header must name x,y,z or i,j,k", path)


def read_landmark_table(path: str | os.PathLike) -> np.ndarray:
    """The ``(N, 3)`` coordinates exactly as written in a landmark CSV (no conversion)."""
    p = Path(path)
    rows = _rows(p)
    header = None
    if rows and not all(_is_number(f) for f in rows[0][1]):
        header = rows.pop(0)[1]
    if not rows:
        raise DinoregError("landmark file holds no points", p)
    ncols = len(header) if header is not None else len(rows[0][1])
    cols = _coordinate_columns(header, ncols, p)
    points = []
    for line, fields in rows:
        if len(fields) != ncols:
            raise DinoregError(f"line {line} has {len(fields)} columns, expected {ncols}", p)
        try:
            points.append([float(fields[c]) for c in cols])
        except ValueError:
            raise DinoregError(f"line {line} is not numeric: {','.join(fields)!r}", p) from None
    points_arr = np.asarray(points, dtype=np.float64)
    if not np.isfinite(points_arr).all():
        raise DinoregError("landmark file holds NaN or infinite coordinates", p)
    return points_arr


def world_to_voxel(points: np.ndarray, affine: np.ndarray, space: str = "ras") -> np.ndarray:
    """World points ``(N, 3)`` in mm (``ras`` or ``lps``) to voxel coordinates of ``affine``."""
    pts = np.asarray(points, dtype=np.float64) * (_LPS if space == "lps" else 1.0)
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    return pts @ inv[:3, :3].T + inv[:3, 3]


def voxel_to_world(points: np.ndarray, affine: np.ndarray, space: str = "ras") -> np.ndarray:
    """Voxel coordinates ``(N, 3)`` to world mm (``ras`` or ``lps``) through ``affine``."""
    aff = np.asarray(affine, dtype=np.float64)
    world = np.asarray(points, dtype=np.float64) @ aff[:3, :3].T + aff[:3, 3]
    return world * (_LPS if space == "lps" else 1.0)


def _check_space(space: str) -> str:
    if space not in SPACES:
        raise DinoregError(f"unknown landmark space {space!r} (choose {', '.join(SPACES)})", "--landmark-space")
    return space


def load_landmarks(path: str | os.PathLike, image: Image | None, space: str = "voxel") -> np.ndarray:
    """Read a landmark CSV as ``(N, 3)`` float64 voxel coordinates ``[i, j, k]`` of ``image``.

    Args:
        path: the CSV file (see the module docstring for the accepted layouts).
        image: the image the landmarks belong to (its affine converts world points; its shape
            bounds the points). May be ``None`` only for ``space="voxel"`` (no bounds check).
        space: ``voxel`` (rows are i,j,k), ``ras`` or ``lps`` (rows are x,y,z in mm).

    Raises:
        DinoregError: missing file, no points, wrong column count, non-numeric value, or a
            landmark outside the image (naming its row).
    """
    _check_space(space)
    p = Path(path)
    points = read_landmark_table(p)
    if space != "voxel":
        if image is None:
            raise DinoregError(f"{space} landmarks need the image they belong to", p)
        points = world_to_voxel(points, image.affine, space)
    if image is not None:
        shape = np.asarray(image.shape, dtype=np.float64)
        outside = np.nonzero(((points < -0.5) | (points > shape - 0.5)).any(axis=1))[0]
        if outside.size:
            row = int(outside[0])
            raise DinoregError(f"landmark {row + 1} (voxel {np.round(points[row], 2).tolist()}) lies outside "
                               f"the image {image.name} of shape {tuple(image.shape)}"
                               f"{' (wrong --landmark-space?)' if space != 'voxel' else ''}", p)
    return points


def save_landmarks(path: str | os.PathLike, points: np.ndarray, image: Image | None = None,
                   space: str = "voxel", ids: Sequence[object] | None = None) -> Path:
    """Write ``(N, 3)`` voxel coordinates as a CSV (atomically).

    Args:
        points: voxel coordinates ``[i, j, k]``.
        image: needed for ``space`` ``ras``/``lps`` (the points are converted through its affine).
        space: ``voxel`` writes ``i,j,k``; ``ras``/``lps`` write ``x,y,z`` in mm.
        ids: optional first column (header ``id``), e.g. BraTS-Reg landmark numbers.

    Returns:
        the written path; :func:`load_landmarks` with the same ``space`` and image reads it back.
    """
    _check_space(space)
    p = Path(path)
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise DinoregError(f"landmarks must have shape (N, 3), got {pts.shape}", p)
    if space != "voxel":
        if image is None:
            raise DinoregError(f"writing {space} landmarks needs the image", p)
        pts = voxel_to_world(pts, image.affine, space)
    if ids is not None and len(ids) != len(pts):
        raise DinoregError(f"{len(ids)} ids for {len(pts)} landmarks", p)
    header = ([] if ids is None else ["id"]) + list(_NAMES[space])
    lines = [",".join(header)]
    for n, row in enumerate(pts):
        values = [repr(float(v)) for v in row]
        lines.append(",".join(([str(ids[n])] if ids is not None else []) + values))
    if not p.parent.exists():
        raise DinoregError("output directory does not exist", p.parent)
    try:
        with atomic_write(p) as tmp:
            tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    except OSError as exc:
        raise DinoregError(f"cannot write ({exc.strerror})", p) from exc
    return p
