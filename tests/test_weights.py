"""Weight resolution: explicit path, env folder, caches, download (mocked), clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dinoreg.errors import DinoregError, WeightsNotFoundError
from dinoreg.features import weights as W
from dinoreg.features.weights import resolve_weights

NAMES = ["enc_pretrain.pth", "enc.safetensors"]
URL = "https://example.invalid/enc_pretrain.pth"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Empty cache, empty torch hub dir, no env folder, and a network that always fails."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("DINOREG_WEIGHTS_DIR", raising=False)
    monkeypatch.delenv("DINOREG_OFFLINE", raising=False)

    def no_network(url, dst, progress=True):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_explicit_file_wins_and_missing_explicit_is_an_error(tmp_path, monkeypatch):
    own = touch(tmp_path / "mine.bin")
    touch(tmp_path / "env" / "enc.safetensors")
    monkeypatch.setenv("DINOREG_WEIGHTS_DIR", str(tmp_path / "env"))
    assert resolve_weights("enc", NAMES, explicit=own) == own
    with pytest.raises(WeightsNotFoundError, match="nope.pth: enc weights file does not exist"):
        resolve_weights("enc", NAMES, explicit=tmp_path / "nope.pth", url=URL)


def test_explicit_folder_is_searched(tmp_path):
    found = touch(tmp_path / "folder" / "sub" / "enc.safetensors")
    assert resolve_weights("enc", NAMES, explicit=tmp_path / "folder") == found
    with pytest.raises(WeightsNotFoundError, match="no enc weights"):
        resolve_weights("enc", ["other.pth"], explicit=tmp_path / "folder", url=URL)


def test_env_folder_and_one_level_of_subfolders(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOREG_WEIGHTS_DIR", str(tmp_path / "env"))
    nested = touch(tmp_path / "env" / "dinov2_x" / "enc.safetensors")
    assert resolve_weights("enc", NAMES) == nested
    top = touch(tmp_path / "env" / "enc.safetensors")
    assert resolve_weights("enc", NAMES) == top
    touch(tmp_path / "env2" / "a" / "b" / "enc.safetensors")  # two levels deep: not found
    monkeypatch.setenv("DINOREG_WEIGHTS_DIR", str(tmp_path / "env2"))
    with pytest.raises(WeightsNotFoundError):
        resolve_weights("enc", NAMES, download=False)


def test_user_cache_then_torch_hub(tmp_path):
    hub = touch(Path(torch.hub.get_dir()) / "checkpoints" / "enc_pretrain.pth")
    assert resolve_weights("enc", NAMES) == hub
    cached = touch(tmp_path / "xdg" / "dinoreg" / "enc.safetensors")
    assert resolve_weights("enc", NAMES) == cached


def test_download_into_cache_with_progress(tmp_path):
    calls = []

    def fake_fetch(url, dst, progress=True):
        calls.append((url, progress))
        Path(dst).write_bytes(b"weights")

    got = resolve_weights("enc", NAMES, url=URL, fetch=fake_fetch)
    assert got == tmp_path / "xdg" / "dinoreg" / "enc_pretrain.pth" and got.read_bytes() == b"weights"
    assert calls == [(URL, True)]
    assert resolve_weights("enc", NAMES, url=URL, fetch=fake_fetch) == got  # now cached
    assert len(calls) == 1


def test_offline_or_failed_download_gives_one_line_error(monkeypatch):
    with pytest.raises(WeightsNotFoundError) as err:
        resolve_weights("dinov2 vits14", NAMES, url=URL)  # torch.hub download patched to fail
    msg = str(err.value)
    assert "\n" not in msg and isinstance(err.value, DinoregError)
    for part in ("enc_pretrain.pth or enc.safetensors", "--weights", "$DINOREG_WEIGHTS_DIR", URL):
        assert part in msg
    monkeypatch.setenv("DINOREG_OFFLINE", "1")

    def must_not_run(*a, **k):
        raise AssertionError("download attempted while offline")

    with pytest.raises(WeightsNotFoundError, match="disabled"):
        resolve_weights("enc", NAMES, url=URL, fetch=must_not_run)
    assert not W.downloads_allowed(None) and W.downloads_allowed(True)


def test_no_url_error_names_cache(tmp_path):
    with pytest.raises(WeightsNotFoundError, match=r"put it in .*xdg/dinoreg"):
        resolve_weights("enc", "enc.pth")
