"""Argument types shared by every `trtpipe` subcommand."""

from __future__ import annotations

import argparse
from pathlib import Path


def path_arg(value: str) -> Path:
    """A path option that must not be empty: Path('') would silently mean the current folder."""
    if not value.strip():
        raise argparse.ArgumentTypeError("is empty; give a path")
    return Path(value)
