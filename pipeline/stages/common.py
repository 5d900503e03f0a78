"""Small pieces several stages share: where a `module:function` lives, and model inputs
as torch tensors in the order forward() takes them."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ..config import TensorSpec


def module_file(spec: str) -> Optional[Path]:
    """The source file of the module in `module:function`, found without importing it
    (None for a module without a file). The working directory counts as on the path, as
    it does when the stage imports the function."""
    module = (spec or "").partition(":")[0]
    if not module:
        return None
    added = os.getcwd() not in sys.path
    if added:
        sys.path.append(os.getcwd())
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    finally:
        if added:
            sys.path.remove(os.getcwd())
    if found is None or not found.origin or found.origin in ("built-in", "frozen"):
        return None
    return Path(found.origin)


def torch_inputs(specs: Sequence[TensorSpec], batch: Mapping[str, np.ndarray]) -> list[Any]:
    """The batch as torch tensors, in model-input order."""
    import torch

    return [torch.from_numpy(np.ascontiguousarray(batch[s.name])) for s in specs]
