"""benchmarks/demo_time.py: the end-to-end timing script reads what the demo command prints."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import load_script


def test_demo_time_reads_the_compute_seconds_of_the_time_line() -> None:
    demo_time = load_script("benchmarks/demo_time.py")
    out = "disp: x\ntime: 8.9 s (encode 2.2 s, optimise 3.5 s)\nmetrics: Dice 0.7041"
    assert demo_time.compute_seconds(out) == pytest.approx(5.7)
    with pytest.raises(ValueError, match="no 'time:' line"):
        demo_time.compute_seconds("metrics: Dice 0.7")
    args = demo_time.demo_args(Path("/d"), Path("/o"))
    assert args[:2] == ["register", "/d/learn2reg_tutorial2019_brain_t1/subject_1_vol.nii.gz"] and "--quiet" in args
