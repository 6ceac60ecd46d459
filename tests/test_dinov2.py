"""DINOv2 ViT: reference tokens, checkpoint layouts, strict loading errors."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dinoreg.errors import DinoregError
from dinoreg.features.base import Encoder2D
from dinoreg.features.dinov2 import (DINOv2, ViTConfig, arch_config, load_dinov2, load_into,
                                     official_url, to_ours, weight_names)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WDIR = SHARED / "weights" / "dinov2_vits14_imgfocus"
WEIGHTS = WDIR / "dinov2_vits14.safetensors"
REFERENCE = WDIR / "reference_tokens_224.npz"
needs_weights = pytest.mark.skipif(not WEIGHTS.is_file(), reason="shared DINOv2 weights absent")

TINY = ViTConfig(embed_dim=32, depth=2, heads=2, pos_grid=4)


def tokens(model: DINOv2, grey: torch.Tensor) -> torch.Tensor:
    """``(B, 1 + h*w, C)``: cls then row-major patch tokens."""
    with torch.inference_mode():
        patches, cls = model(model.preprocess(grey))
    return torch.cat([cls[:, None], patches.flatten(2).transpose(1, 2)], dim=1)


def to_hf(sd: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Our layout -> Hugging Face ``Dinov2Model`` names (inverse of the loader's conversion)."""
    top = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
           "register_tokens": "embeddings.register_tokens",
           "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
           "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
           "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
    block = {"attn.proj": "attention.output.dense", "ls1.gamma": "layer_scale1.lambda1",
             "ls2.gamma": "layer_scale2.lambda1"}
    out = {}
    for key, value in sd.items():
        m = re.match(r"blocks\.(\d+)\.(.+)$", key)
        if not m:
            out[top[key]] = value
            continue
        layer, rest = m.groups()
        if rest.startswith("attn.qkv."):
            kind = rest.rsplit(".", 1)[1]
            for part, chunk in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                out[f"encoder.layer.{layer}.attention.attention.{part}.{kind}"] = chunk.clone()
            continue
        for ours, hf in block.items():
            rest = rest.replace(ours, hf)
        out[f"encoder.layer.{layer}.{rest}"] = value
    out["embeddings.mask_token"] = torch.zeros(1, sd["cls_token"].shape[-1])
    return {prefix + k: v for k, v in out.items()}


def tiny_state(cfg: ViTConfig = TINY) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = DINOv2(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return {k: v.clone() for k, v in model.state_dict().items()}


@needs_weights
@pytest.mark.skipif(not REFERENCE.is_file(), reason="reference tokens absent")
def test_matches_onnx_reference_tokens():
    model = load_dinov2(weights=WEIGHTS)
    assert isinstance(model, Encoder2D)
    assert (model.name, model.patch_size, model.embed_dim) == ("dinov2_vits14", 14, 384)
    ref = np.load(REFERENCE)
    ours = tokens(model, torch.from_numpy(ref["grey_224x224"])).numpy()
    assert ours.shape == ref["tokens_224x224"].shape == (1, 257, 384)
    assert np.abs(ours - ref["tokens_224x224"]).max() < 1e-4


@needs_weights
def test_hf_layout_round_trip(tmp_path):
    sd = load_file(str(WEIGHTS))
    hf = tmp_path / "model.safetensors"
    save_file(to_hf(sd, prefix="backbone."), str(hf))
    official = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save({**sd, "mask_token": torch.zeros(1, 384)}, official)
    grey = torch.rand(2, 1, 70, 42, generator=torch.Generator().manual_seed(1))
    expected = tokens(load_dinov2("vits14", WEIGHTS), grey)
    assert torch.equal(tokens(load_dinov2(None, hf), grey), expected)
    assert torch.equal(tokens(load_dinov2(None, official), grey), expected)


def test_tiny_hf_with_registers_matches_ours(tmp_path):
    cfg = ViTConfig(embed_dim=32, depth=2, heads=2, registers=4, pos_grid=4)
    sd = tiny_state(cfg)
    converted = to_ours(to_hf(sd, prefix="dinov2."), tmp_path / "x")
    assert set(converted) == set(sd)
    assert all(torch.equal(converted[k], sd[k]) for k in sd)
    model = DINOv2(cfg)
    load_into(model, converted, tmp_path / "x", "tiny")
    grey = torch.rand(1, 1, 28, 56)
    patches, cls = model(model.preprocess(grey))
    assert patches.shape == (1, 32, 2, 4) and cls.shape == (1, 32)


def test_preprocess_pads_bottom_right_with_background():
    model = DINOv2(TINY)
    grey = torch.ones(1, 1, 15, 28)
    x = model.preprocess(grey)
    assert x.shape == (1, 3, 28, 28)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1)
    assert torch.allclose(x[0, :, 20, :], -mean / std)  # padded row = grey 0
    assert torch.allclose(x[0, :, 0, :], (1 - mean) / std)


def test_position_embedding_identity_at_native_grid():
    model = DINOv2(TINY)
    torch.nn.init.normal_(model.pos_embed)
    assert torch.equal(model.position_embedding(4, 4), model.pos_embed)
    assert model.position_embedding(2, 3).shape == (1, 7, 32)


def test_strict_loading_errors(tmp_path):
    sd = tiny_state()
    path = tmp_path / "w.pth"
    model = DINOv2(TINY)
    bad_shape = dict(sd, **{"blocks.1.mlp.fc1.weight": torch.zeros(64, 32)})
    with pytest.raises(DinoregError, match=r"w\.pth.*blocks\.1\.mlp\.fc1\.weight"):
        load_into(model, bad_shape, path, "tiny")
    missing = {k: v for k, v in sd.items() if k != "norm.bias"}
    with pytest.raises(DinoregError, match="missing 1 tensors.*norm.bias"):
        load_into(model, missing, path, "tiny")
    with pytest.raises(DinoregError, match="unexpected 1 tensors.*head.weight"):
        load_into(model, dict(sd, **{"head.weight": torch.zeros(3)}), path, "tiny")
    with pytest.raises(DinoregError, match="NaN"):
        load_into(model, dict(sd, **{"norm.bias": torch.full((32,), float("nan"))}), path, "tiny")


@needs_weights
def test_wrong_architecture_and_corrupt_files(tmp_path):
    with pytest.raises(DinoregError, match=r"dinov2_vits14\.safetensors.*vits14.*not vitb14") as err:
        load_dinov2("vitb14", WEIGHTS)
    assert "\n" not in str(err.value)
    for name in ("broken.safetensors", "broken.pth"):
        bad = tmp_path / name
        bad.write_bytes(b"\x00not a checkpoint" * 64)
        with pytest.raises(DinoregError, match=re.escape(name)):
            load_dinov2("vits14", bad)
    other = tmp_path / "other.safetensors"
    save_file({"conv.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(DinoregError, match="not a DINOv2 checkpoint"):
        load_dinov2(None, other)


def test_names_and_urls():
    assert arch_config("dinov2_vitl14_reg4").registers == 4
    assert arch_config("vitg14").hidden == 4096
    assert weight_names("vits14")[:2] == ["dinov2_vits14_pretrain.pth", "dinov2_vits14.safetensors"]
    assert official_url("vitb14_reg") == \
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth"
    with pytest.raises(DinoregError, match="unknown DINOv2 size"):
        arch_config("vith14")


@needs_weights
def test_resolves_shared_file_through_env_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOREG_WEIGHTS_DIR", str(SHARED / "weights"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("DINOREG_OFFLINE", "1")
    model = load_dinov2()
    assert model.name == "dinov2_vits14" and not model.training
    assert not any(p.requires_grad for p in model.parameters())
