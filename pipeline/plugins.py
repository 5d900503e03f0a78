"""`module:function` references in configs (model factories, dataset sources, user metrics)."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Callable

from .errors import PipelineError


def _import(name: str) -> Any:
    """Import `name`; a module that is not on sys.path is looked for in the working directory
    too, without leaving that folder on sys.path."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        cwd = os.getcwd()
        if e.name != name.split(".")[0] or cwd in sys.path:
            raise
        sys.path.insert(0, cwd)
        try:
            return importlib.import_module(name)
        finally:
            sys.path.remove(cwd)


def load_callable(spec: str, key: str, error: type[PipelineError]) -> Callable[..., Any]:
    """Import `module:function`; errors name the config `key` and raise `error`.

    The console script does not put the working directory on sys.path, yet a project's own
    module usually lives there: it is tried once before giving up."""
    module_name, _, func_name = (spec or "").partition(":")
    if not module_name or not func_name:
        raise error(f"{key} '{spec}': expected 'module:function'")
    try:
        module = _import(module_name)
    except ModuleNotFoundError as e:
        raise error(f"{key} '{spec}': cannot import module '{module_name}' ({e}); is it on PYTHONPATH?") from None
    except ImportError as e:
        raise error(f"{key} '{spec}': cannot import module '{module_name}' ({e})") from None
    except Exception as e:  # the module itself raised while importing
        raise error(f"{key} '{spec}': importing module '{module_name}' raised {type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200] if str(e) else ''}") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise error(f"{key} '{spec}': module '{module_name}' has no callable '{func_name}'")
    return fn
