"""Ensembles by channel concatenation (features.ensemble)."""

from __future__ import annotations

import torch

from dinoreg.features.base import PairFeatures
from dinoreg.features.ensemble import combine_features
from dinoreg.presets import PRESETS


def _part(channels: int, value: float, init: torch.Tensor | None = None) -> PairFeatures:
    return PairFeatures(torch.full((1, channels, 4, 5, 6), value), torch.full((1, channels, 4, 5, 6), value), init)


def test_blocks_are_scaled_to_their_weight_relative_to_the_first():
    out = combine_features([_part(12, 1.0), _part(24, 5.0)], [1.0, 0.25])
    assert out.fixed.shape[1] == 36
    first = out.fixed[:, :12].pow(2).sum(1).mean()
    second = out.fixed[:, 12:].pow(2).sum(1).mean()
    torch.testing.assert_close(second / first, torch.tensor(0.25))


def test_a_zero_weight_block_gives_only_its_initial_field():
    init = torch.ones(1, 3, 4, 5, 6)
    out = combine_features([_part(12, 1.0), _part(24, 5.0, init)], [1.0, 0.0])
    assert out.fixed.shape[1] == 12 and out.init is init
    spec = PRESETS["dinoreg-fast"].spec  # MIND + DINOv2's slice-match start
    assert [e.name for e in spec.encoders] == ["mind", "dinov2"] and spec.ensemble.ensemble_weights == (1.0, 0.0)


def test_refine_weights_give_the_refinement_stages_their_own_blocks():
    from dataclasses import replace as _replace

    import numpy as np
    import pytest

    from dinoreg.errors import DinoregError
    from dinoreg.features.ensemble import EnsembleSpec
    from dinoreg.optim.convex_adam import stage_features
    from dinoreg.pair import RegistrationPair

    out = combine_features([_part(12, 1.0), _part(24, 5.0)], [1.0, 0.2], [1.0, 0.0])
    assert out.fixed.shape[1] == 36 and out.refine is not None and out.refine.fixed.shape[1] == 12
    torch.testing.assert_close(out.refine.fixed, out.fixed[:, :12])
    assert combine_features([_part(12, 1.0), _part(24, 5.0)], [1.0, 0.2], [1.0, 0.2]).refine is None
    shape = (4, 5, 6)
    pair = RegistrationPair(np.zeros(shape, np.float32), np.zeros(shape, np.float32), np.ones(shape, bool),
                            np.ones(shape, bool), None, np.eye(4), (1.0, 1.0, 1.0), torch.device("cpu"), out)
    assert stage_features(pair)[0].shape[1] == 36 and stage_features(pair, refine=True)[0].shape[1] == 12
    assert stage_features(_replace(pair, features=out.refine), refine=True)[0].shape[1] == 12
    assert EnsembleSpec(refine_weights=(1.0, 0.0)).refinement_weights(2, "mind+dinov2") == [1.0, 0.0]
    with pytest.raises(DinoregError, match="refine_weights.*2 values"):
        EnsembleSpec(refine_weights=(1.0,)).refinement_weights(2, "mind+dinov2")
    with pytest.raises(DinoregError, match="concat only"):
        EnsembleSpec(ensemble="average", refine_weights=(1.0, 0.0)).refinement_weights(2, "mind+dinov2")


def test_blocks_that_add_nothing_are_not_encoded():
    from dinoreg.pipeline import contributing
    from dinoreg.presets import resolve

    assert contributing(resolve("dinoreg-fast")) == [0, 1]  # the DINOv2 block gives the slice-match start
    assert contributing(resolve("dinoreg-fast", {"slice_match": False})) == [0]  # ... or nothing at all
    assert contributing(resolve("dinoreg", {"slice_match": False})) == [0, 1]  # power 0.2 in the convex search
    assert contributing(resolve("mind")) == [0]
    averaged = resolve("dinoreg-fast", {"slice_match": False, "ensemble": "average"})
    assert contributing(averaged) == [0, 1]
