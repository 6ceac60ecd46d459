"""3D ViT, sliding-window encoder and dino3d checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from dinoreg.errors import DinoregError
from dinoreg.features.vit3d import (
    Dino3DEncoder, ViT3D, ViT3DConfig, align_to_field_of_view, blend_weights, load_vit3d,
    save_vit3d, sinusoidal_pos_embed_3d, sliding_window_features, window_starts,
)

torch.set_num_threads(1)
TINY = ViT3DConfig(embed_dim=24, depth=2, num_heads=2, window=16, pos_embed="sinusoidal")


def tiny_model(**kw) -> ViT3D:
    torch.manual_seed(0)
    return ViT3D(ViT3DConfig(**{**TINY.__dict__, **kw})).eval()


@pytest.mark.parametrize("shape", [(37, 41, 29), (16, 16, 16), (5, 9, 13)])
def test_encode_shapes_for_odd_sizes(shape):
    enc = Dino3DEncoder(tiny_model())
    feats = enc.encode(torch.rand(shape))
    assert feats.shape == (24,) + tuple(-(-s // 4) for s in shape)
    assert feats.dtype == torch.float32 and torch.isfinite(feats).all()


def test_sliding_window_equals_single_pass_when_volume_fits():
    model = tiny_model()
    vol = torch.rand(16, 12, 16)
    direct = model.features(vol[None, None])[0]
    windowed = sliding_window_features(model, vol, window=16, overlap=0.5)
    assert torch.allclose(windowed, direct, atol=1e-6)


@pytest.mark.parametrize("blend", ["gaussian", "linear", "constant"])
def test_sliding_window_stitches_a_local_model_exactly(blend):
    # depth 0 + zero learned position embedding: every token depends on its own patch only,
    # so correctly normalised blending must reproduce a single pass over the whole volume.
    model = tiny_model(depth=0, pos_embed="learned")
    with torch.no_grad():
        model.pos_embed.zero_()
    vol = torch.rand(40, 36, 27)
    windowed = sliding_window_features(model, vol, window=16, overlap=0.5, blend=blend)
    padded = torch.nn.functional.pad(vol, (0, 1))[None, None]
    assert torch.allclose(windowed, model.features(padded)[0], atol=1e-5)


def test_window_starts_cover_the_axis():
    for n, w, s in [(10, 4, 2), (9, 4, 3), (3, 4, 2), (16, 16, 8)]:
        starts = window_starts(n, w, s)
        covered = set()
        for a in starts:
            covered |= set(range(a, min(a + w, n)))
        assert covered == set(range(n)) and starts[-1] + min(w, n) == n


def test_blend_weights_peak_in_the_centre():
    w = blend_weights((5, 4, 3), "gaussian")[0, 0]
    assert w.shape == (5, 4, 3) and w.min() > 0 and w[2, 1, 1] == w.max()


def test_learned_pos_embed_adapts_to_grid():
    model = tiny_model(pos_embed="learned", pos_grid=(4, 4, 4))
    ref = model.position_embedding((4, 4, 4))
    assert torch.equal(ref[0], model.pos_embed.flatten(2)[0].T)
    assert model.position_embedding((5, 3, 7)).shape == (1, 105, 24)
    assert model.features(torch.rand(1, 1, 20, 12, 28)).shape == (1, 24, 5, 3, 7)


def test_sinusoidal_pos_embed_is_independent_of_grid_size():
    small = sinusoidal_pos_embed_3d((3, 3, 3), 24).reshape(3, 3, 3, 24)
    big = sinusoidal_pos_embed_3d((5, 6, 7), 24).reshape(5, 6, 7, 24)
    assert torch.allclose(small, big[:3, :3, :3])
    assert not torch.allclose(big[0, 0, 0], big[0, 0, 1])


def test_align_to_field_of_view():
    feats = torch.rand(3, 4, 5, 6)
    assert torch.equal(align_to_field_of_view(feats, (16, 20, 24), 4), feats)
    out = align_to_field_of_view(feats, (14, 20, 23), 4)
    assert out.shape == feats.shape and torch.equal(out[:, 0, :, :1], feats[:, 0, :, :1])


def test_checkpoint_roundtrip(tmp_path):
    model = tiny_model()
    path = save_vit3d(model, tmp_path / "m.safetensors", {"note": "x"})
    loaded, meta = load_vit3d(path)
    assert loaded.config == model.config and meta["note"] == "x"
    vol = torch.rand(20, 16, 12)
    enc = Dino3DEncoder.from_file(path)
    assert enc.name == "dino3d"
    assert torch.equal(enc.encode(vol), Dino3DEncoder(model).encode(vol))


def test_strict_load_errors(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(DinoregError, match="not found"):
        Dino3DEncoder.from_file(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(DinoregError, match="not a readable"):
        Dino3DEncoder.from_file(junk)
    state = {k: v.contiguous() for k, v in tiny_model().state_dict().items()}
    save_file(state, str(tmp_path / "nometa.safetensors"))
    with pytest.raises(DinoregError, match="no dinoreg_vit3d_config"):
        Dino3DEncoder.from_file(tmp_path / "nometa.safetensors")
    meta = {"dinoreg_vit3d_config": TINY.to_json()}
    partial = dict(state)
    partial.pop("norm.weight")
    save_file(partial, str(tmp_path / "partial.safetensors"), metadata=meta)
    with pytest.raises(DinoregError, match="do not match"):
        Dino3DEncoder.from_file(tmp_path / "partial.safetensors")
    wrong = {"dinoreg_vit3d_config": json.dumps({**json.loads(TINY.to_json()), "embed_dim": 32})}
    save_file(state, str(tmp_path / "wrong.safetensors"), metadata=wrong)
    with pytest.raises(DinoregError, match="do not match"):
        Dino3DEncoder.from_file(tmp_path / "wrong.safetensors")
    bad = {"dinoreg_vit3d_config": json.dumps({"embed_dim": 24, "bogus": 1})}
    save_file(state, str(tmp_path / "bad.safetensors"), metadata=bad)
    with pytest.raises(DinoregError, match="invalid embedded"):
        Dino3DEncoder.from_file(tmp_path / "bad.safetensors")


def test_encode_rejects_non_3d():
    with pytest.raises(DinoregError, match="3D volume"):
        Dino3DEncoder(tiny_model()).encode(torch.rand(8, 8))


def test_config_validation():
    with pytest.raises(DinoregError):
        ViT3DConfig(embed_dim=10, num_heads=3)
    with pytest.raises(DinoregError):
        ViT3DConfig(window=30)


def test_conv_position_encoding_is_translation_equivariant():
    model = tiny_model(pos_embed="conv", depth=0)
    vol = torch.rand(1, 1, 32, 32, 32)
    shifted = torch.roll(vol, shifts=4, dims=2)  # one patch along i
    a, b = model.features(vol)[0], model.features(shifted)[0]
    assert torch.allclose(a[:, 2:6], b[:, 3:7], atol=1e-5)
    full = tiny_model(pos_embed="conv")
    assert Dino3DEncoder(full).encode(torch.rand(20, 24, 12)).shape == (24, 5, 6, 3)
