"""Known-warp benchmark: brain T1 volumes warped by random smooth fields of known magnitude, with a
changed contrast and noise; end-point error of the recovered field and Dice of warped labels.

    python benchmarks/known_warp.py --shared ../shared --out outputs/known_warp [--quick]
        [--methods dinoreg-mind,elastix4,ants] [--cases ...]

Each case takes one dev subject (T1, aseg labels) as the **fixed** image and builds the moving one:

1. a true pull-back field ``u`` on the fixed grid (Learn2Reg convention, voxels of the fixed grid:
   ``warped(p) = moving(p + u(p))``): the exponential (scaling and squaring) of a stationary
   velocity, Gaussian noise on a coarse control grid (``control_mm``) cubic-spline upsampled, scaled
   so that ``u``'s largest displacement inside the brain is ``max_mm``;
2. its inverse ``v = exp(-velocity)``, so that the moving image ``M(x) = remap(F)(x + v(x))``
   satisfies ``M(p + u(p)) = remap(F)(p)``: registering ``F`` and ``M`` should recover ``u``;
3. a contrast remap of the intensities (``gamma``: monotone; ``pwl``: a random non-monotone
   piecewise-linear curve; ``t2``: T1 -> "T2-like", the brain's intensities inverted so CSF is
   bright and white matter dark) and Gaussian noise on the moving image;
4. the moving labels are the fixed labels pulled back by ``v`` (nearest neighbour).

The ``b-*`` cases replace the synthetic remap by a real one: the fixed image is BraTS-Reg 002's
baseline T1, the moving one the same time point's T2 or FLAIR (co-registered by BraTS) warped by
``v``, without added noise. They have no labels (EPE only, over T1 > 0); the residual of BraTS's own
co-registration is part of every method's error there.

Scores: mean end-point error ``|u_rec - u| * spacing`` (mm) over the fixed brain mask (aseg > 0)
and its 95th percentile, Dice over the 30 VoxelMorph labels of the fixed labels and the moving
labels warped by the recovered field, folding. Every (method, case) runs in its own process
(``known_warp.py _run METHOD CASE``) with the same threads; the child records the registration
call's wall time and process CPU seconds (all threads), the parent the whole process's CPU time.
Ratios are against ``elastix4`` on the same case.

Methods: ``dinoreg-<preset>`` (optionally ``dinoreg-<preset>:key=value,key=value`` overrides; the
default list has ``mind`` (its MI level on one contrast, checked by edge alignment across contrasts,
from two starts), ``dinoreg-mind:mi_iterations=0`` (the feature stages alone) and
``dinoreg-mind:mi_cross_contrast=skip,mi_select_smoothing=0`` (the level as it was before the edge
check and the second start: one contrast only, one start)),
``elastix4`` (itk-elastix default B-spline map: 4 resolutions, AdvancedMattesMutualInformation +
bending energy, 10 mm final grid, 256 ASGD iterations per level), ``elastix`` (the same, 3 levels),
``ants`` (ANTsPy SyN, Mattes MI for the affine and the SyN stage).
Cases are generated once per seed and cached as ``.npz`` under ``--out/cases``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
REFERENCE = "elastix4"

SUBJECTS = {
    "s1": ("data/learn2reg_tutorial2019_brain_t1/subject_1_vol.nii.gz",
           "data/learn2reg_tutorial2019_brain_t1/subject_1_seg.nii.gz"),
    "s2": ("data/voxelmorph_brain_t1/test_scan_vol.nii.gz", "data/voxelmorph_brain_t1/test_scan_seg.nii.gz"),
}
# BraTS-Reg 002 baseline: the sequences of one time point are co-registered, so a second real sequence
# warped by the known field is a real cross-contrast pair (no labels: EPE only)
BRATS = "data/bratsreg_002_dirac/BraTSReg_002_00_0000_{sequence}.nii.gz"
LABELS = "data/voxelmorph_brain_t1/labels.npz"


@dataclass(frozen=True)
class Case:
    """One synthetic pair: subject, warp magnitude (mm), contrast remap, noise and seed.

    ``subject="brats"``: the fixed image is BraTS-Reg 002's baseline T1 and the moving one its
    co-registered ``remap`` sequence (``t2``, ``flair``) warped by the known field: a real contrast
    change instead of a synthetic remap, scored by EPE in the brain (T1 > 0) only."""

    subject: str
    max_mm: float
    remap: str
    seed: int
    noise: float = 0.02
    control_mm: float = 48.0

    @property
    def real_contrast(self) -> bool:
        return self.subject == "brats"


CASES: dict[str, Case] = {
    "s1-gamma-5": Case("s1", 5.0, "gamma", 11),
    "s1-pwl-10": Case("s1", 10.0, "pwl", 12),
    "s1-t2-15": Case("s1", 15.0, "t2", 13),
    "s2-gamma-10": Case("s2", 10.0, "gamma", 21),
    "s2-pwl-15": Case("s2", 15.0, "pwl", 22),
    "s2-t2-10": Case("s2", 10.0, "t2", 23),
    "b-t2-10": Case("brats", 10.0, "t2", 31, noise=0.0),
    "b-flair-15": Case("brats", 15.0, "flair", 32, noise=0.0),
}
QUICK = ("s1-pwl-10", "s2-t2-10")


# --------------------------------------------------------------------------- fields (pure numpy / torch)

def smooth_noise(shape: tuple[int, ...], spacing_mm: tuple[float, ...], control_mm: float,
                 rng: np.random.Generator) -> np.ndarray:
    """``(*shape, 3)`` smooth random vectors: Gaussian noise on a control grid of ``control_mm``
    spacing, cubic-spline upsampled to ``shape``."""
    from scipy import ndimage

    coarse = tuple(int(np.ceil(n * s / control_mm)) + 3 for n, s in zip(shape, spacing_mm))
    out = np.empty((*shape, 3), np.float32)
    for c in range(3):
        up = ndimage.zoom(rng.standard_normal(coarse), [n / m for n, m in zip(shape, coarse)], order=3,
                          mode="nearest", grid_mode=True)
        out[..., c] = up[:shape[0], :shape[1], :shape[2]]
    return out


def exp_velocity(velocity: Any, steps: int = 7) -> Any:
    """Scaling and squaring: the pull-back field ``exp(velocity)`` of a stationary velocity
    ``(1, 3, I, J, K)`` (voxels): a diffeomorphism whose inverse is ``exp(-velocity)``."""
    from dinoreg.spatial.grid import compose

    field = velocity / 2 ** steps
    for _ in range(steps):
        field = compose(field, field)
    return field


def random_field(shape: tuple[int, int, int], max_mm: float, spacing: tuple[float, ...], seed: int,
                 mask: np.ndarray | None = None, control_mm: float = 40.0, factor: int = 2
                 ) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random diffeomorphism and its inverse, both ``(I, J, K, 3)`` pull-back fields in
    voxels: ``u = exp(a v)``, ``u_inv = exp(-a v)`` for a smooth random velocity ``v``
    (:func:`smooth_noise`), computed on a grid ``factor`` times coarser and upsampled
    (trilinear), with ``a`` chosen so that ``u``'s largest displacement inside ``mask`` is
    ``max_mm`` within 1 % on that coarse grid (upsampling lowers the peak a little: 14.85-14.87 mm
    for 15 mm on the dev brains)."""
    import torch

    from dinoreg.spatial.grid import field_from_numpy, field_to_numpy, resize_field

    rng = np.random.default_rng(seed)
    small = tuple(-(-n // factor) for n in shape)
    sp_small = np.asarray(spacing, np.float64) * factor
    sp_t = torch.tensor(sp_small, dtype=torch.float32).view(1, 3, 1, 1, 1)
    velocity = field_from_numpy(smooth_noise(small, tuple(sp_small), control_mm, rng)) / sp_t  # voxels, mm-isotropic
    keep = np.ones(small, bool) if mask is None else mask[::factor, ::factor, ::factor][:small[0], :small[1], :small[2]]
    keep_t = torch.from_numpy(np.ascontiguousarray(keep))
    scale = max_mm / float((velocity * sp_t).norm(dim=1)[0][keep_t].max())
    with torch.no_grad():
        for _ in range(8):
            field = exp_velocity(velocity * scale)
            top = float((field * sp_t).norm(dim=1)[0][keep_t].max())
            if abs(top / max_mm - 1.0) < 0.01:
                break
            scale *= max_mm / top
        forward = resize_field(field, shape)
        inverse = resize_field(exp_velocity(-velocity * scale), shape)
    return field_to_numpy(forward), field_to_numpy(inverse)


def invert_field(disp: np.ndarray, iterations: int = 50) -> np.ndarray:
    """The inverse ``v`` of a pull-back field ``u`` (voxels): ``v(x) = -u(x + v(x))`` by fixed-point
    iteration, so that warping by ``v`` then by ``u`` is the identity (``u(p) + v(p + u(p)) = 0``)."""
    import torch

    from dinoreg.spatial.grid import field_from_numpy, field_to_numpy, warp

    u = field_from_numpy(disp)
    v = -u.clone()
    with torch.no_grad():
        for _ in range(iterations):
            v = -warp(u, v)
    return field_to_numpy(v)


def warp_array(volume: np.ndarray, disp: np.ndarray, nearest: bool = False) -> np.ndarray:
    """Pull-back warp of a volume by a voxel field (trilinear, or nearest for labels; border
    padding, as dinoreg's warp)."""
    import torch

    from dinoreg.spatial.grid import field_from_numpy, warp

    vol = torch.from_numpy(np.ascontiguousarray(volume, np.float32))[None, None]
    with torch.no_grad():
        out = warp(vol, field_from_numpy(disp), mode="nearest" if nearest else "bilinear")
    return out[0, 0].numpy()


def end_point_error(disp: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...],
                    mask: np.ndarray | None = None) -> dict[str, float]:
    """Mean, 95th percentile and max of ``|disp - truth| * spacing`` (mm), inside ``mask``."""
    err = np.linalg.norm((np.asarray(disp, np.float64) - truth) * np.asarray(spacing, np.float64), axis=-1)
    values = err[mask] if mask is not None else err.ravel()
    return {"epe_mm": float(values.mean()), "epe95_mm": float(np.percentile(values, 95)),
            "epe_max_mm": float(values.max())}


def remap_intensities(image: np.ndarray, kind: str, seed: int) -> np.ndarray:
    """A contrast change of a ``[0, ~1]`` T1 volume (background 0 stays 0 for every kind)."""
    top = float(np.percentile(image[image > 0], 99.5)) if np.any(image > 0) else 1.0
    x = np.clip(image / top, 0.0, 1.0)
    if kind == "gamma":
        return x ** 0.5
    if kind == "pwl":  # random non-monotone piecewise-linear curve through (0, 0)
        rng = np.random.default_rng(seed)
        knots = np.linspace(0.0, 1.0, 7)
        values = np.concatenate([[0.0], rng.uniform(0.1, 1.0, len(knots) - 1)])
        while np.all(np.diff(values[1:]) > 0) or np.all(np.diff(values[1:]) < 0):  # make sure it is not monotone
            values[1:] = rng.uniform(0.1, 1.0, len(knots) - 1)
        return np.interp(x, knots, values).astype(np.float32)
    if kind == "t2":  # CSF bright, white matter dark, background dark
        return np.where(x > 0.02, 1.05 - x, 0.0).astype(np.float32)
    raise ValueError(f"unknown remap {kind!r}")


def jacobian_min(disp: np.ndarray) -> float:
    from dinoreg.metrics import jacobian_determinant

    return float(jacobian_determinant(disp).min())


def make_case(case: Case, shared: Path) -> dict[str, np.ndarray]:
    """Fixed image and labels, moving image and labels, the true field, the brain mask (no labels
    for a real-contrast case)."""
    if case.real_contrast:
        return _make_real_contrast_case(case, shared)
    vol_path, seg_path = SUBJECTS[case.subject]
    fixed, spacing = _volume(shared / vol_path)
    fixed_seg = _volume(shared / seg_path)[0].astype(np.int32)
    mask = fixed_seg > 0
    truth, inverse = random_field(fixed.shape, case.max_mm, spacing, case.seed, mask, case.control_mm)
    remapped = remap_intensities(fixed, case.remap, case.seed)
    moving = warp_array(remapped, inverse)
    rng = np.random.default_rng(case.seed + 1000)
    moving = np.clip(moving + rng.normal(0.0, case.noise, moving.shape).astype(np.float32), 0.0, None)
    moving_seg = warp_array(fixed_seg.astype(np.float32), inverse, nearest=True).astype(np.int32)
    return dict(fixed=fixed, moving=moving.astype(np.float32), fixed_seg=fixed_seg, moving_seg=moving_seg,
                truth=truth, mask=mask, spacing=np.asarray(spacing))


def _make_real_contrast_case(case: Case, shared: Path) -> dict[str, np.ndarray]:
    """BraTS-Reg 002's baseline T1 (fixed) and its ``case.remap`` sequence warped by the known
    field (moving, no added noise: ``case.noise`` is not used)."""
    fixed, spacing = _volume(shared / BRATS.format(sequence="t1"))
    mask = fixed > 0
    truth, inverse = random_field(fixed.shape, case.max_mm, spacing, case.seed, mask, case.control_mm)
    moving = warp_array(_volume(shared / BRATS.format(sequence=case.remap))[0], inverse)
    return dict(fixed=fixed, moving=moving.astype(np.float32), truth=truth, mask=mask, spacing=np.asarray(spacing))


def _volume(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """A NIfTI volume as float32 (its stored values, labels included) and its voxel size in mm."""
    import nibabel as nib

    img = nib.load(str(path))
    return np.asarray(img.dataobj, np.float32), tuple(float(z) for z in img.header.get_zooms()[:3])


def case_path(out: Path, name: str) -> Path:
    return out / "cases" / f"{name}_{CASES[name].seed}.npz"


def ensure_case(name: str, shared: Path, out: Path) -> Path:
    path = case_path(out, name)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        data = make_case(CASES[name], shared)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **data)
        os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- one run (child process)

def register(method: str, fixed: np.ndarray, moving: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """The Learn2Reg field of one method on arrays (shared grid, ``spacing`` mm)."""
    if method.startswith("dinoreg-"):
        import dinoreg

        name, _, extra = method[len("dinoreg-"):].partition(":")
        overrides: dict[str, Any] = {}
        for item in filter(None, extra.split(",")):
            key, _, value = item.partition("=")
            overrides[key] = value
        from dinoreg.io.images import Image

        affine = np.diag([*spacing, 1.0])
        result = dinoreg.register(Image(fixed, affine, None), Image(moving, affine, None), preset_name=name,
                                  device="cpu", progress=False, **overrides)
        return result.disp
    from peers import run_ants, run_elastix

    if method == "elastix4":
        return run_elastix(fixed, moving, spacing, levels=4)
    if method == "elastix":
        return run_elastix(fixed, moving, spacing, levels=3)
    if method == "ants":
        return run_ants(fixed, moving, spacing, type_of_transform="SyN", aff_metric="mattes", syn_metric="mattes")
    raise ValueError(f"unknown method {method!r}")


def run_one(method: str, case: str, out: Path, threads: int) -> None:
    data = np.load(case_path(out, case))
    spacing = tuple(float(s) for s in data["spacing"])
    fixed, moving = data["fixed"], data["moving"]
    wall, cpu = time.perf_counter(), time.process_time()
    disp = register(method, fixed, moving, spacing)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    np.save(out / "runs" / f"{_slug(method)}__{case}.npy", np.asarray(disp, np.float32))
    (out / "runs" / f"{_slug(method)}__{case}.json").write_text(
        json.dumps({"register_s": wall, "register_cpu_s": cpu, "threads": threads}))


def _slug(method: str) -> str:
    return method.replace(":", "~").replace(",", "+").replace("=", "-").replace("/", "_")


# --------------------------------------------------------------------------- scoring, table (parent)

def score(case: str, disp: np.ndarray, out: Path) -> dict[str, float]:
    from dinoreg.metrics import dice_per_label, folding_fraction, warp_segmentation

    data = np.load(case_path(out, case))
    spacing = tuple(float(s) for s in data["spacing"])
    dice = float("nan")  # a real-contrast case has no labels
    if "moving_seg" in data:
        warped = warp_segmentation(data["moving_seg"], disp)
        dice = float(np.nanmean(list(dice_per_label(data["fixed_seg"], warped, _labels()).values())))
    return {**end_point_error(disp, data["truth"], spacing, data["mask"]),
            "dice": dice, "folding_pct": 100 * folding_fraction(disp)}


def _labels() -> list[int]:
    data = np.load(SHARED / LABELS)
    return [int(v) for v in data[data.files[0]]]


SHARED = REPO.parent / "shared"


def launch(method: str, case: str, out: Path, threads: int) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "_run", method, case, "--out", str(out),
           "--threads", str(threads)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    row: dict[str, Any] = {"method": method, "case": case, "process_s": time.perf_counter() - start,
                           "process_cpu_s": usage.ru_utime + usage.ru_stime, "peak_mib": usage.ru_maxrss / 1024,
                           "ok": os.waitstatus_to_exitcode(status) == 0}
    if row["ok"]:
        row.update(json.loads((out / "runs" / f"{_slug(method)}__{case}.json").read_text()))
    return row


def table(rows: list[dict[str, Any]]) -> str:
    ref = {r["case"]: r for r in rows if r["method"] == REFERENCE and r["ok"]}
    lines = ["| case | method | EPE mm | EPE95 mm | Dice | folding % | wall s | CPU s | wall × elastix "
             "| CPU × elastix |", "|" + "---|" * 10]
    for r in rows:
        if not r["ok"]:
            lines.append(f"| {r['case']} | {r['method']} | failed |" + " |" * 7)
            continue
        base = ref.get(r["case"])
        rw = f"{r['register_s'] / base['register_s']:.2f}" if base else "–"
        rc = f"{r['register_cpu_s'] / base['register_cpu_s']:.2f}" if base else "–"
        lines.append(f"| {r['case']} | {r['method']} | {r['epe_mm']:.2f} | {r['epe95_mm']:.2f} | {_dice(r['dice'])} "
                     f"| {r['folding_pct']:.3f} | {r['register_s']:.1f} | {r['register_cpu_s']:.1f} | {rw} | {rc} |")
    return "\n".join(lines)


def _dice(value: float) -> str:
    return "–" if np.isnan(value) else f"{value:.3f}"


def initial_rows(cases: list[str], out: Path) -> list[dict[str, Any]]:
    """The identity field's scores (the task's difficulty)."""
    rows = []
    for case in cases:
        data = np.load(case_path(out, case))
        zero = np.zeros_like(data["truth"])
        rows.append({"method": "identity", "case": case, "ok": True, "register_s": 0.0, "register_cpu_s": 0.0,
                     **score(case, zero, out), "min_jac_truth": jacobian_min(data["truth"])})
    return rows


def main(argv: list[str] | None = None) -> int:
    global SHARED
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "_run":
        p = argparse.ArgumentParser()
        p.add_argument("method")
        p.add_argument("case", choices=sorted(CASES))
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--threads", type=int, default=2)
        a = p.parse_args(argv[1:])
        import torch

        torch.set_num_threads(a.threads)
        run_one(a.method, a.case, a.out, a.threads)
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", type=Path, default=SHARED)
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "known_warp")
    p.add_argument("--methods", default=f"dinoreg-mind,dinoreg-mind:mi_iterations=0,"
                                        f"dinoreg-mind:mi_cross_contrast=skip+mi_select_smoothing=0,{REFERENCE},ants",
                   help="comma list: dinoreg-<preset>[:key=value+...], elastix4, elastix, ants; "
                        "separate overrides of one dinoreg method with '+'")
    p.add_argument("--cases", default=None, help=f"comma list of {', '.join(CASES)}")
    p.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    p.add_argument("--threads", type=int, default=2, help="threads per run (torch, OpenMP, ITK)")
    a = p.parse_args(argv)
    SHARED = a.shared.resolve()
    out = a.out.resolve()
    (out / "runs").mkdir(parents=True, exist_ok=True)
    cases = a.cases.split(",") if a.cases else list(QUICK if a.quick else CASES)
    methods = [m.replace("+", ",") for m in a.methods.split(",")]
    rows = []
    for case in cases:
        ensure_case(case, SHARED, out)
    for row in initial_rows(cases, out):
        print(json.dumps(row), flush=True)
        rows.append(row)
    for case in cases:
        for method in methods:
            row = launch(method, case, out, a.threads)
            if row["ok"]:
                row.update(score(case, np.load(out / "runs" / f"{_slug(method)}__{case}.npy"), out))
            print(json.dumps(row), flush=True)
            rows.append(row)
    text = table(rows)
    (out / "known_warp.json").write_text(json.dumps(rows, indent=2))
    (out / "known_warp.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
