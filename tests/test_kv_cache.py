"""GrowingCache: the same keys and values as transformers' DynamicCache, without a copy per step."""

from __future__ import annotations

import json

import torch
from transformers import DynamicCache

from services.worker.kv_cache import GrowingCache


def _step(batch: int, positions: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, 3, positions, 8)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def _assert_same(growing: GrowingCache, dynamic: DynamicCache) -> None:
    for mine, theirs in zip(growing.layers, dynamic.layers, strict=True):
        assert torch.equal(mine.keys, theirs.keys)
        assert torch.equal(mine.values, theirs.values)
    assert growing.get_seq_length() == dynamic.get_seq_length()


def test_appends_match_dynamic_cache_and_reuse_one_buffer() -> None:
    growing, dynamic = GrowingCache(), DynamicCache()
    for layer in range(2):
        keys, values = _step(4, 10, seed=layer)  # a prefill
        growing.update(keys, values, layer)
        dynamic.update(keys, values, layer)
    first_decode_storage = None
    for step in range(40):
        for layer in range(2):
            keys, values = _step(4, 1, seed=100 + step * 2 + layer)
            returned = growing.update(keys, values, layer)
            expected = dynamic.update(keys, values, layer)
            assert torch.equal(returned[0], expected[0])
            assert torch.equal(returned[1], expected[1])
        storage = growing.layers[0].keys.data_ptr()
        if first_decode_storage is None:
            first_decode_storage = storage
        # 10 + 40 positions fit in the first buffer (10 + 1 + 64 spare): no copy after step 0.
        assert storage == first_decode_storage
    _assert_same(growing, dynamic)


def test_rows_removed_or_columns_dropped_then_appends_stay_exact() -> None:
    growing, dynamic = GrowingCache(), DynamicCache()
    keys, values = _step(3, 5, seed=1)
    growing.update(keys, values, 0)
    dynamic.update(keys, values, 0)
    for step in range(3):
        keys, values = _step(3, 1, seed=10 + step)
        growing.update(keys, values, 0)
        dynamic.update(keys, values, 0)
    keep = torch.tensor([0, 2])
    growing.batch_select_indices(keep)
    dynamic.batch_select_indices(keep)
    for cache in (growing, dynamic):  # as the engine drops leading padding columns
        cache.layers[0].keys = cache.layers[0].keys[..., 2:, :]
        cache.layers[0].values = cache.layers[0].values[..., 2:, :]
    for step in range(100):  # past the new buffer's spare room: it must grow again
        keys, values = _step(2, 1, seed=50 + step)
        growing.update(keys, values, 0)
        dynamic.update(keys, values, 0)
    _assert_same(growing, dynamic)


def test_from_tensors_holds_the_given_tensors_and_appends_after_them() -> None:
    keys, values = _step(2, 7, seed=3)
    growing = GrowingCache.from_tensors([(keys, values)])
    assert torch.equal(growing.layers[0].keys, keys)
    more_keys, more_values = _step(2, 1, seed=4)
    appended = growing.update(more_keys, more_values, 0)
    assert torch.equal(appended[0], torch.cat([keys, more_keys], dim=-2))
    assert torch.equal(appended[1], torch.cat([values, more_values], dim=-2))


def test_bench_worker_compares_the_two_caches_and_restores_the_in_place_one(tmp_path) -> None:
    from services.worker import bench
    from services.worker.kv_cache import GrowingLayer

    in_place = GrowingLayer.update
    out = tmp_path / "worker.json"
    small = ["--jobs", "2", "--batch-sizes", "1,2", "--contexts", "16", "--prefill-lengths", "8,16"]
    bench.main([*small, "--compare-kv-cache", "2x16", "--rounds", "2", "--out", str(out)])
    assert GrowingLayer.update is in_place
    (point,) = json.loads(out.read_text())["kv_cache"]
    assert (point["batch_size"], point["context"]) == (2, 16)
    assert len(point["step_ms_p50_in_place"]) == len(point["step_ms_p50_concatenate"]) == 2
    ratio = point["in_place_over_concatenate"]
    assert 0 < ratio["min"] <= ratio["max"]
