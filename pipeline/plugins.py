"""`module:function` references in configs (model factories, dataset sources, user metrics)."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Callable

from .errors import PipelineError


def load_callable(spec: str, key: str, error: type[PipelineError]) -> Callable[..., Any]:
    """Import `module:function`; errors name the config `key` and raise `error`.

    The console script does not put the working directory on sys.path, yet a project's own
    module usually lives there: it is tried once before giving up."""
    module_name, _, func_name = (spec or "").partition(":")
    if not module_name or not func_name:
        raise error(f"{key} '{spec}': expected 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name.split(".")[0] or os.getcwd() in sys.path:
            raise error(f"{key} '{spec}': cannot import module '{module_name}' ({e}); is it on PYTHONPATH?") from None
        sys.path.append(os.getcwd())
        return load_callable(spec, key, error)
    except ImportError as e:
        raise error(f"{key} '{spec}': cannot import module '{module_name}' ({e})") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise error(f"{key} '{spec}': module '{module_name}' has no callable '{func_name}'")
    return fn
