"""Quick usefulness check of dino3d features: nearest-neighbour correspondences.

Usage: PYTHONPATH=src python scripts/dino3d_sanity.py WEIGHTS.safetensors [DATA_DIR]

1. *Known shift*: the voxelmorph T1 brain (160x192x224) and a copy translated by a known
   offset (voxels), both cropped to the same central 96x128x128 block (to keep it quick). Both are encoded; each foreground feature voxel of the original looks for its
   most similar (cosine) feature voxel in the shifted copy within +-3 cells; we report the
   end-point error (voxels) of the found offset against the true one and the fraction within
   half a cell diagonal (3.46 voxels, i.e. the nearest cell offset was found).
2. *Cross-sequence, no motion*: BraTS-Reg baseline T1ce vs FLAIR (co-registered, true offset 0),
   central 128x128x96 block, same search - a probe of modality robustness.

Compared: the trained weights, the same architecture at random initialisation, and raw 4x4x4
intensity patches (64-vector per cell) as a no-learning baseline.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from dino3d_probe import nn_offsets, patch_features, shift_volume  # noqa: E402  (the probe's own helpers)

from dinoreg.features.vit3d import Dino3DEncoder, ViT3D, load_vit3d
from dinoreg.io.images import load_image
from dinoreg.pretrain.data import preprocess


def score(fa: torch.Tensor, fb: torch.Tensor, true_vox: tuple[float, float, float], fg: torch.Tensor,
          p: int = 4) -> tuple[float, float]:
    """(mean end-point error in voxels, fraction within half a cell diagonal) over foreground cells.

    Offsets are found at cell resolution (multiples of ``p``), so a shift that is not a multiple
    of ``p`` has a floor error (e.g. 2.45 vox for (6, -5, 3)); half the cell diagonal
    (``p*sqrt(3)/2`` = 3.46 vox) accepts the nearest cell offset.
    """
    off = nn_offsets(fa, fb).float() * p
    err = (off - torch.tensor(true_vox).view(3, 1, 1, 1)).norm(dim=0)[fg]
    return float(err.mean()), float((err <= p * 3 ** 0.5 / 2).float().mean())


def cell_mask(vol: torch.Tensor, p: int = 4, margin: int = 3) -> torch.Tensor:
    """Foreground cells (mean intensity > 0.05), away from the border by ``margin`` cells."""
    m = patch_features(vol, p).mean(0) > 0.05
    border = torch.zeros_like(m)
    border[margin:-margin, margin:-margin, margin:-margin] = True
    return m & border


def main() -> None:
    weights = Path(sys.argv[1])
    data = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).resolve().parents[2] / "shared" / "data"
    trained, _ = load_vit3d(weights)
    torch.manual_seed(0)
    random = ViT3D(trained.config).eval()
    brain = torch.from_numpy(preprocess(load_image(data / "voxelmorph_brain_t1" / "test_scan_vol.nii.gz").array))
    b0 = data / "bratsreg_002_dirac"
    t1ce = torch.from_numpy(preprocess(load_image(b0 / "BraTSReg_002_00_0000_t1ce.nii.gz").array))
    flair = torch.from_numpy(preprocess(load_image(b0 / "BraTSReg_002_00_0000_flair.nii.gz").array))
    encoders = {"trained": Dino3DEncoder(trained).encode, "random-init": Dino3DEncoder(random).encode,
                "raw 4^3 patches": patch_features}
    box = (slice(32, 128), slice(32, 160), slice(48, 176))  # 96x128x128 central block
    for shift in [(8, -4, 4), (6, -5, 3)]:
        moved = shift_volume(brain, shift)[box]
        fg = cell_mask(brain[box])
        for name, enc in encoders.items():
            t0 = time.perf_counter()
            epe, acc = score(enc(brain[box]), enc(moved), shift, fg)
            print(f"brain shift {shift}: {name:16s} EPE {epe:5.2f} vox, within 3.5 vox {acc:6.1%}"
                  f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    box = (slice(56, 184), slice(56, 184), slice(30, 126))  # 128x128x96 central block
    fg = cell_mask(t1ce[box])
    for name, enc in encoders.items():
        epe, acc = score(enc(t1ce[box]), enc(flair[box]), (0.0, 0.0, 0.0), fg)
        print(f"BraTS T1ce vs FLAIR (no motion): {name:16s} EPE {epe:5.2f} vox, within 3.5 vox {acc:6.1%}", flush=True)


if __name__ == "__main__":
    main()
