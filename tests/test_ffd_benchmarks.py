"""The FFD study/sweep scripts: the abdomen slice pair, NCC's best sweep setting, the sweep grid."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from conftest import SHARED, needs_data

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import ffd_study  # noqa: E402
import ffd_sweep  # noqa: E402


def test_ncc_best_takes_the_best_dice_under_the_sdlogj_cap(tmp_path):
    rows = [dict(pair="a", alpha=0.0, dice_mean=0.8, sdlogj=0.5), dict(pair="a", alpha=0.0, dice_mean=0.7, sdlogj=0.1),
            dict(pair="a", alpha=0.3, dice_mean=0.9, sdlogj=0.1), dict(pair="b", alpha=0.0, dice_mean=0.2, sdlogj=0.0)]
    path = tmp_path / "sweep.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert ffd_study.ncc_best(path, ["a", "b"])["a"]["dice_mean"] == 0.8
    best = ffd_study.ncc_best(path, ["a", "b"], max_sdlogj=0.15)
    assert best["a"]["dice_mean"] == 0.7 and best["b"]["dice_mean"] == 0.2


def test_sweep_runs_ncc_once_per_setting_whatever_the_feature_values():
    args = argparse.Namespace(
        alpha=[0.0, 0.3], grid_spacing=[3.0], reg_weight=[0.03, 0.1], iterations=[100], lr=[0.1], levels=[2, 1],
        feature_upsample=[1.0, 2.0], feature_layer=[0, 9], feature_distance=["cos"], no_balance=False)
    jobs = ffd_sweep.jobs(args)
    assert sum(j["alpha"] == 0 for j in jobs) == 2 and sum(j["alpha"] == 0.3 for j in jobs) == 8
    assert len({ffd_sweep.key("p", j) for j in jobs}) == len(jobs)


@needs_data
def test_abdomen_slice_pair_keeps_2mm_voxels_and_all_seven_organs(tmp_path):
    pair = ffd_study.load_pair(SHARED, ffd_study.PAIRS["abdomen"], tmp_path)
    assert pair["fixed"].shape == (128, 112, 1) == pair["moving_seg"].shape
    np.testing.assert_allclose(pair["fixed"].spacing, 2.0)
    for seg in (pair["fixed_seg"], pair["moving_seg"]):
        assert set(np.unique(seg.array)) >= set(range(1, 8))
    assert 0.2 < ffd_study.initial_metrics(pair)["dice_mean"] < 0.3      # 0.2489 measured
