"""The outcome of one registration and how it is written to an output folder."""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dinoreg import metrics as l2r_metrics
from dinoreg.errors import DinoregError
from dinoreg.io.atomic import atomic_dir, remove_stale_temporaries
from dinoreg.io.images import WRITE_SUFFIXES, Image, save_image
from dinoreg.io.learn2reg import disp_name


@dataclass
class Result:
    """The outcome of one registration.

    Attributes:
        disp: ``(I, J, K, 3)`` float32 field, voxels of the fixed grid, pull-back.
        fixed: the fixed image (its affine is written with every output).
        warped: the moving image warped onto the fixed grid, ``(I, J, K)`` float32.
        warped_labels: moving labels warped by nearest neighbour, when given.
        metrics: Learn2Reg metrics when labels and/or landmarks were given.
        timings: seconds per stage.
        settings: the fully resolved registration spec (``RegistrationSpec.to_dict()``) and the preset.
        moving_path: the moving image's file, for output names.
        moving: the moving image on the fixed grid, before registration (for the QC picture).
        pending_metrics: the metrics' computation when ``register(defer_metrics=True)`` left it
            to :meth:`evaluate` (``None`` once done, or with nothing to score).
    """

    disp: np.ndarray
    fixed: Image
    warped: np.ndarray
    warped_labels: np.ndarray | None = None
    metrics: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    moving_path: str | None = None
    moving: np.ndarray | None = None
    pending_metrics: Callable[[], dict[str, Any]] | None = field(default=None, repr=False, compare=False)

    def evaluate(self) -> dict[str, Any] | None:
        """Compute the pending metrics (if any) into :attr:`metrics`, timed as ``timings["metrics"]``
        (and added to ``timings["total"]``), and return them."""
        if self.pending_metrics is not None:
            start = time.perf_counter()
            self.metrics = self.pending_metrics()
            self.pending_metrics = None
            seconds = time.perf_counter() - start
            self.timings["metrics"] = seconds
            if "total" in self.timings:
                self.timings["total"] += seconds
        return self.metrics

    def save(self, outdir: str | os.PathLike, name: str | None = None, qc: bool = False) -> dict[str, Path]:
        """Write the field, the warped image (and labels), ``metrics.json`` (metrics, the resolved
        settings and timings) and, with ``qc``, the quality-control picture ``qc_*.png`` into
        ``outdir`` (created when missing).

        Everything is written into a temporary folder inside ``outdir`` first and moved into
        place only when every file is complete. Pending metrics (:meth:`evaluate`) are computed
        on this thread while another one writes the volumes. Returns the written paths by kind.
        """
        field_name = check_field_name(name) or disp_name(self.fixed.path or "fixed.nii.gz",
                                                         self.moving_path or "moving.nii.gz")
        out = prepare_outdir(outdir)
        stem = field_name[len("disp_"):] if field_name.startswith("disp_") else field_name
        arrays: dict[str, tuple[str, np.ndarray]] = {
            "disp": (field_name, self.disp.astype(np.float32, copy=False)),
            "warped": ("warped_" + stem, self.warped.astype(np.float32, copy=False)),
        }
        if self.warped_labels is not None:
            arrays["warped_labels"] = ("warped_labels_" + stem, self.warped_labels.astype(np.int16, copy=False))
        files = {kind: fname for kind, (fname, _) in arrays.items()}
        tmpdir = atomic_dir(out)
        try:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dinoreg-save") as pool:
                volumes = [pool.submit(save_image, array, self.fixed.affine, tmpdir / fname)
                           for fname, array in arrays.values()]
                self.evaluate()
                for written_volume in volumes:
                    written_volume.result()
            record = {**l2r_metrics.to_jsonable(self.metrics or {}), "settings": self.settings,
                      "timings": {k: round(v, 3) for k, v in self.timings.items()}}
            (tmpdir / "metrics.json").write_text(json.dumps(record, indent=2))
            files["metrics"] = "metrics.json"
            if qc and self.moving is not None:
                from dinoreg.qc import qc_figure

                files["qc"] = "qc_" + stem.replace(".nii.gz", "") + ".png"
                qc_figure(self.fixed.array, self.moving, self.warped, self.disp, tmpdir / files["qc"], title=stem,
                          spacing=tuple(float(v) for v in self.fixed.spacing), affine=self.fixed.affine)
            written = {}
            for kind, fname in files.items():
                os.replace(tmpdir / fname, out / fname)
                written[kind] = out / fname
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        return written


def check_field_name(name: str | None) -> str | None:
    """``--name``: a plain file name inside the output folder (no folder part, no ``..``, not
    hidden) with an image suffix; ``None`` stays ``None`` (Learn2Reg naming)."""
    if name is None:
        return None
    if not name.strip() or Path(name).name != name or name in (".", "..") or name.startswith("."):
        raise DinoregError(f"must be a plain file name inside the output folder, got {name!r}", "--name")
    if not name.lower().endswith(WRITE_SUFFIXES):
        raise DinoregError(f"must end in {', '.join(WRITE_SUFFIXES)}, got {name!r}", "--name")
    return name


def check_outdir(outdir: str | os.PathLike) -> Path:
    """Check, without creating anything, that ``outdir`` is or can become a writable folder."""
    if not str(outdir).strip():
        raise DinoregError("output directory is empty", "-o")
    out = Path(outdir)
    if out.exists() and not out.is_dir():
        raise DinoregError("output path exists and is not a directory", out)
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise DinoregError(f"cannot create output directory ({existing} is not a directory)", out)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DinoregError("output directory is not writable", existing)
    return out


def prepare_outdir(outdir: str | os.PathLike) -> Path:
    """Create ``outdir`` (with parents), check it is writable and remove the temporaries a
    killed run left in it (only dinoreg's own names, of processes that are gone)."""
    out = check_outdir(outdir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DinoregError(f"cannot create output directory ({exc.strerror})", out) from exc
    remove_stale_temporaries(out)
    return out
