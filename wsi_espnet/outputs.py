"""Checks every writer makes before it starts: an existing output needs ``overwrite``, and the
folder must exist and be writable.  Done up front, so a mistake costs nothing and no writer leaves a
half-made file (each writes to a temporary name and renames at the end)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import OutputExistsError, UserError


def check_output(path: Path, overwrite: bool) -> None:
    """Raise a one-line :class:`UserError` if ``path`` cannot or must not be written."""
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a directory")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} exists; pass --overwrite to replace it")
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {path}: folder {path.parent} is not writable")
