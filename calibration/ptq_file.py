"""The weight-side PTQ that calibrate measured, kept for the stages that write Q/DQ models after
it (tune's candidates and its result): GPTQ's rounded weights ``{(initializer, axis): q}`` and
bias correction per node ``{node: correction per output channel}``, in one ``.npz``
(``ptq.npz``; the corrections, not the input means they come from: those are per-position maps,
~100 MB on EfficientNet-Lite1, the corrections a few KB).

Tensor names hold ``/`` and ``:``, so the arrays are stored as ``q0, q1, ...`` and ``c0, c1,
...`` with a JSON index of their names; the file is written where its caller stages its
outputs (atomically with them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional, Union

import numpy as np

from calibration.errors import CalibrationError

PTQ_FILE = "ptq.npz"
_SCHEMA = 2


def save_ptq(path: Union[str, Path], rounded: Optional[Mapping[tuple[str, Optional[int]], np.ndarray]],
             corrections: Optional[Mapping[str, np.ndarray]]) -> None:
    """Write ``rounded`` (None: GPTQ off) and ``corrections`` (None: bias correction off) to ``path``."""
    rounded_keys = list(rounded or {})
    node_keys = list(corrections or {})
    index = {"schema": _SCHEMA, "rounded": None if rounded is None else [[w, a] for w, a in rounded_keys],
             "corrections": None if corrections is None else node_keys}
    arrays = {f"q{i}": np.asarray(rounded[k], dtype=np.int8) for i, k in enumerate(rounded_keys)}  # type: ignore[index]
    arrays.update({f"c{i}": np.asarray(corrections[k], dtype=np.float64)  # type: ignore[index]
                   for i, k in enumerate(node_keys)})
    with open(path, "wb") as f:
        np.savez(f, index=np.array(json.dumps(index)), **arrays)


def load_ptq(path: Union[str, Path]) -> tuple[Optional[dict[tuple[str, Optional[int]], np.ndarray]],
                                              Optional[dict[str, np.ndarray]]]:
    """``(rounded, corrections)`` as :func:`save_ptq` wrote them; a file that is not one raises
    CalibrationError naming it."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            index = json.loads(str(z["index"]))
            if index.get("schema") != _SCHEMA:
                raise ValueError(f"schema {index.get('schema')!r}, expected {_SCHEMA}")
            rounded = None if index["rounded"] is None else {
                (str(w), None if a is None else int(a)): z[f"q{i}"] for i, (w, a) in enumerate(index["rounded"])}
            corrections = None if index["corrections"] is None else {
                str(n): z[f"c{i}"] for i, n in enumerate(index["corrections"])}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CalibrationError(f"{path}: not the calibrate stage's weight PTQ file ({e}); re-run calibrate") from None
    if rounded is not None and any(v.dtype != np.int8 for v in rounded.values()):
        raise CalibrationError(f"{path}: rounded weights are not int8; re-run calibrate")
    return rounded, corrections


__all__ = ["PTQ_FILE", "save_ptq", "load_ptq"]
