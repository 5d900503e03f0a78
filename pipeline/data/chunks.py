"""How many evaluation samples one chunk holds, for the stages that score a whole set a chunk at a
time (evaluate, tune): about CHUNK_BYTES of outputs (counted as float64, as the sums read them)
*and* inputs (a streamed image split decodes a chunk's images, and the next chunk's ahead), a whole
number of batches, never fewer than one batch."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ..metrics import AGREEMENT_ROWS

CHUNK_BYTES = 64 << 20
CHUNK_MAX_ROWS = 8 * AGREEMENT_ROWS


def chunk_rows(output_shapes: Mapping[str, tuple[int, ...]], x: Mapping[str, Any], batch_size: int) -> int:
    """Samples per chunk for outputs of `output_shapes` (N first) and inputs `x` (arrays or streams)."""
    per_sample = sum(int(np.prod(s[1:], dtype=np.int64)) * 8 for s in output_shapes.values())
    per_sample += sum(int(np.prod(np.shape(v)[1:], dtype=np.int64)) * np.dtype(v.dtype).itemsize for v in x.values())
    rows = max(batch_size, min(CHUNK_MAX_ROWS, CHUNK_BYTES // max(per_sample, 1)))
    return max(batch_size, rows // batch_size * batch_size)
