"""SAM / MedSAM ViT-B encoder: architecture, strict checkpoint loading.

No real SAM/MedSAM checkpoint is used here: every checkpoint below is RANDOMLY INITIALISED and
written in the official format (flat dict, ``image_encoder.*`` next to other sub-networks).
"""

import pytest
import torch

from dinoreg.errors import DinoregError, WeightsNotFoundError
from dinoreg.features.base import Encoder2D
from dinoreg.features.sam import SAMConfig, SAMEncoder, load_sam, relative_table

SMALL = SAMConfig(embed_dim=64, depth=2, heads=4, global_blocks=(1,))   # 2 blocks, thin


def _random_checkpoint(tmp_path, cfg=SMALL, name="sam_vit_b_01ec64.pth"):
    torch.manual_seed(0)
    enc = SAMEncoder("sam", 64, cfg)
    state = {f"image_encoder.{k}": torch.randn_like(v) * 0.05 for k, v in enc.vit.state_dict().items()}
    state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = torch.randn(2, 128)
    state["mask_decoder.iou_token.weight"] = torch.randn(1, 256)
    path = tmp_path / name
    torch.save(state, path)
    return path, state


def test_full_vit_b_matches_the_official_layout():
    vit = SAMEncoder("sam").vit
    sd = vit.state_dict()
    assert sum(v.numel() for v in sd.values()) == 89_670_912      # SAM ViT-B image encoder
    assert sd["pos_embed"].shape == (1, 64, 64, 768)
    assert sd["blocks.0.attn.rel_pos_h"].shape == (27, 64)        # windowed (14)
    assert sd["blocks.2.attn.rel_pos_h"].shape == (127, 64)       # global (64)
    assert sd["neck.2.weight"].shape == (256, 256, 3, 3)


def test_random_checkpoint_loads_strictly_and_encodes(tmp_path):
    path, state = _random_checkpoint(tmp_path)
    enc = load_sam("sam", path, input_size=64, cfg=SMALL)
    assert isinstance(enc, Encoder2D) and enc.name == "sam" and enc.embed_dim == 256
    assert torch.equal(enc.vit.pos_embed, state["image_encoder.pos_embed"])
    assert not any(p.requires_grad for p in enc.parameters())
    grey = torch.rand(2, 1, 40, 56, requires_grad=True)
    feats, token = enc(enc.preprocess(grey))
    assert feats.shape == (2, 256, 4, 4) and token is None and torch.isfinite(feats).all()
    feats.square().mean().backward()                    # gradients reach the input
    assert grey.grad is not None and grey.grad.abs().sum() > 0


def test_medsam_uses_unnormalised_input_and_official_name(tmp_path, monkeypatch):
    path, _ = _random_checkpoint(tmp_path, name="medsam_vit_b.pth")
    monkeypatch.setenv("DINOREG_WEIGHTS_DIR", str(tmp_path))
    enc = load_sam("medsam", input_size=32, cfg=SMALL)
    grey = torch.rand(1, 1, 32, 32)
    assert torch.equal(enc.preprocess(grey), grey.expand(-1, 3, -1, -1))
    sam = SAMEncoder("sam", 32, SMALL)
    assert torch.allclose(sam.preprocess(torch.zeros(1, 1, 32, 32))[0, :, 0, 0],
                          torch.tensor([-123.675 / 58.395, -116.28 / 57.12, -103.53 / 57.375]))


def test_bad_checkpoints_are_refused_naming_the_file(tmp_path):
    path, state = _random_checkpoint(tmp_path)
    bad = dict(state, **{"image_encoder.blocks.0.attn.rel_pos_h": torch.zeros(25, 16)})
    torch.save(bad, tmp_path / "shape.pth")
    with pytest.raises(DinoregError, match="shape.pth.*rel_pos_h.*shape"):
        load_sam("sam", tmp_path / "shape.pth", 64, SMALL)
    with pytest.raises(DinoregError, match="sam_vit_b_01ec64.pth.*lacks.*blocks.2"):
        load_sam("sam", path, 64, SAMConfig(embed_dim=64, depth=3, heads=4, global_blocks=(1,)))
    with pytest.raises(DinoregError, match="unexpected.*blocks.1"):
        load_sam("sam", path, 64, SAMConfig(embed_dim=64, depth=1, heads=4, global_blocks=(0,)))
    torch.save({"mask_decoder.x": torch.zeros(1)}, tmp_path / "nodec.pth")
    with pytest.raises(DinoregError, match="nodec.pth.*no 'image_encoder"):
        load_sam("sam", tmp_path / "nodec.pth", 64, SMALL)
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(DinoregError, match="junk.pth"):
        load_sam("sam", tmp_path / "junk.pth", 64, SMALL)
    with pytest.raises(WeightsNotFoundError):
        load_sam("medsam", tmp_path / "absent.pth")
    with pytest.raises(DinoregError):
        SAMEncoder("dino")


def test_relative_table_indexing():
    table = torch.arange(7.0)[:, None]                      # size 4 -> 2*4-1 = 7 rows
    rel = relative_table(table, 4)[..., 0]
    assert rel[0, 0] == 3 and rel[3, 0] == 6 and rel[0, 3] == 0
    assert relative_table(torch.randn(9, 2), 4).shape == (4, 4, 2)   # resized table


def test_window_attention_equals_global_when_one_window_covers_the_grid():
    torch.manual_seed(1)
    win = SAMConfig(img_size=224, embed_dim=32, depth=1, heads=2, window=14, global_blocks=())
    glob = SAMConfig(img_size=224, embed_dim=32, depth=1, heads=2, window=14, global_blocks=(0,))
    a, b = SAMEncoder("sam", 224, win), SAMEncoder("sam", 224, glob)
    state = {k: torch.randn_like(v) * 0.1 for k, v in a.vit.state_dict().items()}
    a.vit.load_state_dict(state)
    b.vit.load_state_dict(state)          # 14x14 tokens: both tables are (27, 16)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(a(x)[0], b(x)[0], atol=1e-5)
        # padded windows: a 13x13 grid is padded to one 14x14 window; still finite, right size
        assert a(torch.randn(1, 3, 208, 208))[0].shape == (1, 256, 13, 13)


def test_window_partition_roundtrip_and_layout():
    from dinoreg.features.sam import _unwindows, _windows

    x = torch.randn(2, 30, 17, 3)
    win, padded = _windows(x, 14)
    assert padded == (42, 28) and win.shape == (2 * 3 * 2, 14, 14, 3)
    assert torch.equal(win[1], x[0, 0:14, 14:17].new_zeros(14, 14, 3).index_put_(
        (torch.arange(14)[:, None], torch.arange(3)[None, :]), x[0, 0:14, 14:17]))
    assert torch.equal(win[2], x[0, 14:28, 0:14])
    assert torch.equal(_unwindows(win, 14, padded, (30, 17)), x)
