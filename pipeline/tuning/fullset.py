"""The full evaluation set of `trtpipe tune`, never held whole.

The FP32 ONNX runs once over the evaluation set, batch by batch (`write_reference`): every
output's rows are appended to a temporary `.npz` (:class:`pipeline.data.npz_writer.NpzWriter`)
and only the rows of the search subset are kept in memory. A candidate is then measured on the
full set (:class:`StreamedSet`) a chunk of samples at a time: the inputs of the chunk (a
streamed image split decodes just those), the candidate's outputs on them (the runner is called
per chunk; it keeps its session or engine per candidate), the FP32 rows read back from the
`.npz` (:func:`pipeline.data.npz_rows.npz_row_chunks`), the budget's metric and the SQNR summed
over chunks (:class:`.budget.BudgetSum`), and the candidate's rows of the search subset gathered
as they pass. A chunk is a whole number of batches whose outputs and inputs take about
`pipeline.data.chunks.CHUNK_BYTES` (evaluate's chunks too); nothing of the evaluation set's size is held, except by a user metric
(`module:function`, called once on whole arrays) that the budget reads.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np

from .budget import Budget, BudgetSum

Outputs = Mapping[str, np.ndarray]


class RowGather:
    """The rows at positions `index` of outputs seen a chunk at a time (in order), in `index`'s order."""

    def __init__(self, index: Sequence[int]) -> None:
        self.index = np.asarray(index, dtype=np.int64)
        self._order = np.argsort(self.index, kind="stable")
        self._sorted = self.index[self._order]
        self._parts: dict[str, list[np.ndarray]] = {}

    def add(self, lo: int, outputs: Outputs) -> None:
        n = len(next(iter(outputs.values())))
        a, b = np.searchsorted(self._sorted, [lo, lo + n])
        sel = self._sorted[a:b] - lo
        for k, v in outputs.items():
            self._parts.setdefault(k, []).append(np.asarray(v)[sel])

    def result(self) -> dict[str, np.ndarray]:
        back = np.empty_like(self._order)
        back[self._order] = np.arange(len(self._order))
        return {k: np.concatenate(v)[back] for k, v in self._parts.items()}


def write_reference(session: Any, x: Mapping[str, Any], batch_size: int, path: Path,
                    keep: Sequence[int]) -> dict[str, np.ndarray]:
    """Run `session` (the FP32 ONNX) over `x` batch by batch, appending every output's rows to
    `path` (an `.npz`); returns the outputs' rows at positions `keep` (the search subset)."""
    from ..data.npz_writer import NpzWriter
    from ..errors import DataError

    names = [o.name for o in session.get_outputs()]
    n = len(next(iter(x.values())))
    if n == 0:
        raise DataError("the evaluation set is empty: tune has nothing to measure; re-run prepare with "
                        "data.split.evaluation > 0")
    rows = RowGather(keep)
    with NpzWriter(path, names) as writer:
        for lo in range(0, n, batch_size):
            out = dict(zip(names, session.run(None, {k: v[lo:lo + batch_size] for k, v in x.items()})))
            for name in names:
                writer.add(name, out[name])
            rows.add(lo, out)
        writer.close()
    return rows.result()


@dataclass
class StreamedSet:
    """The full evaluation set as the search measures it (the in-memory counterpart is
    :class:`.search.SampleSet`): inputs `x` (arrays or streamed) sliced `rows` samples at a time,
    the FP32 outputs `names` read by rows from `reference` (written by `write_reference`)."""

    x: dict[str, Any]
    y: Optional[np.ndarray]
    reference: Path
    names: list[str]
    rows: int
    index: Optional[np.ndarray] = None  # the full set
    fp32_metric: float = float("nan")
    threshold: float = float("nan")

    def __len__(self) -> int:
        return int(len(next(iter(self.x.values()))))

    def chunks(self) -> Iterator[tuple[int, dict[str, Any], Optional[np.ndarray], dict[str, np.ndarray]]]:
        """(first row, inputs, labels, FP32 outputs) of each chunk, in order."""
        from ..data.npz_rows import npz_row_chunks

        with contextlib.closing(npz_row_chunks(self.reference, self.names, self.rows)) as fp32:
            for lo in range(0, len(self), self.rows):
                xs = {k: v[lo:lo + self.rows] for k, v in self.x.items()}
                ys = None if self.y is None else self.y[lo:lo + self.rows]
                yield lo, xs, ys, next(fp32)

    def fp32_value(self, budget: Budget) -> float:
        """The budget's metric of the FP32 model itself on this set."""
        return self.score(budget, None)[0]

    def score(self, budget: Budget, run: Optional[Callable[[dict[str, Any]], Outputs]], sqnr_output: Optional[str] = None,
              sub: Any = None) -> tuple[float, float, Optional[float]]:
        """(the budget's metric, the output SQNR, the budget's metric on `sub`: a subset whose
        `index` points into this set, measured on the rows gathered as they pass; None without
        one) of the outputs `run` gives chunk by chunk (None: FP32's own)."""
        acc = BudgetSum(budget, self.names, sqnr_output, self.x)
        rows = RowGather(sub.index) if sub is not None else None
        for lo, xs, ys, fp32 in self.chunks():
            out = fp32 if run is None else run(xs)
            acc.add(out, fp32, ys)
            if rows is not None:
                rows.add(lo, out)
        sub_metric = None if rows is None else budget.measure(rows.result(), sub.fp32, sub.y, sub.x)
        return acc.metric(), acc.sqnr(), sub_metric


@contextlib.contextmanager
def scratch_dir(beside: Path) -> Iterator[Path]:
    """A hidden folder beside `beside` (the stage's output folder, on the disk that holds the
    artifacts), removed when the block ends, however it ends; one a killed run left is swept."""
    import shutil
    import tempfile

    from ..fileio import STAGING_TAG, sweep_staging

    beside = Path(beside)
    name = beside.with_name(f"{beside.name}-fp32")
    beside.parent.mkdir(parents=True, exist_ok=True)
    sweep_staging(name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name.name}{STAGING_TAG}{os.getpid()}-", dir=beside.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
