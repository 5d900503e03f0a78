"""pipeline.data.npz_writer.NpzWriter: an .npz written batch by batch reads back as np.savez's
(np.load and npz_rows), member for member the same bytes, the same file on every run; a batch
whose rows change shape or dtype is refused in one line; an error leaves nothing behind."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.npz_rows import npz_row_chunks, npz_shapes
from pipeline.data.npz_writer import NpzWriter
from pipeline.errors import DataError


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"boxes": rng.normal(size=(103, 4)).astype(np.float32),
            "mask": rng.normal(size=(103, 2, 5, 7)).astype(np.float16),
            "ids": rng.integers(0, 1 << 40, size=103, dtype=np.int64)}


def _write(path: Path, arrays: dict[str, np.ndarray], step: int) -> None:
    with NpzWriter(path, list(arrays)) as w:
        for i in range(0, 103, step):
            for k, v in arrays.items():
                w.add(k, v[i:i + step])
        w.close()


@pytest.mark.parametrize("step", [1, 10, 103, 500])
def test_batches_read_back_as_np_savez_wrote_them(tmp_path: Path, step: int) -> None:
    arrays = _arrays()
    _write(tmp_path / "w.npz", arrays, step)
    np.savez(tmp_path / "ref.npz", **arrays)
    with np.load(tmp_path / "w.npz") as z:
        assert z.files == list(arrays)
        for k, v in arrays.items():
            assert z[k].dtype == v.dtype and np.array_equal(z[k], v)
    with zipfile.ZipFile(tmp_path / "w.npz") as a, zipfile.ZipFile(tmp_path / "ref.npz") as b:
        for k in arrays:
            assert a.read(f"{k}.npy") == b.read(f"{k}.npy")
    assert {k: s for k, (s, _) in npz_shapes(tmp_path / "w.npz").items()} == {k: v.shape for k, v in arrays.items()}
    got = list(npz_row_chunks(tmp_path / "w.npz", ["boxes", "mask"], 17))
    assert np.array_equal(np.concatenate([c["mask"] for c in got]), arrays["mask"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.npz", "w.npz"]  # no temporary file left


def test_the_same_rows_give_the_same_bytes(tmp_path: Path) -> None:
    arrays = _arrays()
    _write(tmp_path / "a.npz", arrays, 10)
    _write(tmp_path / "b.npz", arrays, 33)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()


@pytest.mark.parametrize("second, words", [
    (np.zeros((3, 5), np.float32), "float32 [4] to float32 [5]"),
    (np.zeros((3, 4), np.float64), "float32 [4] to float64 [4]"),
])
def test_rows_that_change_are_refused_and_nothing_is_left(tmp_path: Path, second: np.ndarray, words: str) -> None:
    with pytest.raises(DataError) as e:
        with NpzWriter(tmp_path / "r.npz", ["boxes"]) as w:
            w.add("boxes", np.zeros((2, 4), np.float32))
            w.add("boxes", second)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_an_array_without_rows_is_refused(tmp_path: Path) -> None:
    w = NpzWriter(tmp_path / "r.npz", ["a", "b"])
    w.add("a", np.zeros((2, 1)))
    with pytest.raises(DataError, match="no rows for 'b'"):
        w.close()
    assert list(tmp_path.iterdir()) == []
