"""Checks every writer makes before it starts: an existing output needs ``overwrite``, and the
folder must exist and be writable.  Done up front, so a mistake costs nothing and no writer leaves a
half-made file (each writes to a temporary name and renames at the end)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import OutputExistsError, UserError


def check_output(path: Path, overwrite: bool, zarr_store: bool = False) -> None:
    """Raise a one-line :class:`UserError` if ``path`` cannot or must not be written.

    ``zarr_store``: the output is a Zarr store, i.e. a folder; an existing one is replaced with
    ``overwrite`` only if it *is* a Zarr store (v3 or v2 metadata at its top, not a link), never any
    other folder a mistyped path may name."""
    if path.is_dir():
        if not zarr_store:
            raise UserError(f"cannot write {path}: it is a directory")
        if path.is_symlink():
            raise UserError(f"cannot write {path}: it is a link to a folder; name the store itself")
        if not any((path / marker).is_file() for marker in ("zarr.json", ".zarray", ".zgroup")):  # v3, v2
            raise UserError(f"cannot write {path}: it is a folder that is not a Zarr store")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} exists; pass --overwrite to replace it")
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {path}: folder {path.parent} is not writable")
