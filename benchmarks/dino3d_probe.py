"""Nearest-neighbour correspondence probe of dense 3D features on held-out shared pairs.

Each probe pairs a volume with a second one whose content is the first's anatomy moved by a known
translation (voxels): the same image (mono-modal) or another co-registered sequence of the same
scan (multi-modal). Both are encoded; every foreground cell of the first looks for its most
similar (cosine) cell of the second within +-3 cells; the found offset (cells x 4 voxels) is
compared to the true one. Reported per probe: the share of cells whose nearest cell offset was
found (error <= half a cell diagonal, 3.46 voxels) and the mean end-point error (voxels).

Probes (all on images that the dino3d training recipe holds out):
  brain        voxelmorph test_scan T1, central 96x128x128 block, shift (6, -5, 3)
  ct           abdominal CT example_ct_sm on the 2 mm abdomen grid (benchmarks/abdomen_pair.py), shift (4, -3, 2)
  brats-t2-t1ce   BraTS-Reg 002 baseline T2 vs T1ce (co-registered), 128x128x96 block, shift (6, -5, 3)
  brats-flair-t1  the same with FLAIR vs T1, shift (-5, 6, 4)

Features compared: each dino3d checkpoint given, the same architecture at random
initialisation (seed 0), raw 4x4x4 intensity patches (64 values per cell) and MIND-SSC averaged
over the 4x4x4 cells (12 channels).

Usage: python benchmarks/dino3d_probe.py [WEIGHTS ...] [--shared ../shared] [--json OUT.json]
       [--no-baselines]   (the old shipped weights: src/dinoreg/assets/dino3d_shareddata.safetensors)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

HALF_DIAGONAL = 4 * 3 ** 0.5 / 2


def shift_volume(vol: torch.Tensor, offset: tuple[int, int, int]) -> torch.Tensor:
    """``out[p] = vol[p - offset]`` (zeros where undefined): content moves by ``+offset``."""
    out = torch.zeros_like(vol)
    src = tuple(slice(max(0, -o), n - max(0, o)) for o, n in zip(offset, vol.shape))
    dst = tuple(slice(max(0, o), n - max(0, -o)) for o, n in zip(offset, vol.shape))
    out[dst] = vol[src]
    return out


def patch_features(vol: torch.Tensor, p: int = 4) -> torch.Tensor:
    """Raw intensity patches ``(p^3, I/p, J/p, K/p)`` (zero-padded)."""
    pads = [x for s in reversed(vol.shape) for x in (0, (-s) % p)]
    v = F.pad(vol[None, None], pads)[0, 0]
    n = [s // p for s in v.shape]
    return v.reshape(n[0], p, n[1], p, n[2], p).permute(1, 3, 5, 0, 2, 4).reshape(p ** 3, *n)


def mind_features(vol: torch.Tensor, p: int = 4) -> torch.Tensor:
    """MIND-SSC ``(12, I/p, J/p, K/p)`` averaged over cells of ``p`` voxels."""
    from dinoreg.features.mind import mind_ssc

    return mind_ssc(vol[None, None].float(), pool=p)[0]


def nn_offsets(fa: torch.Tensor, fb: torch.Tensor, radius: int = 3) -> torch.Tensor:
    """For every cell of ``fa`` the offset ``d`` (cells, ``|d|_inf <= radius``) maximising
    ``cosine(fa[x], fb[x + d])``: ``(3, I, J, K)`` long."""
    a = F.normalize(fa.float(), dim=0)
    b = F.normalize(fb.float(), dim=0)
    r = radius
    bp = F.pad(b[None], (r, r, r, r, r, r))[0]
    best = torch.full(a.shape[1:], -2.0)
    arg = torch.zeros((3,) + tuple(a.shape[1:]), dtype=torch.long)
    n_i, n_j, n_k = a.shape[1:]
    for di in range(-r, r + 1):
        for dj in range(-r, r + 1):
            for dk in range(-r, r + 1):
                sim = (a * bp[:, r + di:r + di + n_i, r + dj:r + dj + n_j, r + dk:r + dk + n_k]).sum(0)
                better = sim > best
                best = torch.where(better, sim, best)
                for axis, d in enumerate((di, dj, dk)):
                    arg[axis][better] = d
    return arg


def cell_mask(vol: torch.Tensor, p: int = 4, margin: int = 3) -> torch.Tensor:
    """Foreground cells (mean intensity > 0.05), ``margin`` cells away from the border."""
    m = patch_features(vol, p).mean(0) > 0.05
    border = torch.zeros_like(m)
    border[margin:-margin, margin:-margin, margin:-margin] = True
    return m & border


def score(fa: torch.Tensor, fb: torch.Tensor, shift: tuple[int, int, int], fg: torch.Tensor) -> dict[str, float]:
    """Share of foreground cells within half a cell diagonal of the true shift, and mean EPE (voxels)."""
    n = min(fa.shape[1:], fb.shape[1:])
    fa, fb, fg = fa[:, :n[0], :n[1], :n[2]], fb[:, :n[0], :n[1], :n[2]], fg[:n[0], :n[1], :n[2]]
    off = nn_offsets(fa, fb).float() * 4
    err = (off - torch.tensor(shift, dtype=torch.float32).view(3, 1, 1, 1)).norm(dim=0)[fg]
    return {"hit": float((err <= HALF_DIAGONAL).float().mean()), "epe": float(err.mean())}


def probes(shared: Path, work: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]]:
    """``name -> (first volume, second volume (already shifted), shift)`` in ``[0, 1]``."""
    from dinoreg.io.images import load_image
    from dinoreg.preprocess import normalise

    data = shared / "data"
    load = lambda path: torch.from_numpy(normalise(load_image(path).array))  # noqa: E731
    out = {}
    brain = load(data / "voxelmorph_brain_t1" / "test_scan_vol.nii.gz")
    box = (slice(32, 128), slice(32, 160), slice(48, 176))
    shift = (6, -5, 3)
    out["brain"] = (brain[box], shift_volume(brain, shift)[box], shift)
    from abdomen_pair import build_abdomen_pair

    ct = load(build_abdomen_pair(shared, work / "abdomen_pair")["fixed"])
    out["ct"] = (ct, shift_volume(ct, (4, -3, 2)), (4, -3, 2))
    b0 = data / "bratsreg_002_dirac"
    box = (slice(56, 184), slice(56, 184), slice(30, 126))
    for name, (a, b), shift in (("brats-t2-t1ce", ("t2", "t1ce"), (6, -5, 3)),
                                ("brats-flair-t1", ("flair", "t1"), (-5, 6, 4))):
        va = load(b0 / f"BraTSReg_002_00_0000_{a}.nii.gz")
        vb = load(b0 / f"BraTSReg_002_00_0000_{b}.nii.gz")
        out[name] = (va[box], shift_volume(vb, shift)[box], shift)
    return out


def dino3d_features(path: str | None, random_init: bool = False, overlap: float = 0.25) -> Callable:
    """Encoder function of a checkpoint (``None``: the shipped one), or its architecture at random init."""
    from dinoreg.features.vit3d import Dino3DEncoder, ViT3D, load_vit3d
    from dinoreg.features.vit3d import SHIPPED_WEIGHTS

    model, _ = load_vit3d(path or SHIPPED_WEIGHTS)
    if random_init:
        torch.manual_seed(0)
        model = ViT3D(model.config).eval()
    return Dino3DEncoder(model, overlap=overlap).encode


def run(encoders: dict[str, Callable], shared: Path, work: Path,
        only: list[str] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """``{encoder: {probe: {"hit", "epe", "seconds"}}}`` (``only``: a subset of the probes)."""
    cases = {k: v for k, v in probes(shared, work).items() if not only or k in only}
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name, enc in encoders.items():
        results[name] = {}
        for probe, (a, b, shift) in cases.items():
            t0 = time.perf_counter()
            with torch.no_grad():
                row = score(enc(a), enc(b), shift, cell_mask(a))
            row["seconds"] = round(time.perf_counter() - t0, 1)
            results[name][probe] = row
            print(f"{probe:15s} {name:28s} hit {row['hit']:6.1%}  EPE {row['epe']:5.2f} vox  ({row['seconds']} s)",
                  flush=True)
    return results


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown: one row per encoder, ``hit % / EPE`` per probe."""
    probes_ = list(next(iter(results.values())))
    lines = ["| features | " + " | ".join(probes_) + " |", "|---" * (len(probes_) + 1) + "|"]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[p]['hit']:.1%} / {row[p]['epe']:.2f}" for p in probes_) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", nargs="*", help="dino3d checkpoints to probe")
    parser.add_argument("--shared", type=Path, default=HERE.parents[1] / "shared")
    parser.add_argument("--work", type=Path, default=Path("outputs/dino3d_probe"))
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--no-baselines", action="store_true", help="only the given checkpoints")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--probes", nargs="*", default=None, help="a subset: brain ct brats-t2-t1ce brats-flair-t1")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    encoders: dict[str, Callable] = {f"{Path(w).parent.parent.name}/{Path(w).stem}": dino3d_features(w)
                                     for w in args.weights}
    if not args.no_baselines:
        arch = args.weights[0] if args.weights else None
        encoders["random init"] = dino3d_features(arch, random_init=True)
        encoders["shipped"] = dino3d_features(None)
        encoders["raw 4^3 patches"] = patch_features
        encoders["MIND-SSC (4^3 mean)"] = mind_features
    results = run(encoders, args.shared.resolve(), args.work, args.probes)
    print(table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
