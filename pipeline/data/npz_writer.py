"""An `.npz` written a batch of rows at a time, never holding an array whole.

validate writes PyTorch's outputs for every evaluation sample (`reference.npz`); for a large
evaluation set those arrays must not be held in memory. Each array's rows are appended to a
temporary file beside the target as they come; `close()` writes the zip: one uncompressed
`.npy` member per array (header, then the rows copied in pieces), the layout `np.savez`
writes and `np.load` / `npz_rows` read. Members carry a fixed timestamp, so the same rows give
the same bytes (and the same sha256 for DVC) on every run."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Optional, Sequence

import numpy as np

from ..errors import DataError

PIECE = 16 << 20  # bytes copied at a time into the zip
FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # zip's earliest date: no wall clock in the file


class NpzWriter:
    """Rows of the arrays `names` appended with `add(name, rows)` (every call's rows must have
    the first call's dtype and shape per row); `close()` writes `path`; `discard()` (or leaving
    a `with` block by an exception) removes the temporary files and writes nothing."""

    def __init__(self, path: Path, names: Sequence[str]) -> None:
        self.path = Path(path)
        self.names = list(names)
        self._files: dict[str, BinaryIO] = {}
        self._spec: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
        self._rows = dict.fromkeys(self.names, 0)

    def _part(self, name: str) -> Path:
        return self.path.with_name(f".{self.path.name}.{self.names.index(name)}.part")

    def add(self, name: str, rows: Any) -> None:
        if name not in self._rows:
            raise KeyError(name)
        a = np.ascontiguousarray(rows)
        if a.ndim == 0:
            raise DataError(f"{self.path}: '{name}' got a scalar; rows need a first (sample) axis")
        spec = (a.dtype, tuple(a.shape[1:]))
        if name not in self._spec:
            self._spec[name] = spec
            self._files[name] = open(self._part(name), "wb")
        elif self._spec[name] != spec:
            dt, shape = self._spec[name]
            raise DataError(f"{self.path}: '{name}' rows changed from {dt} {list(shape)} to {a.dtype} "
                            f"{list(a.shape[1:])} per sample; every batch must have the same")
        self._files[name].write(a.data)
        self._rows[name] += len(a)

    def close(self) -> None:
        """Write the zip and remove the temporary files."""
        missing = [n for n in self.names if n not in self._spec]
        if missing:
            self.discard()
            raise DataError(f"{self.path}: no rows for '{missing[0]}'")
        try:
            for f in self._files.values():
                f.close()
            with zipfile.ZipFile(self.path, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
                for name in self.names:
                    dtype, shape = self._spec[name]
                    info = zipfile.ZipInfo(f"{name}.npy", date_time=FIXED_TIME)
                    info.compress_type = zipfile.ZIP_STORED
                    with z.open(info, "w", force_zip64=True) as m, open(self._part(name), "rb") as src:
                        _write_header(m, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                                          "shape": (self._rows[name], *shape)})
                        while True:
                            piece = src.read(PIECE)
                            if not piece:
                                break
                            m.write(piece)
        finally:
            self._remove_parts()

    def discard(self) -> None:
        for f in self._files.values():
            f.close()
        self._remove_parts()

    def _remove_parts(self) -> None:
        for name in self._spec:
            self._part(name).unlink(missing_ok=True)

    def __enter__(self) -> "NpzWriter":
        return self

    def __exit__(self, kind: Optional[type], *_: Any) -> None:
        if kind is not None:
            self.discard()


def _write_header(f: Any, header: dict[str, Any]) -> None:
    fmt = np.lib.format
    try:
        fmt.write_array_header_1_0(f, header)
    except ValueError:  # a header over 64 KiB (very many dimensions): format 2.0
        fmt.write_array_header_2_0(f, header)


__all__ = ["NpzWriter"]
