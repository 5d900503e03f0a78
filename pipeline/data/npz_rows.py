"""Rows of the arrays in an `.npz`, read in order a chunk at a time, never the whole array.

`np.load` of an `.npz` reads a member whole on access; validate's `reference.npz` holds
PyTorch's outputs for every evaluation sample (N x the output's size, per output), which is
what evaluate must not hold for a large evaluation set. A member is a `.npy` file inside the
zip: its header says dtype, shape and order, and its data follows in C order, so the rows can
be read from the member's stream a chunk at a time (stored or deflated alike)."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import ArtifactError


def npz_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of every member of an `.npz`, from the headers only."""
    with zipfile.ZipFile(path) as zf:
        return {name[:-4]: _header(zf.open(name), path, name)[:2] for name in zf.namelist() if name.endswith(".npy")}


def _header(f: Any, path: Path, member: str) -> tuple[tuple[int, ...], np.dtype, bool]:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = reader(f)
    except (ValueError, OSError) as e:
        raise ArtifactError(f"{path}: member {member} is not a readable .npy ({e}); re-run the stage that wrote it") from None
    return tuple(shape), dtype, bool(fortran)


def npz_row_chunks(path: Path, names: Sequence[str], rows: int) -> Iterator[dict[str, np.ndarray]]:
    """Chunks of `rows` rows (the last one shorter) of the members `names`, in order. A member
    that cannot be streamed (Fortran order, object dtype, no rows) is read whole once and sliced."""
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ArtifactError(f"{path}: cannot read ({type(e).__name__}); re-run the stage that wrote it") from None
    with zf:
        streams: dict[str, Any] = {}
        whole: dict[str, np.ndarray] = {}
        info: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        for name in names:
            member = f"{name}.npy"
            if member not in zf.namelist():
                raise ArtifactError(f"{path}: has no array '{name}'; re-run the stage that wrote it")
            f = zf.open(member)
            shape, dtype, fortran = _header(f, path, member)
            info[name] = (shape, dtype)
            if fortran or dtype.hasobject or not shape:
                f.close()
                with np.load(path, allow_pickle=False) as z:
                    whole[name] = z[name]
            else:
                streams[name] = f
        total = {name: shape[0] if shape else 0 for name, (shape, _) in info.items()}
        n = max(total.values(), default=0)
        try:
            for lo in range(0, n, rows):
                chunk = {}
                for name in names:
                    hi = min(lo + rows, total[name])
                    if name in whole:
                        chunk[name] = whole[name][lo:hi]
                        continue
                    shape, dtype = info[name]
                    count = max(hi - lo, 0)
                    row_items = int(np.prod(shape[1:], dtype=np.int64))
                    data = streams[name].read(count * row_items * dtype.itemsize)
                    if len(data) != count * row_items * dtype.itemsize:
                        raise ArtifactError(f"{path}: array '{name}' ends early (truncated file); re-run the stage that "
                                            "wrote it")
                    chunk[name] = np.frombuffer(data, dtype=dtype).reshape((count, *shape[1:]))
                yield chunk
        finally:
            for f in streams.values():
                f.close()
