"""matplotlib for the reports' plots, or a warning: the plots are optional. The GPU-side install
(`pip install trtpipe[tensorrt]`) has no matplotlib; compare, tune and diagnose then write every
report and skip the picture, saying so in one line."""

from __future__ import annotations

from typing import Any, Optional


def pyplot(what: str) -> Optional[Any]:
    """matplotlib.pyplot on the Agg backend, or None (with a warning naming `what`) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        from .log import get_logger

        get_logger().warning(f"{what} not drawn: matplotlib is not installed (pip install matplotlib, or "
                             "trtpipe[pipeline]); every number is in the JSON report")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
