"""Peers benchmark: dinoreg presets against convexadam, elastix (B-spline, MI) and ANTs (SyN).

    python benchmarks/peers.py --shared ../shared --out outputs/peers [--methods ...] [--pairs ...]

Every (method, pair) runs in its own subprocess (``peers.py _run METHOD PAIR``) so wall time and
peak memory are the whole process's: wall time from the parent (interpreter start, imports and
image loading included) and the registration call alone (written by the child), peak resident
memory from ``os.wait4``'s rusage (``ru_maxrss``). Each method's output is converted to the
Learn2Reg field (``(I, J, K, 3)`` float32 voxels of the fixed grid, pull-back) and scored by
``dinoreg.metrics`` (Dice over the pair's labels, TRE of the BraTS-Reg landmarks, SDlogJ,
folding). The table gives ratios against ``dinoreg-mind``.

Peers work in voxel-index space: images go in as arrays with the fixed image's voxel spacing,
zero origin and identity direction (every pair here shares one grid), so a field in physical
units divides by the spacing to become voxels. Conversions (checked by ``tests/test_peers.py``
with a known translation of a real image):

* convexadam 0.2.0 ``convex_adam_pt``: already ``(I, J, K, 3)`` voxels, pull-back.
* itk-elastix: ``transformix_deformation_field`` gives ``T(x) - x`` in mm on the fixed grid as
  an ITK image whose array is ``[k, j, i, (x, y, z)]``; we hand ITK ``array.transpose(2, 1, 0)``
  so its ``x`` is our ``i``: field ``.transpose(2, 1, 0, 3) / spacing``.
* ANTsPy: arrays keep numpy order (``x = i``); the composed forward transform
  (``apply_transforms(..., compose=...)``) is a displacement field in mm, ``/ spacing``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
REFERENCE = "dinoreg-mind"

# name: (fixed, moving, fixed labels, moving labels, fixed landmarks (LPS), moving landmarks, label list)
BRAIN = "data/learn2reg_tutorial2019_brain_t1/subject_1", "data/voxelmorph_brain_t1/test_scan"
LAPIRN = "data/lapirn_brain_t1_pair/image_A_160x192x144", "data/lapirn_brain_t1_pair/image_B_160x192x144"
BRATS = "data/bratsreg_002_dirac/BraTSReg_002_00_0000", "data/bratsreg_002_dirac/BraTSReg_002_01_0262"
PAIRS: dict[str, dict[str, Any]] = {
    "brain-oasis": dict(fixed=f"{BRAIN[0]}_vol.nii.gz", moving=f"{BRAIN[1]}_vol.nii.gz",
                        fixed_seg=f"{BRAIN[0]}_seg.nii.gz", moving_seg=f"{BRAIN[1]}_seg.nii.gz",
                        labels="data/voxelmorph_brain_t1/labels.npz"),
    "brain-lapirn": dict(fixed=f"{LAPIRN[0]}.nii.gz", moving=f"{LAPIRN[1]}.nii.gz",
                         fixed_seg=f"{LAPIRN[0]}_seg.nii.gz", moving_seg=f"{LAPIRN[1]}_seg.nii.gz", labels=[1, 2]),
    "brats-t1ce-t1ce": dict(fixed=f"{BRATS[0]}_t1ce.nii.gz", moving=f"{BRATS[1]}_t1ce.nii.gz",
                            fixed_lms=f"{BRATS[0]}_landmarks.csv", moving_lms=f"{BRATS[1]}_landmarks.csv"),
    "brats-t2-t1ce": dict(fixed=f"{BRATS[0]}_t1ce.nii.gz", moving=f"{BRATS[1]}_t2.nii.gz",
                          fixed_lms=f"{BRATS[0]}_landmarks.csv", moving_lms=f"{BRATS[1]}_landmarks.csv"),
    "brats-flair-t1": dict(fixed=f"{BRATS[0]}_t1.nii.gz", moving=f"{BRATS[1]}_flair.nii.gz",
                           fixed_lms=f"{BRATS[0]}_landmarks.csv", moving_lms=f"{BRATS[1]}_landmarks.csv"),
}


# --------------------------------------------------------------------------- conversions (pure)

def itk_array_to_l2r(field_kji_xyz: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """An ITK displacement array ``[k, j, i, (x, y, z)]`` in mm (image built from
    ``array.transpose(2, 1, 0)``) -> Learn2Reg ``(I, J, K, 3)`` voxels."""
    field = np.asarray(field_kji_xyz, dtype=np.float64).transpose(2, 1, 0, 3)
    return (field / np.asarray(spacing, dtype=np.float64)).astype(np.float32)


def ants_array_to_l2r(field_ijk_xyz: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """An ANTsPy displacement array ``[i, j, k, (x, y, z)]`` in mm -> Learn2Reg voxels."""
    return (np.asarray(field_ijk_xyz, dtype=np.float64) / np.asarray(spacing, dtype=np.float64)).astype(np.float32)


# --------------------------------------------------------------------------- peers (arrays in, L2R field out)

def run_convexadam(fixed: np.ndarray, moving: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """convexadam 0.2.0 with its defaults, float32 on the CPU."""
    import torch
    from convexAdam.convex_adam_MIND import convex_adam_pt

    disp = convex_adam_pt(torch.from_numpy(np.ascontiguousarray(fixed, np.float32)),
                          torch.from_numpy(np.ascontiguousarray(moving, np.float32)),
                          dtype=torch.float32, device=torch.device("cpu"))
    return np.asarray(disp, dtype=np.float32)


def _itk_image(array: np.ndarray, spacing: tuple[float, ...]) -> Any:
    import itk

    img = itk.image_from_array(np.ascontiguousarray(np.asarray(array, np.float32).transpose(2, 1, 0)))
    img.SetSpacing([float(s) for s in spacing])
    return img


def run_elastix(fixed: np.ndarray, moving: np.ndarray, spacing: tuple[float, ...],
                iterations: int | None = None, levels: int = 3) -> np.ndarray:
    """elastix B-spline (default map: ``levels`` resolutions, AdvancedMattesMutualInformation +
    bending energy, 10 mm final grid, 256 ASGD iterations per level)."""
    import itk

    params = itk.ParameterObject.New()
    bspline = params.GetDefaultParameterMap("bspline", levels)
    if iterations is not None:
        bspline["MaximumNumberOfIterations"] = [str(iterations)]
    bspline["WriteResultImage"] = ["false"]
    params.AddParameterMap(bspline)
    fix_img, mov_img = _itk_image(fixed, spacing), _itk_image(moving, spacing)
    with tempfile.TemporaryDirectory() as tmp:
        _, transform = itk.elastix_registration_method(fix_img, mov_img, parameter_object=params,
                                                       log_to_console=False, output_directory=tmp)
        field = itk.transformix_deformation_field(mov_img, transform, output_directory=tmp)
    return itk_array_to_l2r(itk.array_from_image(field), spacing)


def run_ants(fixed: np.ndarray, moving: np.ndarray, spacing: tuple[float, ...],
             type_of_transform: str = "SyN", **kwargs: Any) -> np.ndarray:
    """ANTs SyN (ANTsPy defaults: affine initialisation, then SyN with MI/CC), composed into one field."""
    import ants

    sp = tuple(float(s) for s in spacing)
    fix_img = ants.from_numpy(np.asarray(fixed, np.float32), origin=(0.0, 0.0, 0.0), spacing=sp)
    mov_img = ants.from_numpy(np.asarray(moving, np.float32), origin=(0.0, 0.0, 0.0), spacing=sp)
    with tempfile.TemporaryDirectory() as tmp:
        reg = ants.registration(fixed=fix_img, moving=mov_img, type_of_transform=type_of_transform,
                                outprefix=os.path.join(tmp, "reg_"), **kwargs)
        composed = ants.apply_transforms(fixed=fix_img, moving=mov_img, transformlist=reg["fwdtransforms"],
                                         compose=os.path.join(tmp, "comp_"))
        field = ants.image_read(composed).numpy()
    return ants_array_to_l2r(field, sp)


def run_elastix4(fixed: np.ndarray, moving: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """elastix B-spline, the default map with 4 resolutions (the known-warp benchmark's reference)."""
    return run_elastix(fixed, moving, spacing, levels=4)


def run_ants_mi(fixed: np.ndarray, moving: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """ANTs SyN with Mattes mutual information named explicitly for the affine and the SyN stage."""
    return run_ants(fixed, moving, spacing, type_of_transform="SyN", aff_metric="mattes", syn_metric="mattes")


PEERS: dict[str, Callable[..., np.ndarray]] = {"convexadam": run_convexadam, "elastix": run_elastix,
                                               "elastix4": run_elastix4, "ants": run_ants, "ants-mi": run_ants_mi}


# --------------------------------------------------------------------------- one run (child process)

def _load(shared: Path, rel: str) -> tuple[np.ndarray, tuple[float, ...]]:
    import nibabel as nib

    img = nib.load(str(shared / rel))
    return np.asarray(img.dataobj, dtype=np.float32), tuple(float(z) for z in img.header.get_zooms()[:3])


def run_one(method: str, pair: str, shared: Path, out: Path, threads: int) -> None:
    """Register one pair with one method; writes ``out/<method>__<pair>.npy`` and ``.json``."""
    spec = PAIRS[pair]
    start = time.perf_counter()
    if method.startswith("dinoreg-"):
        import dinoreg

        result = dinoreg.register(shared / spec["fixed"], shared / spec["moving"], preset_name=method[len("dinoreg-"):],
                                  device="cpu", progress=False)
        disp = result.disp
    else:
        fixed, spacing = _load(shared, spec["fixed"])
        moving, _ = _load(shared, spec["moving"])
        disp = PEERS[method](fixed, moving, spacing)
    seconds = time.perf_counter() - start
    np.save(out / f"{method}__{pair}.npy", disp.astype(np.float32))
    (out / f"{method}__{pair}.json").write_text(json.dumps({"seconds": seconds, "threads": threads}))


# --------------------------------------------------------------------------- scoring and table (parent)

def score(pair: str, disp: np.ndarray, shared: Path) -> dict[str, Any]:
    """Learn2Reg metrics of a field on a benchmark pair (dinoreg.metrics)."""
    from dinoreg.io.images import load_image
    from dinoreg.io.landmarks import load_landmarks
    from dinoreg.metrics import evaluate_pair

    spec = PAIRS[pair]
    fixed = load_image(shared / spec["fixed"])
    kwargs: dict[str, Any] = dict(spacing=tuple(float(s) for s in fixed.spacing))
    if "fixed_seg" in spec:
        import nibabel as nib

        kwargs["fixed_seg"] = np.asarray(nib.load(str(shared / spec["fixed_seg"])).dataobj).astype(np.int32)
        kwargs["moving_seg"] = np.asarray(nib.load(str(shared / spec["moving_seg"])).dataobj).astype(np.int32)
        labels = spec["labels"]
        if isinstance(labels, str):
            data = np.load(shared / labels)
            labels = [int(v) for v in data[data.files[0]]]
        kwargs["labels"] = labels
    if "fixed_lms" in spec:
        moving = load_image(shared / spec["moving"])
        kwargs["fixed_lms"] = load_landmarks(shared / spec["fixed_lms"], fixed, space="lps")
        kwargs["moving_lms"] = load_landmarks(shared / spec["moving_lms"], moving, space="lps")
    return evaluate_pair(disp, **kwargs)


def launch(method: str, pair: str, shared: Path, out: Path, threads: int) -> dict[str, Any]:
    """Run one case in a fresh interpreter; wall time and peak RSS of that whole process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "_run", method, pair, "--shared", str(shared),
           "--out", str(out), "--threads", str(threads)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    row: dict[str, Any] = {"method": method, "pair": pair, "wall_s": wall, "peak_mib": usage.ru_maxrss / 1024,
                           "ok": proc.returncode == 0}
    if row["ok"]:
        row["register_s"] = json.loads((out / f"{method}__{pair}.json").read_text())["seconds"]
    return row


def _headline(metrics: dict[str, Any]) -> dict[str, float]:
    keys = ("dice_mean", "tre_mm_mean", "hd95_vox_mean", "sdlogj", "folding_fraction")
    return {k: float(metrics[k]) for k in keys if k in metrics}


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table; ratios (time, memory) against the reference method on the same pair."""
    ref = {r["pair"]: r for r in rows if r["method"] == REFERENCE and r["ok"]}
    lines = ["| pair | method | Dice | TRE mm | SDlogJ | folding % | register s | process s | peak MiB "
             "| time × dinoreg | memory × dinoreg |", "|" + "---|" * 11]
    for r in rows:
        if not r["ok"]:
            lines.append(f"| {r['pair']} | {r['method']} | failed |" + " |" * 8)
            continue
        m, base = r["metrics"], ref.get(r["pair"])
        fmt = lambda k, f="{:.3f}", s=1.0: f.format(m[k] * s) if k in m and m[k] == m[k] else "–"  # noqa: E731
        ratio_t = f"{r['wall_s'] / base['wall_s']:.2f}" if base else "–"
        ratio_m = f"{r['peak_mib'] / base['peak_mib']:.2f}" if base else "–"
        lines.append(f"| {r['pair']} | {r['method']} | {fmt('dice_mean')} | {fmt('tre_mm_mean', '{:.2f}')} "
                     f"| {fmt('sdlogj')} | {fmt('folding_fraction', '{:.3f}', 100)} | {r['register_s']:.1f} "
                     f"| {r['wall_s']:.1f} | {r['peak_mib']:.0f} | {ratio_t} | {ratio_m} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "_run":
        p = argparse.ArgumentParser()
        p.add_argument("method")
        p.add_argument("pair", choices=sorted(PAIRS))
        p.add_argument("--shared", type=Path, required=True)
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--threads", type=int, default=2)
        a = p.parse_args(argv[1:])
        import torch

        torch.set_num_threads(a.threads)
        run_one(a.method, a.pair, a.shared.resolve(), a.out, a.threads)
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "peers")
    p.add_argument("--methods", default=f"{REFERENCE},dinoreg-convexadam,convexadam,elastix,elastix4,ants-mi",
                   help="comma list: dinoreg-<preset>, convexadam, elastix (3 levels), elastix4, ants, ants-mi")
    p.add_argument("--pairs", default=",".join(PAIRS), help=f"comma list of {', '.join(PAIRS)}")
    p.add_argument("--threads", type=int, default=2, help="threads per run (torch, OpenMP, ITK)")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for pair in a.pairs.split(","):
        for method in a.methods.split(","):
            row = launch(method, pair, a.shared.resolve(), a.out, a.threads)
            if row["ok"]:
                row["metrics"] = _headline(score(pair, np.load(a.out / f"{method}__{pair}.npy"), a.shared.resolve()))
            print(json.dumps(row), flush=True)
            rows.append(row)
    text = table(rows)
    (a.out / "peers.json").write_text(json.dumps(rows, indent=2))
    (a.out / "peers.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
