"""Typed settings: one strict conversion from flat key=value settings, presets as specs,
every bad value a one-line error before any work, and encoders/methods added by one module."""

from __future__ import annotations

import dataclasses
import json
from typing import ClassVar

import numpy as np
import pytest
import torch

from dinoreg import register
from dinoreg.cli import main
from dinoreg.errors import DinoregError
from dinoreg.features.base import EncodeRequest, EncoderSpec, PairFeatures, SlicewiseSpec
from dinoreg.features.registry import encoder_entry, encoder_names, slice_encoder, volume_encoder
from dinoreg.methods.ffd import FFDSpec
from dinoreg.optim.ffd import FFDRegistration
from dinoreg.presets import PRESETS, resolve
from dinoreg.spec import setting


def _pair(tmp_path, shape=(20, 22, 24), shift=1):
    grid = np.indices(shape, dtype=np.float32)
    fixed = (np.sin(grid[0] / 3.0) * np.cos(grid[1] / 4.0) + grid[2] / shape[2] + 2.0).astype(np.float32)
    moving = np.roll(fixed, shift, axis=0)
    np.save(tmp_path / "fixed.npy", fixed)
    np.save(tmp_path / "moving.npy", moving)
    return tmp_path / "fixed.npy", tmp_path / "moving.npy"


# --------------------------------------------------------------------------- the spec

def test_presets_are_specs_with_their_defaults():
    mind = PRESETS["mind"].spec
    assert mind.describe() == "convexadam on mind"
    assert mind.method.iterations == 50 and mind.method.lambda_weight == 1.25
    assert PRESETS["convexadam"].spec.method.iterations == 80
    # the MI level: on with the mind optimiser (gated to one contrast), off where a preset reproduces a package
    assert mind.method.mi_iterations == 100 and mind.method.mi_min_correlation == 0.5
    assert PRESETS["convexadam"].spec.method.mi_iterations == 0
    assert PRESETS["dinoreg"].spec.method.mi_iterations == 100
    assert PRESETS["dinoreg-paper"].spec.method.name == "adam"  # the authors' optimiser: no MI level
    assert "dino3d" not in PRESETS  # below identity on the abdomen and BraTS (README): no preset until it is not
    assert resolve("mind", {"features": "dino3d"}).encoders[0].overlap == 0.25
    assert PRESETS["dinoreg-ensemble"].spec.ensemble.ensemble_weights == (1.0, 0.05)
    # the FFD optimiser and its settings agree on the default (they had drifted: 100 vs 200)
    assert FFDSpec().iterations == FFDRegistration().iterations[0]


def test_flat_values_are_coerced_and_recorded():
    spec = resolve("mind", {"iterations": "7", "ic": "false", "ct_window": "-600,1500", "seed": 3})
    assert spec.method.iterations == 7 and spec.method.ic is False
    assert spec.preprocess.ct_window == (-600.0, 1500.0) and spec.seed == 3
    flat = spec.to_flat()
    assert flat["method"] == "convexadam" and flat["features"] == "mind" and flat["iterations"] == 7
    assert resolve("mind", flat) == spec  # the flat view round-trips


@pytest.mark.parametrize("key,value,needle", [
    ("iteratons", 1, "unknown setting 'iteratons'"),
    ("nonsense", 1, "unknown setting 'nonsense'"),
    ("weights", "x.pth", "unknown setting 'weights'"),  # the mind preset uses no weights
    ("lambda_weight", float("nan"), "'lambda_weight' must be a finite number >= 0"),
    ("lambda_weight", float("inf"), "'lambda_weight'"),
    ("lambda_weight", -1, "'lambda_weight'"),
    ("iterations", -5, "'iterations' must be an integer >= 0"),
    ("iterations", 2.5, "'iterations'"),
    ("grid_sp", 0, "'grid_sp' must be an integer >= 1"),
    ("grid_sp_adam", 0, "'grid_sp_adam'"),
    ("disp_hw", -1, "'disp_hw' must be an integer >= 0"),
    ("mr_percentile", 150, "'mr_percentile'"),
    ("mask_threshold", -1, "'mask_threshold'"),
    ("seed", -1, "'seed'"),
    ("similarity", "mi", "'similarity' must be one of ssd, lcc"),
    ("mi_min_correlation", 1.5, "'mi_min_correlation' must be a finite number >= -1 and <= 1"),
    ("mi_sample_margin", -1, "'mi_sample_margin' must be an integer >= 0"),
    ("mi_lr_end", 0, "'mi_lr_end'"),
    ("mi_base_smoothing", -1, "'mi_base_smoothing' must be an integer >= 0"),
    ("mi_select_smoothing", 32, "'mi_select_smoothing'"),
    ("mi_select_lr_end", 0, "'mi_select_lr_end'"),
    ("mi_select_grid_sp", 33, "'mi_select_grid_sp'"),
    ("mi_select_grid_sp", -1, "'mi_select_grid_sp'"),
    ("mi_select_iterations", -1, "'mi_select_iterations' must be an integer >= 0"),
    ("mi_cross_contrast", "always", "'mi_cross_contrast' must be one of skip, check"),
    ("ic", "maybe", "'ic' must be true or false"),
    ("ct_window", [50], "'ct_window' must be 2 values"),
    ("ct_window", [50, 0], "positive width"),
    ("features", "mind+mind", "twice"),
    ("features", "nosuch", "unknown encoder 'nosuch'; choose from"),
    ("method", "nosuch", "unknown method 'nosuch'; choose from"),
    ("ensemble_weights", [1, 2], "needs 1 value"),
])
def test_bad_settings_name_the_key(key, value, needle):
    with pytest.raises(DinoregError, match=needle.replace("(", r"\(").replace("+", r"\+")):
        resolve("mind", {key: value})


def test_iterations_zero_means_the_convex_stage_alone_but_is_refused_for_ffd():
    assert resolve("mind", {"iterations": 0}).method.iterations == 0
    with pytest.raises(DinoregError, match="'iterations' must be an integer >= 1"):
        resolve("ffd", {"iterations": 0})


def test_changing_method_takes_that_methods_defaults():
    spec = resolve("mind", {"method": "ffd"})
    assert spec.method.lr == FFDSpec().lr  # not ConvexAdam's 1.0
    assert spec.encoders == ()  # MIND cannot be FFD's loss encoder: dropped
    spec = resolve("ffd", {"method": "convexadam", "features": "mind"})
    assert spec.describe() == "convexadam on mind"
    with pytest.raises(DinoregError, match="2D slice encoder"):
        resolve("ffd", {"features": "mind"})
    with pytest.raises(DinoregError, match="'alpha' > 0 needs an encoder"):
        resolve("ffd", {"alpha": 0.3})
    with pytest.raises(DinoregError, match="'feature_layer' 6 needs the dinov2 encoder"):
        resolve("ffd", {"features": "litemedsam", "alpha": 0.3, "feature_layer": 6})
    with pytest.raises(DinoregError, match="needs at least one encoder"):
        resolve("mind", {"features": "none"})


def test_a_key_sets_every_component_holding_it():
    spec = resolve("dinoreg-ensemble", {"pca_components": 8, "every": 2})
    assert spec.encoders[1].pca_components == 8 and spec.encoders[1].every == 2
    spec = resolve("mind", {"features": "dinov2+dino3d", "pca_components": 6})
    assert [e.pca_components for e in spec.encoders] == [6, 6]


def test_register_rejects_a_misspelt_key_before_any_work(tmp_path):
    fixed, moving = _pair(tmp_path)
    with pytest.raises(DinoregError, match="iteratons"):
        register(fixed, moving, iteratons=1, progress=False)


def test_result_and_metrics_json_record_the_resolved_spec(tmp_path):
    fixed, moving = _pair(tmp_path)
    result = register(fixed, moving, iterations=3, progress=False, device="cpu")
    assert result.settings["method"]["iterations"] == 3 and result.settings["preset"] == "mind"
    assert result.settings["encoders"][0] == {"name": "mind", **dataclasses.asdict(PRESETS["mind"].spec.encoders[0])}
    result.save(tmp_path / "out")
    record = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert record["settings"]["method"]["name"] == "convexadam" and record["settings"]["seed"] == 0


# --------------------------------------------------------------------------- the CLI: one line, exit 2, nothing written

BAD_REGISTER = [
    ["--lambda", "nan"], ["--lambda", "inf"], ["--lambda", "-1"], ["--iterations", "-5"],
    ["--method", "ffd", "--iterations", "0"],
    ["--mask-threshold", "-1"], ["--grid-sp", "0"], ["--grid-sp-adam", "0"], ["--disp-hw", "-1"],
    ["--mr-percentile", "150"], ["--seed", "-1"], ["--set", "nonsense=1"], ["--set", "iterations"],
    ["--weights", "w.pth"], ["--method", "ffd", "--features", "mind", "--alpha", "0.3"], ["--similarity", "mi"],
    ["--features", "nosuch"], ["--preset", "nosuch"], ["--device", "tpu"], ["--iterations", "ten"],
    ["--set", "mi_min_correlation=2"], ["--set", "mi_sample_margin=-3"],
]


@pytest.mark.parametrize("extra", BAD_REGISTER, ids=lambda e: " ".join(e))
def test_register_bad_option_is_one_line_and_writes_nothing(tmp_path, capsys, extra):
    fixed, moving = _pair(tmp_path)
    out = tmp_path / "out"
    try:
        code = main(["register", str(fixed), str(moving), "-o", str(out), "--quiet", *extra])
    except SystemExit as exc:  # argparse's own checks (types) exit through the parser
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dinoreg: error: "), err
    assert not out.exists()


def test_parser_errors_are_one_line_with_status_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["register", "a.nii.gz", "b.nii.gz", "-o", str(tmp_path / "o"), "--iterations", "ten"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dinoreg: error: argument --iterations")


@pytest.mark.parametrize("argv", [
    ["encode", "{fixed}", "-o", "{out}/f.nii.gz", "--features", "mind", "--components", "0"],
    ["encode", "{fixed}", "-o", "{out}/f.nii.gz", "--features", "mind", "--components", "-1"],
    ["pretrain", "{tmp}", "-o", "{out}", "--batch-size", "0"],
    ["pretrain", "{tmp}", "-o", "{out}", "--steps", "0"],
])
def test_other_commands_reject_bad_values(tmp_path, capsys, argv):
    fixed, _ = _pair(tmp_path)
    out = tmp_path / "out"
    args = [a.format(fixed=fixed, out=out, tmp=tmp_path) for a in argv]
    try:
        code = main(args)
    except SystemExit as exc:
        code = exc.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("dinoreg: error: "), err
    assert not out.exists()


def test_method_ffd_alone_selects_the_ffd_preset(tmp_path, capsys):
    fixed, moving = _pair(tmp_path, shape=(24, 24, 1))
    code = main(["register", str(fixed), str(moving), "-o", str(tmp_path / "o"), "--quiet", "--method", "ffd",
                 "--iterations", "2", "--grid-spacing", "6"])
    assert code == 0
    record = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert record["settings"]["preset"] == "ffd" and record["settings"]["method"]["lr"] == FFDSpec().lr


def test_presets_command_lists_every_preset_and_setting(capsys):
    assert main(["presets"]) == 0
    listing = capsys.readouterr().out
    for name, item in PRESETS.items():
        assert name in listing and item.spec.describe() in listing
    assert main(["presets", "--keys"]) == 0
    keys = capsys.readouterr().out
    for key in ("grid_sp", "mind_pool", "upsample", "alpha", "mask_threshold", "seed"):
        assert f"  {key}: " in keys
    assert main(["presets", "--encoders"]) == 0
    assert set(encoder_names()) <= set(capsys.readouterr().out.split())


# --------------------------------------------------------------------------- adding an encoder is one module

@dataclasses.dataclass(frozen=True)
class ToySpec(EncoderSpec):
    name: ClassVar[str] = "toy-gradient"
    sigma: float = setting(1.0, "smoothing before the gradient, voxels", low=0.0)


@volume_encoder("toy-gradient", ToySpec, "intensity and its gradient magnitude (a test encoder)")
def _toy_pair(req: EncodeRequest) -> PairFeatures:
    out = []
    for _, array in (("fixed", req.fixed), ("moving", req.moving)):
        image = torch.from_numpy(array)[None, None]
        grads = torch.gradient(image[0, 0])
        out.append(torch.cat([image, torch.stack(grads).pow(2).sum(0).sqrt()[None, None]], 1))
    return PairFeatures(out[0], out[1])


class _TinyNet(torch.nn.Module):
    """A 2D 'network' with 4x4 patches: mean intensity and two gradients per patch."""

    name, patch_size, embed_dim = "tiny", 4, 3

    def preprocess(self, grey: torch.Tensor) -> torch.Tensor:
        return grey

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        gy, gx = torch.gradient(x[:, 0], dim=(1, 2))
        feats = torch.stack([x[:, 0], gy, gx], 1)
        return torch.nn.functional.avg_pool2d(feats, 4), None


@dataclasses.dataclass(frozen=True)
class TinySpec(SlicewiseSpec):
    name: ClassVar[str] = "toy-tiny2d"


@slice_encoder("toy-tiny2d", TinySpec, "a tiny 2D test network")
def _load_tiny(spec: TinySpec, device: str) -> _TinyNet:
    return _TinyNet()


def test_a_registered_volume_encoder_feeds_convexadam(tmp_path):
    fixed, moving = _pair(tmp_path)
    assert encoder_entry("toy-gradient").kind == "volume" and "toy-gradient" in encoder_names()
    result = register(fixed, moving, features="toy-gradient", sigma=2.0, iterations=5, progress=False, device="cpu")
    assert result.settings["encoders"][0] == {"name": "toy-gradient", "sigma": 2.0}
    assert np.isfinite(result.disp).all() and np.abs(result.disp).max() > 0


def test_a_registered_2d_encoder_feeds_convexadam_slice_by_slice(tmp_path):
    fixed, moving = _pair(tmp_path, shape=(24, 24, 16))
    result = register(fixed, moving, features="toy-tiny2d", upsample=1.0, every=2, pca_components=3,
                      iterations=5, progress=False, device="cpu")
    assert result.settings["encoders"][0]["name"] == "toy-tiny2d"
    assert np.isfinite(result.disp).all()
    with pytest.raises(DinoregError, match="unknown setting 'sigma'"):
        resolve("mind", {"features": "toy-tiny2d", "sigma": 1})
