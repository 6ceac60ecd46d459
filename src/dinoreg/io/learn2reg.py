"""Learn2Reg dataset layout: ``dataset.json``, its pair lists and output file names.

A Learn2Reg task folder holds ``dataset.json`` and the folders ``imagesTr`` (``imagesTs``),
``labelsTr``, ``masksTr``, ``keypointsTr``. Images are named ``<Task>_<case>_<mod>.nii.gz``
(``case`` 4 digits, ``mod`` the 4-digit modality/time-point index). The JSON lists pairs under
``registration_val``, ``registration_test`` and ``training_paired_images`` as
``{"fixed": "./imagesTr/...", "moving": "./imagesTr/..."}``; the label, mask and keypoint files
of an image are found by replacing ``images`` with ``labels`` / ``masks`` / ``keypoints`` in
that relative path (keypoints as ``.csv`` of voxel coordinates), as the evaluator does.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dinoreg.errors import DinoregError

SPLITS = {"val": "registration_val", "test": "registration_test", "train-pairs": "training_paired_images"}
_L2R_NAME = re.compile(r"^(?P<task>.+)_(?P<case>[0-9A-Za-z]+)_(?P<mod>\d{4})\.nii(?:\.gz)?$")
_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".npz", ".npy", ".csv")


@dataclass(frozen=True)
class Pair:
    """One registration pair with absolute paths; optional files are ``None`` when absent."""

    fixed: Path
    moving: Path
    fixed_label: Path | None = None
    moving_label: Path | None = None
    fixed_mask: Path | None = None
    moving_mask: Path | None = None
    fixed_keypoints: Path | None = None
    moving_keypoints: Path | None = None

    @property
    def disp_name(self) -> str:
        """The Learn2Reg output name of this pair's displacement field."""
        return disp_name(self.fixed, self.moving)


@dataclass
class Learn2RegDataset:
    """A parsed ``dataset.json``: the raw dictionary plus the folder it lives in."""

    root: Path
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.meta.get("name", self.root.name))

    @property
    def modality(self) -> dict[str, Any]:
        return dict(self.meta.get("modality", {}))

    @property
    def labels(self) -> dict[str, Any]:
        return dict(self.meta.get("labels", {}))

    @property
    def tensor_image_shape(self) -> tuple[int, ...] | None:
        """The image shape ``(I, J, K)`` declared under ``tensorImageShape`` (first entry)."""
        value = self.meta.get("tensorImageShape")
        if isinstance(value, dict) and value:
            value = next(iter(value.values()))
        if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
            return tuple(value)
        return None

    def pairs(self, split: str = "val", check: bool = True) -> list[Pair]:
        """The pairs of ``split`` (``val``, ``test`` or ``train-pairs``) with resolved paths.

        With ``check`` the fixed and moving images must exist.
        """
        if split not in SPLITS:
            raise DinoregError(f"unknown split {split!r} (choose {', '.join(SPLITS)})", self.json_path)
        key = SPLITS[split]
        entries = self.meta.get(key)
        if entries is None:
            raise DinoregError(f"has no {key!r} list (split {split!r})", self.json_path)
        if not entries:
            raise DinoregError(f"{key!r} is empty: split {split!r} has no pair to register", self.json_path)
        return [self._pair(entry, key, n, check) for n, entry in enumerate(entries)]

    @property
    def json_path(self) -> Path:
        return self.root / "dataset.json"

    def _pair(self, entry: Any, key: str, n: int, check: bool) -> Pair:
        if not (isinstance(entry, dict) and isinstance(entry.get("fixed"), str)
                and isinstance(entry.get("moving"), str)):
            raise DinoregError(f"{key}[{n}] must be an object with string 'fixed' and 'moving' paths",
                               self.json_path)
        fixed, moving = self._resolve(entry["fixed"]), self._resolve(entry["moving"])
        if check:
            for path in (fixed, moving):
                if not path.exists():
                    raise DinoregError(f"image referenced by {key}[{n}] not found (listed in {self.json_path})", path)
        return Pair(fixed, moving,
                    self._companion(entry["fixed"], "labels"), self._companion(entry["moving"], "labels"),
                    self._companion(entry["fixed"], "masks"), self._companion(entry["moving"], "masks"),
                    self._companion(entry["fixed"], "keypoints", ".csv"),
                    self._companion(entry["moving"], "keypoints", ".csv"))

    def _resolve(self, relative: str) -> Path:
        return (self.root / relative).resolve()

    def _companion(self, relative: str, folder: str, suffix: str | None = None) -> Path | None:
        """The ``labels``/``masks``/``keypoints`` file of an image, or None when absent."""
        rel = relative.replace("images", folder)
        if suffix is not None:
            rel = re.sub(r"\.nii(\.gz)?$", suffix, rel)
        path = self._resolve(rel)
        return path if path.is_file() else None


def load_dataset(path: str | os.PathLike) -> Learn2RegDataset:
    """Read a Learn2Reg ``dataset.json`` (or the folder holding it).

    Raises:
        DinoregError: missing file, invalid JSON, not an object, a pair list that is not a list,
            ``labels`` or ``modality`` that is not an object.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "dataset.json"
    if not p.is_file():
        raise DinoregError("dataset.json not found", p)
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DinoregError(f"is not valid JSON ({exc})", p) from exc
    if not isinstance(meta, dict):
        raise DinoregError("must hold a JSON object", p)
    for key in SPLITS.values():
        if key in meta and not isinstance(meta[key], list):
            raise DinoregError(f"{key!r} must be a list of pairs", p)
    for key in ("labels", "modality"):
        if key in meta and not isinstance(meta[key], dict):
            raise DinoregError(f"{key!r} must be an object such as {{\"1\": \"liver\"}}, got "
                               f"{type(meta[key]).__name__} {meta[key]!r:.40}", p)
    if not any(key in meta for key in SPLITS.values()):
        raise DinoregError(f"lists no pairs (none of {', '.join(SPLITS.values())})", p)
    return Learn2RegDataset(p.parent.resolve(), meta)


def _stem(path: str | os.PathLike) -> str:
    name = Path(path).name
    for suffix in _SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def disp_name(fixed_path: str | os.PathLike, moving_path: str | os.PathLike) -> str:
    """Output name of the displacement field of a pair.

    Learn2Reg names (``<Task>_<case>_<mod>.nii.gz``): ``disp_{fixcase}_{movcase}.nii.gz`` when
    the fixed modality is ``0000`` and the moving ``0001``, else
    ``disp_{fixcase}_{fixmod}_{movcase}_{movmod}.nii.gz``. Any other names:
    ``disp_{fixedstem}_{movingstem}.nii.gz`` (stem = file name without image suffixes).
    """
    f, m = _L2R_NAME.match(Path(fixed_path).name), _L2R_NAME.match(Path(moving_path).name)
    if f and m:
        if f["mod"] == "0000" and m["mod"] == "0001":
            return f"disp_{f['case']}_{m['case']}.nii.gz"
        return f"disp_{f['case']}_{f['mod']}_{m['case']}_{m['mod']}.nii.gz"
    return f"disp_{_stem(fixed_path)}_{_stem(moving_path)}.nii.gz"
