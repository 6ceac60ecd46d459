"""Learn2Reg dataset.json parsing, companion files and output names."""

from __future__ import annotations

import json

import pytest

from dinoreg.errors import DinoregError
from dinoreg.io.learn2reg import Pair, disp_name, load_dataset


def _dataset(tmp_path, meta=None, files=()):
    root = tmp_path / "Task"
    for folder in ("imagesTr", "labelsTr", "masksTr", "keypointsTr"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for f in files:
        (root / f).write_bytes(b"")
    if meta is None:
        meta = {
            "name": "OASIS", "tensorImageShape": {"0": [160, 224, 192]}, "modality": {"0": "MR"},
            "labels": {"0": "background", "1": "cortex"},
            "registration_val": [{"fixed": "./imagesTr/OASIS_0395_0000.nii.gz",
                                  "moving": "./imagesTr/OASIS_0396_0000.nii.gz"}],
            "training_paired_images": [{"fixed": "./imagesTr/NLST_0001_0000.nii.gz",
                                        "moving": "./imagesTr/NLST_0001_0001.nii.gz"}],
        }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


FILES = ("imagesTr/OASIS_0395_0000.nii.gz", "imagesTr/OASIS_0396_0000.nii.gz",
         "labelsTr/OASIS_0395_0000.nii.gz", "labelsTr/OASIS_0396_0000.nii.gz",
         "masksTr/OASIS_0395_0000.nii.gz",
         "imagesTr/NLST_0001_0000.nii.gz", "imagesTr/NLST_0001_0001.nii.gz",
         "keypointsTr/NLST_0001_0000.csv", "keypointsTr/NLST_0001_0001.csv")


def test_pairs_with_companion_files(tmp_path):
    root = _dataset(tmp_path, files=FILES)
    ds = load_dataset(root)                       # the folder or the json both work
    assert ds.name == "OASIS" and ds.tensor_image_shape == (160, 224, 192)
    assert ds.modality == {"0": "MR"} and ds.labels["1"] == "cortex"
    (pair,) = ds.pairs("val")
    assert isinstance(pair, Pair) and pair.fixed.is_absolute()
    assert pair.fixed == (root / "imagesTr/OASIS_0395_0000.nii.gz").resolve()
    assert pair.fixed_label == (root / "labelsTr/OASIS_0395_0000.nii.gz").resolve()
    assert pair.moving_label is not None and pair.fixed_mask is not None
    assert pair.moving_mask is None and pair.fixed_keypoints is None
    assert pair.disp_name == "disp_0395_0000_0396_0000.nii.gz"
    (train,) = load_dataset(root / "dataset.json").pairs("train-pairs")
    assert train.fixed_keypoints == (root / "keypointsTr/NLST_0001_0000.csv").resolve()
    assert train.moving_keypoints is not None and train.fixed_label is None
    assert train.disp_name == "disp_0001_0001.nii.gz"


def test_disp_names():
    assert disp_name("a/NLST_0101_0000.nii.gz", "b/NLST_0101_0001.nii.gz") == "disp_0101_0101.nii.gz"
    assert disp_name("OASIS_0395_0000.nii.gz", "OASIS_0396_0000.nii.gz") == "disp_0395_0000_0396_0000.nii.gz"
    assert disp_name("ThoraxCBCT_0011_0001.nii.gz", "ThoraxCBCT_0011_0000.nii.gz") == \
        "disp_0011_0001_0011_0000.nii.gz"
    assert disp_name("/x/fixed_scan.nii.gz", "/y/moving.mha") == "disp_fixed_scan_moving.nii.gz"


def test_unchecked_pairs_and_errors(tmp_path):
    root = _dataset(tmp_path, files=FILES[:1])
    ds = load_dataset(root)
    with pytest.raises(DinoregError, match="OASIS_0396_0000.nii.gz.*not found"):
        ds.pairs("val")
    assert ds.pairs("val", check=False)[0].moving.name == "OASIS_0396_0000.nii.gz"
    with pytest.raises(DinoregError, match="unknown split"):
        ds.pairs("training")
    with pytest.raises(DinoregError, match="registration_test"):
        ds.pairs("test")


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"name": "x"}', "lists no pairs"),
    ('{"registration_val": {"fixed": "a"}}', "must be a list"),
])
def test_malformed_dataset_json(tmp_path, content, message):
    p = tmp_path / "dataset.json"
    p.write_text(content)
    with pytest.raises(DinoregError, match=message) as info:
        load_dataset(p)
    assert str(p) in str(info.value)


def test_bad_pair_entry_and_missing_json(tmp_path):
    root = _dataset(tmp_path, meta={"registration_val": [{"fixed": "./imagesTr/a.nii.gz"}]})
    with pytest.raises(DinoregError, match=r"registration_val\[0\]"):
        load_dataset(root).pairs("val")
    with pytest.raises(DinoregError, match="dataset.json not found"):
        load_dataset(tmp_path / "nowhere")
