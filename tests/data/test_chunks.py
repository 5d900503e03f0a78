"""pipeline.data.chunks: a chunk of evaluation samples is bounded by its outputs *and* its inputs, so
evaluate and tune on a streamed 224x224 image split decode about a hundred images at a time, not the
thousands that 1000 logits alone would allow (the 20,000-image folder: 8,384 images, 5 GB a chunk)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data import chunks


class _Split:  # what a streamed split looks like to the chunking: a shape and a dtype, nothing decoded
    def __init__(self, n: int, shape: tuple[int, ...], dtype: str = "float32") -> None:
        self.shape, self.dtype = (n, *shape), np.dtype(dtype)


@pytest.mark.parametrize("bs", [1, 32, 64])
def test_a_chunk_of_images_holds_about_chunk_bytes(bs):
    x = {"input": _Split(20000, (3, 224, 224))}
    rows = chunks.chunk_rows({"logits": (20000, 1000)}, x, bs)
    per_sample = 1000 * 8 + 3 * 224 * 224 * 4
    assert rows % bs == 0 and rows >= bs
    assert rows * per_sample <= max(chunks.CHUNK_BYTES, bs * per_sample)
    assert (rows + bs) * per_sample > chunks.CHUNK_BYTES  # not smaller than it need be
    assert chunks.chunk_rows({"logits": (20000, 1000)}, {}, bs) > 50 * rows  # outputs alone: far more


def test_small_samples_are_capped_and_two_inputs_add_up():
    assert chunks.chunk_rows({"logits": (359, 10)}, {"input": np.zeros((359, 1, 8, 8), np.float32)}, 32) == \
        chunks.CHUNK_MAX_ROWS
    one = chunks.chunk_rows({"e": (10, 384)}, {"ids": _Split(10, (4096,), "int64")}, 8)
    two = chunks.chunk_rows({"e": (10, 384)}, {"ids": _Split(10, (4096,), "int64"), "mask": _Split(10, (4096,), "int64")}, 8)
    assert two < one
