"""Feature cache: keys, hits and misses, float16 storage, LRU eviction, concurrent writers."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dinoreg.cache import FeatureCache, active_cache, cache_key, cached, use_cache


def _volume(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((8, 9, 10), dtype=np.float32)


def test_key_depends_on_image_encoder_settings_and_weights(tmp_path: Path) -> None:
    img = _volume()
    w1, w2 = tmp_path / "a.pth", tmp_path / "b.pth"
    w1.write_bytes(b"weights-1")
    w2.write_bytes(b"weights-2")
    base = cache_key(img, "dinov2", {"stride": 2, "axis": 0}, w1)
    assert base == cache_key(img.copy(), "dinov2", {"axis": 0, "stride": 2}, w1)  # order-free, content-based
    assert base == cache_key(torch.from_numpy(img), "dinov2", {"stride": 2, "axis": 0}, w1)
    variants = [cache_key(_volume(1), "dinov2", {"stride": 2, "axis": 0}, w1),
                cache_key(img.astype(np.float64), "dinov2", {"stride": 2, "axis": 0}, w1),
                cache_key(img.reshape(9, 8, 10), "dinov2", {"stride": 2, "axis": 0}, w1),
                cache_key(img, "dino3d", {"stride": 2, "axis": 0}, w1),
                cache_key(img, "dinov2", {"stride": 4, "axis": 0}, w1),
                cache_key(img, "dinov2", {"stride": 2, "axis": 0}, w2),
                cache_key(img, "dinov2", {"stride": 2, "axis": 0}, None)]
    assert len({base, *variants}) == 1 + len(variants)


def test_hit_miss_and_float16(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "c", max_bytes=10**8)
    t = torch.randn(1, 4, 5, 6, 7)
    key = cache_key(_volume(), "mind", {})
    assert cache.get(key) is None
    cache.put(key, t)
    assert torch.equal(cache.get(key), t)
    half = FeatureCache(tmp_path / "h", max_bytes=10**8, half=True)
    half.put(key, t)
    back = half.get(key)
    assert back.dtype == torch.float32 and torch.allclose(back, t, atol=1e-2, rtol=1e-3)
    assert half.size() < cache.size()
    ints = torch.arange(10)
    half.put("ab" * 32, ints)  # non-float tensors are stored as they are
    assert torch.equal(half.get("ab" * 32), ints)


def test_cached_helper_and_activation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def compute() -> torch.Tensor:
        calls.append(1)
        return torch.ones(3)

    img = _volume()
    monkeypatch.delenv("DINOREG_CACHE_DIR", raising=False)
    assert active_cache() is None
    cached(img, "x", {}, None, compute)
    cached(img, "x", {}, None, compute)
    assert len(calls) == 2  # no cache: always computed
    with use_cache(tmp_path / "c", 10**8):
        assert torch.equal(cached(img, "x", {}, None, compute), torch.ones(3))
        assert torch.equal(cached(img, "x", {}, None, compute), torch.ones(3))
        with use_cache(None):
            cached(img, "x", {}, None, compute)
    assert len(calls) == 4  # one miss inside, one computation with the cache switched off
    monkeypatch.setenv("DINOREG_CACHE_DIR", str(tmp_path / "c"))
    assert active_cache() is not None
    cached(img, "x", {}, None, compute)
    assert len(calls) == 4  # hit through the environment variable


def test_lru_eviction_by_last_use(tmp_path: Path) -> None:
    t = torch.zeros(25_000)  # ~100 kB per entry
    probe = FeatureCache(tmp_path / "probe", 10**9)
    entry = probe.put("00" * 32, t).stat().st_size
    cache = FeatureCache(tmp_path / "c", max_bytes=int(3.5 * entry))
    keys = [f"{n:02x}" * 32 for n in range(1, 6)]
    for n, key in enumerate(keys[:3]):
        cache.put(key, t)
        os.utime(cache.path(key), (1000 + n, 1000 + n))  # deterministic ages: 0 oldest
    assert cache.get(keys[0]) is not None  # a hit makes key 0 the most recent
    cache.put(keys[3], t)  # over the limit: the least recently used (key 1) goes
    assert cache.get(keys[1]) is None
    assert all(cache.get(k) is not None for k in (keys[0], keys[2], keys[3]))
    assert cache.size() <= cache.max_bytes


def _writer(root: str, worker: int, n: int) -> None:
    torch.set_num_threads(1)
    cache = FeatureCache(root, max_bytes=12 * 40_100)
    for i in range(n):
        key = f"{i % 16:02x}" * 32  # both workers write the same keys
        value = torch.full((10_000,), float(i % 16))
        cache.put(key, value)
        got = cache.get(f"{(i * 7) % 16:02x}" * 32)
        assert got is None or torch.equal(got, torch.full((10_000,), float((i * 7) % 16)))


def test_concurrent_writers(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 48)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    cache = FeatureCache(tmp_path, max_bytes=12 * 40_100)
    entries = cache.entries()
    assert entries and cache.size() <= cache.max_bytes + 2 * 40_100  # at most one racing put over
    for _, _, path in entries:
        key = path.stem
        assert torch.equal(cache.get(key), torch.full((10_000,), float(int(key[:2], 16))))
    assert not list(tmp_path.glob("*/.*.tmp"))  # no temporary left behind
