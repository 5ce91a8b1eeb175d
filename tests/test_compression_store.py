"""TensorStore: keyed 2-D tensors in low precision, spilling to a memmap past a memory budget."""

from __future__ import annotations

import io
import random

import pytest
import torch

from fedtune.compression.store import TensorStore

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_put_get_round_trip(dtype, tmp_path):
    store = TensorStore(dtype, None, tmp_path)
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    store.put((0, 3), x)
    got = store.get((0, 3))
    assert got.dtype == dtype and got.shape == (5, 7)
    assert torch.equal(got, x.to(dtype))
    got.zero_()  # a copy
    assert torch.equal(store.get((0, 3)), x.to(dtype))
    assert (0, 3) in store and (0, 4) not in store and len(store) == 1
    assert store.memory_bytes == x.numel() * got.element_size() and store.disk_bytes == 0
    with pytest.raises(ValueError):
        store.put((0, 4), torch.zeros(2, 6))  # the width is fixed by the first put


@pytest.mark.parametrize("dtype", DTYPES)
def test_spilled_store_matches_unlimited(dtype, tmp_path):
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    d = 16
    itemsize = torch.empty((), dtype=dtype).element_size()
    budget = 40 * d * itemsize
    full = TensorStore(dtype, None, tmp_path / "full")
    small = TensorStore(dtype, budget, tmp_path / "small")
    for _ in range(300):
        key = (rng.randrange(3), rng.randrange(12))
        x = torch.randn(rng.randrange(0, 20), d, generator=gen) * 100
        full.put(key, x)
        small.put(key, x)
        assert small.memory_bytes <= budget
    assert small.spilled > 0 and small.disk_bytes > 0 and full.spilled == 0
    assert small.keys() == full.keys()
    for key in full.keys():
        assert torch.equal(bits(small.get(key)), bits(full.get(key)))

    restored = TensorStore(dtype, budget // 2, tmp_path / "restored")
    restored.load_state_dict(roundtrip(small.state_dict()))
    assert restored.memory_bytes <= budget // 2 and restored.keys() == full.keys()
    for key in full.keys():
        assert torch.equal(bits(restored.get(key)), bits(full.get(key)))
    for s in (full, small, restored):
        s.close()


def test_state_dict_layout_and_empty(tmp_path):
    store = TensorStore(torch.bfloat16, None, tmp_path)
    empty = roundtrip(store.state_dict())
    assert empty["keys"].shape[0] == 0 and empty["data"].shape[0] == 0
    store.load_state_dict(empty)
    assert len(store) == 0
    store.put((1, 2), torch.ones(3, 4))
    store.put((0, 5), torch.full((2, 4), 2.0))
    state = roundtrip(store.state_dict())
    assert state["keys"].tolist() == [[1, 2], [0, 5]]
    assert state["lengths"].tolist() == [3, 2]
    assert state["data"].shape == (5, 4) and state["data"].dtype == torch.bfloat16


def test_spill_reuses_space_and_close_removes_file(tmp_path):
    d = 8
    store = TensorStore(torch.float32, 0, tmp_path)  # every non-empty entry spills
    store.put((0,), torch.zeros(0, d))  # empty entries cost nothing and stay in memory
    assert store.spilled == 0 and store.get((0,)).shape == (0, d)
    for i in range(50):
        store.put((1,), torch.full((10, d), float(i)))  # overwrites reuse the freed extent
    assert store.spilled == 1 and store.memory_bytes == 0
    assert torch.equal(store.get((1,)), torch.full((10, d), 49.0))
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].stat().st_size == store.disk_bytes
    assert store.disk_bytes <= max(10 * d * 4 * 2, 1 << 20)
    store.close()
    assert list(tmp_path.iterdir()) == [] and len(store) == 0 and store.disk_bytes == 0


def test_overwrite_moves_between_memory_and_disk(tmp_path):
    d = 4
    store = TensorStore(torch.float16, 10 * d * 2, tmp_path)
    store.put((0, 0), torch.ones(6, d))
    store.put((0, 1), torch.ones(6, d) * 2)  # does not fit: disk
    assert store.spilled == 1 and store.memory_bytes == 6 * d * 2
    store.put((0, 0), torch.ones(12, d) * 3)  # grown past the budget: moves to disk
    assert store.spilled == 2 and store.memory_bytes == 0
    store.put((0, 1), torch.ones(3, d) * 4)  # now fits in memory again
    assert store.spilled == 1 and store.memory_bytes == 3 * d * 2
    assert torch.equal(store.get((0, 0)), torch.full((12, d), 3.0, dtype=torch.float16))
    assert torch.equal(store.get((0, 1)), torch.full((3, d), 4.0, dtype=torch.float16))
    store.close()
