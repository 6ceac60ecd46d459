"""``dinoreg export``: ITK/ANTs displacement fields that reproduce ``dinoreg.warp``, RAS-mm fields,
the inverse field, and one-line errors for bad input."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from conftest import DATA, write_nifti
from dinoreg.api import warp
from dinoreg.cli import main
from dinoreg.errors import DinoregError
from dinoreg.io.export import export_field, field_to_ras_mm, invert_field, inverse_residual
from dinoreg.io.images import load_image, sitk_to_array_affine

sitk = pytest.importorskip("SimpleITK")
BRATS = DATA / "bratsreg_002_dirac"
BRATS_FIXED = BRATS / "BraTSReg_002_00_0000_t1ce.nii.gz"
BRATS_MOVING = BRATS / "BraTSReg_002_01_0262_t1ce.nii.gz"
needs_brats = pytest.mark.skipif(not BRATS_FIXED.exists(), reason="../shared/data/bratsreg_002_dirac is not available")


def smooth_field(shape: tuple[int, ...], amplitude: float) -> np.ndarray:
    """A smooth invertible field of up to ``amplitude`` voxels (about one period per axis)."""
    g = np.meshgrid(*[np.linspace(0, 2 * np.pi, s) for s in shape], indexing="ij")
    return (amplitude * np.stack([np.sin(g[1]) * np.cos(0.7 * g[2]), np.sin(g[2]) * np.sin(0.8 * g[0]),
                                  np.cos(g[0]) * np.sin(0.9 * g[1])], -1)).astype(np.float32)


def _crop(path: Path, start: tuple[int, int, int], size: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A box of a volume with the affine of the box (the real scanner geometry, shifted)."""
    img = load_image(path)
    box = tuple(slice(s, s + n) for s, n in zip(start, size))
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ np.asarray(start, dtype=float) + img.affine[:3, 3]
    return np.ascontiguousarray(img.array[box]), affine


def _rotation(degrees: float, axis: int) -> np.ndarray:
    t = np.deg2rad(degrees)
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(4)
    r[i, i], r[i, j], r[j, i], r[j, j] = np.cos(t), -np.sin(t), np.sin(t), np.cos(t)
    return r


def _pearson(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    return float(np.corrcoef(a[mask].astype(np.float64), b[mask].astype(np.float64))[0, 1])


def _sitk_resample(moving: Path, fixed: Path, field_file: Path) -> np.ndarray:
    field = sitk.Cast(sitk.ReadImage(str(field_file)), sitk.sitkVectorFloat64)
    out = sitk.Resample(sitk.ReadImage(str(moving)), sitk.ReadImage(str(fixed)),
                        sitk.DisplacementFieldTransform(field), sitk.sitkLinear, 0.0)
    return sitk_to_array_affine(out)[0]


def _ants_resample(moving: Path, fixed: Path, field_file: Path) -> np.ndarray | None:
    try:
        import ants
    except ImportError:
        return None
    return ants.apply_transforms(ants.image_read(str(fixed)), ants.image_read(str(moving)),
                                 transformlist=[str(field_file)], interpolator="linear").numpy()


def _direct(moving: Path, fixed_affine: np.ndarray, disp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Single trilinear interpolation of the original moving image at the world points the
    field maps to (the definition), and those points in moving voxels."""
    mov = load_image(moving)
    shape = disp.shape[:3]
    pts = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"), -1) + disp
    to_moving = np.linalg.inv(mov.affine) @ fixed_affine
    q = pts @ to_moving[:3, :3].T + to_moving[:3, 3]
    return ndimage.map_coordinates(mov.array, np.moveaxis(q, -1, 0), order=1, cval=0.0), q


def _check_pair(tmp_path: Path, fixed: Path, moving: Path, disp: np.ndarray) -> dict[str, float]:
    """Export to ITK and ANTs, resample the original moving image with SimpleITK and ANTsPy,
    compare with ``dinoreg.warp`` over the fixed foreground; returns the Pearson r values."""
    fixed_img = load_image(fixed)
    field_path = write_nifti(tmp_path / "disp.nii.gz", disp, fixed_img.affine)
    reference = warp(moving, field_path).array
    exact, q = _direct(moving, fixed_img.affine, disp)
    # Where the field or the moving image's voxel grid ends the libraries pad differently (dinoreg
    # pads outside the fixed grid -- its field indexes the moving image resampled onto it --,
    # ITK extrapolates half a voxel, scipy not): compare where both grids hold the point.
    pts = np.stack(np.meshgrid(*[np.arange(n) for n in disp.shape[:3]], indexing="ij"), -1) + disp
    inside = np.all((pts >= 1) & (pts <= np.array(disp.shape[:3]) - 2), -1)
    inside &= np.all((q >= 1) & (q <= np.array(load_image(moving).shape) - 2), -1)
    mask = inside & (fixed_img.array > np.percentile(fixed_img.array, 50))
    assert mask.mean() > 0.3
    r: dict[str, float] = {}
    for to in ("itk", "ants"):
        out = tmp_path / f"field_{to}.nii.gz"
        result = export_field(field_path, fixed, out, to=to, moving=moving)
        assert result.path == out and out.exists()
        header = nib.load(str(out)).header
        assert header.get_intent()[0] == "vector" and int(header["intent_code"]) == 1007
        assert tuple(header["dim"][1:6]) == disp.shape[:3] + (1, 3)
    itk_arr = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "field_itk.nii.gz")))
    ants_arr = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "field_ants.nii.gz")))
    np.testing.assert_array_equal(itk_arr, ants_arr)  # one convention, two names
    resampled = _sitk_resample(moving, fixed, tmp_path / "field_itk.nii.gz")
    r["sitk"] = _pearson(resampled, reference, mask)
    r["sitk_exact"] = _pearson(resampled, exact, mask)
    by_ants = _ants_resample(moving, fixed, tmp_path / "field_ants.nii.gz")
    if by_ants is not None:
        r["ants"] = _pearson(by_ants, reference, mask)
        r["ants_exact"] = _pearson(by_ants, exact, mask)
    # .mha holds the same field
    export_field(field_path, fixed, tmp_path / "field.mha", to="itk")
    r["sitk_mha"] = _pearson(_sitk_resample(moving, fixed, tmp_path / "field.mha"), reference, mask)
    return r


@needs_brats
def test_itk_and_ants_reproduce_warp_on_bratsreg_pair(tmp_path):
    """Real scanner affines (flipped i and j); fixed and moving crops on different boxes."""
    fa, f_aff = _crop(BRATS_FIXED, (50, 40, 30), (112, 128, 96))
    ma, m_aff = _crop(BRATS_MOVING, (45, 45, 25), (120, 136, 104))
    fixed = write_nifti(tmp_path / "fixed.nii.gz", fa, f_aff)
    moving = write_nifti(tmp_path / "moving.nii.gz", ma, m_aff)
    r = _check_pair(tmp_path, fixed, moving, smooth_field(fa.shape, 3.0))
    print("BraTS-Reg pair, Pearson r:", r)
    assert r["sitk"] >= 0.999 and r["sitk_mha"] >= 0.999
    assert r["sitk_exact"] >= 0.99999
    if "ants" in r:
        assert r["ants"] >= 0.999 and r["ants_exact"] >= 0.99999


@needs_brats
def test_itk_and_ants_reproduce_warp_with_oblique_flipped_moving(tmp_path):
    """The moving image stored flipped along i, rotated 20 deg (and 10 deg) in the world, with
    anisotropic voxels: a different grid from the fixed one."""
    fa, f_aff = _crop(BRATS_FIXED, (50, 40, 30), (112, 128, 96))
    ma, m_aff = _crop(BRATS_MOVING, (45, 45, 25), (120, 136, 104))
    # dinoreg.warp interpolates twice here (onto the fixed grid, then along the field): smooth
    # the image a little so that the comparison measures the geometry, not the interpolation
    ma = ndimage.gaussian_filter(ma, 1.0)
    flip = np.array([[-1.0, 0, 0, ma.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    centre = np.eye(4)
    centre[:3, 3] = (m_aff @ np.r_[np.array(ma.shape) / 2.0, 1.0])[:3]
    oblique = (centre @ _rotation(20, 2) @ _rotation(10, 0) @ np.linalg.inv(centre) @ m_aff @ flip
               @ np.diag([1.1, 1.0, 0.9, 1.0]))
    fixed = write_nifti(tmp_path / "fixed.nii.gz", fa, f_aff)
    moving = write_nifti(tmp_path / "moving.nii.gz", np.ascontiguousarray(ma[::-1]), oblique)
    r = _check_pair(tmp_path, fixed, moving, smooth_field(fa.shape, 3.0))
    print("oblique/flipped pair, Pearson r:", r)
    assert r["sitk"] >= 0.999 and r["sitk_mha"] >= 0.999
    assert r["sitk_exact"] >= 0.99999
    if "ants" in r:
        assert r["ants"] >= 0.999 and r["ants_exact"] >= 0.99999


def test_mm_field_is_ras_millimetres(tmp_path):
    affine = np.array([[0.0, -1.5, 0.0, 10.0], [2.0, 0.0, 0.0, -5.0], [0.0, 0.0, -1.0, 3.0], [0, 0, 0, 1]])
    disp = smooth_field((12, 10, 8), 1.0)
    fixed = write_nifti(tmp_path / "fixed.nii.gz", np.zeros((12, 10, 8), np.float32), affine)
    field_path = write_nifti(tmp_path / "disp.nii.gz", disp, affine)
    export_field(field_path, fixed, tmp_path / "mm.nii.gz", to="mm")
    img = nib.load(str(tmp_path / "mm.nii.gz"))
    np.testing.assert_allclose(img.affine, affine)
    mm = img.get_fdata()
    p = np.array([3, 4, 5])
    moving_world = affine @ np.r_[p + disp[tuple(p)], 1.0]
    np.testing.assert_allclose((affine @ np.r_[p, 1.0])[:3] + mm[tuple(p)], moving_world[:3], atol=1e-5)
    np.testing.assert_allclose(field_to_ras_mm(disp, affine), mm, atol=1e-6)


def test_inverse_composes_to_identity(tmp_path):
    shape = (48, 44, 40)
    disp = smooth_field(shape, 3.0)
    inv, res = invert_field(disp)
    mask = np.zeros(shape, bool)
    mask[6:-6, 6:-6, 6:-6] = True
    inside = inverse_residual(disp, inv, mask)
    print("inverse residual:", res.line(), "| inside the mask:", inside.line())
    assert inside.max < 0.1 and inside.max_other < 0.1 and inside.mean_other < 0.03
    assert res.iterations < 100
    # the CLI prints the residual and writes the inverse as an ITK field
    fixed = write_nifti(tmp_path / "fixed.nii.gz", np.zeros(shape, np.float32), np.diag([1.2, 1.0, 0.8, 1.0]))
    field_path = write_nifti(tmp_path / "disp.nii.gz", disp, np.diag([1.2, 1.0, 0.8, 1.0]))
    out = tmp_path / "inv.nii.gz"
    code, stdout, _ = _run(["export", field_path, "--fixed", fixed, "--to", "itk", "-o", out, "--inverse"])
    assert code == 0 and "inverse residual" in stdout and out.exists()
    lps = sitk_to_array_affine(sitk.ReadImage(str(out)))[0]
    np.testing.assert_allclose(lps, inv * np.array([-1.2, -1.0, 0.8]), atol=1e-4)  # RAS -> LPS mm
    # ITK composes the forward and inverse transforms to the identity too (physical space)
    pts = [(-20.0, -12.0, 9.0), (-30.0, -20.0, 15.0)]  # LPS mm inside the grid
    fwd = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(_export_itk(tmp_path, field_path, fixed))),
                                                    sitk.sitkVectorFloat64))
    back = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(out)), sitk.sitkVectorFloat64))
    for x in pts:
        np.testing.assert_allclose(back.TransformPoint(fwd.TransformPoint(x)), x, atol=0.1)
        np.testing.assert_allclose(fwd.TransformPoint(back.TransformPoint(x)), x, atol=0.1)


def _export_itk(tmp_path: Path, field_path: Path, fixed: Path) -> Path:
    out = tmp_path / "fwd.nii.gz"
    export_field(field_path, fixed, out, to="itk")
    return out


def _run(args: list) -> tuple[int, str, str]:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture()
def small(tmp_path):
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    fixed = write_nifti(tmp_path / "fixed.nii.gz", np.random.default_rng(0).random((10, 9, 8)).astype(np.float32),
                        affine)
    field_path = write_nifti(tmp_path / "disp.nii.gz", smooth_field((10, 9, 8), 1.0), affine)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    return dict(fixed=fixed, field=field_path, out=out_dir, tmp=tmp_path, affine=affine)


def test_cli_writes_itk_field(small):
    out = small["out"] / "warp.nii.gz"
    code, stdout, stderr = _run(["export", small["field"], "--fixed", small["fixed"], "--moving", small["fixed"],
                                 "--to", "ants", "-o", out])
    assert code == 0 and f"ants: {out}" in stdout and "maps outside" in stderr
    assert sorted(p.name for p in small["out"].iterdir()) == ["warp.nii.gz"]  # no temporary left
    code, _, stderr = _run(["export", small["field"], "--fixed", small["fixed"], "--to", "mm", "-o",
                            small["out"] / "mm.nii.gz", "--quiet"])
    assert code == 0 and stderr == ""


@pytest.mark.parametrize("case", ["missing_field", "missing_fixed", "not_a_field", "wrong_grid", "nan",
                                  "unknown_to", "no_directory", "parent_is_file", "mm_suffix", "bad_suffix"])
def test_cli_errors_are_one_line_and_write_nothing(small, case):
    fixed, field_path, to, out = small["fixed"], small["field"], "itk", small["out"] / "warp.nii.gz"
    if case == "missing_field":
        field_path = small["tmp"] / "nope.nii.gz"
    elif case == "missing_fixed":
        fixed = small["tmp"] / "nope.nii.gz"
    elif case == "not_a_field":
        field_path = write_nifti(small["tmp"] / "scalar.nii.gz", np.zeros((10, 9, 8), np.float32))
    elif case == "wrong_grid":
        field_path = write_nifti(small["tmp"] / "other.nii.gz", np.zeros((10, 9, 7, 3), np.float32))
    elif case == "nan":
        bad = smooth_field((10, 9, 8), 1.0)
        bad[2, 3, 4, 1] = np.nan
        field_path = write_nifti(small["tmp"] / "nan.nii.gz", bad, small["affine"])
    elif case == "unknown_to":
        to = "fsl"
    elif case == "no_directory":
        out = small["tmp"] / "missing" / "warp.nii.gz"
    elif case == "parent_is_file":
        out = small["fixed"] / "warp.nii.gz"
    elif case == "mm_suffix":
        to, out = "mm", small["out"] / "warp.mha"
    elif case == "bad_suffix":
        out = small["out"] / "warp.txt"
    before = sorted(p.name for p in small["tmp"].rglob("*"))
    code, stdout, stderr = _run(["export", field_path, "--fixed", fixed, "--to", to, "-o", out])
    assert code == 2, stderr
    assert stderr.startswith("dinoreg: error: ") and stderr.count("\n") == 1, stderr
    assert stdout == ""
    assert sorted(p.name for p in small["tmp"].rglob("*")) == before  # nothing written


def test_api_rejects_bad_arrays(tmp_path):
    fixed = write_nifti(tmp_path / "fixed.nii.gz", np.zeros((6, 6, 6), np.float32))
    with pytest.raises(DinoregError, match="shape"):
        export_field(np.zeros((6, 6, 6, 2)), fixed, tmp_path / "x.nii.gz")
    with pytest.raises(DinoregError, match="NaN"):
        export_field(np.full((6, 6, 6, 3), np.inf), fixed, tmp_path / "x.nii.gz")
    assert not (tmp_path / "x.nii.gz").exists()


@needs_brats
def test_inverse_export_warps_fixed_onto_moving_grid(tmp_path):
    """``--inverse --to ants`` with ``-r moving``: the fixed image seen from the moving grid."""
    ants = pytest.importorskip("ants")
    fa, f_aff = _crop(BRATS_FIXED, (50, 40, 30), (112, 128, 96))
    ma, m_aff = _crop(BRATS_MOVING, (45, 45, 25), (120, 136, 104))
    fixed = write_nifti(tmp_path / "fixed.nii.gz", fa, f_aff)
    moving = write_nifti(tmp_path / "moving.nii.gz", ma, m_aff)
    disp = smooth_field(fa.shape, 3.0)
    field_path = write_nifti(tmp_path / "disp.nii.gz", disp, f_aff)
    result = export_field(field_path, fixed, tmp_path / "inv.nii.gz", to="ants", inverse=True)
    assert result.residual is not None and result.residual.max < 1e-3
    out = ants.apply_transforms(ants.image_read(str(moving)), ants.image_read(str(fixed)),
                                transformlist=[str(tmp_path / "inv.nii.gz")]).numpy()
    # definition: moving voxel q -> fixed voxel x = A_f^-1 A_m q -> x + v(x) -> sample the fixed image
    inv, _ = invert_field(disp)
    q = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in ma.shape], indexing="ij"), -1)
    to_fixed = np.linalg.inv(f_aff) @ m_aff
    x = q @ to_fixed[:3, :3].T + to_fixed[:3, 3]
    vx = np.stack([ndimage.map_coordinates(inv[..., c], np.moveaxis(x, -1, 0), order=1, mode="nearest")
                   for c in range(3)], -1)
    y = x + vx
    direct = ndimage.map_coordinates(fa, np.moveaxis(y, -1, 0), order=1)
    hi = np.array(fa.shape) - 2
    mask = np.all((x >= 1) & (x <= hi), -1) & np.all((y >= 1) & (y <= hi), -1) & (ma > np.percentile(ma, 50))
    assert mask.mean() > 0.3
    assert _pearson(out, direct, mask) >= 0.99999
