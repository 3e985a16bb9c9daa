"""The per-slide report of a batch, in CSV (for people and spreadsheets) and JSON (for programs).

Both files are rewritten atomically after every slide, so a driver that dies mid-archive leaves an
exact account of what was finished; slides not finished yet read ``pending``.  A re-run reads the
previous JSON report, so slides it skips keep the numbers (tiles, areas) of the run that made them,
and slides it was not given (one failed slide re-run on its own) stay listed, after its own, as the
earlier run left them (``from_earlier_run`` in the JSON).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from wsi_espnet.errors import UserError

STATUSES = ("done", "skipped", "failed", "pending")
COLUMNS = ("slide", "status", "error", "warning", "tiles", "seconds", "tissue_mm2", "mpp", "resumed_from_row", "worker",
           "mask", "geojson", "overlay", "probs")
AREA_PREFIX = "mm2 "  # CSV column per class: "mm2 <class name>"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


#: How each file of a report begins: an existing file that does not is never overwritten.
_SIGNATURES = {".csv": b"slide,status,", ".json": b'{\n "inputs": ['}


def check_report_target(path: Path) -> None:
    """Raise a one-line :class:`UserError` unless ``path`` can take a report: a new file in a
    writable folder, or a report an earlier run wrote there (a re-run rewrites it).  Why: the
    report is rewritten without ``--overwrite``, so a mistyped ``--report`` must not replace a slide
    or anything else that happens to be there."""
    if path.is_dir():
        raise UserError(f"--report {path}: is a folder; name a file")
    if not path.parent.is_dir():
        raise UserError(f"--report {path}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise UserError(f"--report {path}: folder {path.parent} is not writable")
    if path.exists():
        signature = _SIGNATURES[path.suffix.lower()]
        try:
            with open(path, "rb") as fh:
                head = fh.read(len(signature))
        except OSError as exc:
            raise UserError(f"--report {path}: cannot read it ({exc.strerror})") from None
        if head != signature:
            raise UserError(f"--report {path} exists and is not a wsi-batch report; remove it or name another file")


def one_line(text: str, limit: int = 300) -> str:
    """Errors go into a CSV cell: one line, bounded."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


class BatchReport:
    """Rows keyed by slide path, in archive order; :meth:`set` replaces a row and rewrites both files."""

    def __init__(self, csv_path: Path, slides: Iterable[str], meta: dict[str, Any] | None = None) -> None:
        self.csv_path = Path(csv_path)
        self.json_path = self.csv_path.with_suffix(".json")  # beside it, as check_report_target checked
        self.meta = dict(meta or {})
        self.rows: dict[str, dict[str, Any]] = {s: {"slide": s, "status": "pending"} for s in slides}
        self.classes: list[str] = []
        #: Rows an earlier report at this place had for slides outside this run, carried over as
        #: they were (marked ``from_earlier_run``): re-running one slide must not lose the others.
        self.earlier: dict[str, dict[str, Any]] = {}

    def keep_earlier(self, previous: dict[str, dict[str, Any]]) -> None:
        for slide, row in previous.items():
            if slide not in self.rows:
                self.earlier[slide] = {**row, "from_earlier_run": True}
                self._note_classes(row)

    def previous_rows(self) -> dict[str, dict[str, Any]]:
        """Rows of the report an earlier run left at the same place (empty if none or unreadable)."""
        try:
            data = json.loads(self.json_path.read_text(encoding="utf-8"))
            return {row["slide"]: row for row in data.get("slides", []) if isinstance(row, dict) and "slide" in row}
        except (OSError, ValueError, AttributeError, TypeError):
            return {}

    def set(self, row: dict[str, Any], write: bool = True) -> None:
        self.rows[row["slide"]] = row
        self._note_classes(row)
        if write:
            self.write()

    def _note_classes(self, row: dict[str, Any]) -> None:
        for name in row.get("class_mm2") or {}:
            if name not in self.classes:
                self.classes.append(name)

    def counts(self) -> Counter:
        return Counter(row["status"] for row in self.rows.values())

    def write(self) -> None:
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.csv_path, self._csv())
        counts = self.counts()  # this run's slides; the earlier ones are listed after them
        data = {**self.meta, "summary": {s: counts.get(s, 0) for s in STATUSES} | {"total": len(self.rows)},
                "earlier_slides": len(self.earlier), "slides": [*self.rows.values(), *self.earlier.values()]}
        _atomic_write(self.json_path, json.dumps(data, indent=1, default=str) + "\n")

    def _csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow([*COLUMNS, *(AREA_PREFIX + c for c in self.classes)])
        for row in [*self.rows.values(), *self.earlier.values()]:
            outputs = row.get("outputs") or {}
            areas = row.get("class_mm2") or {}
            cells = []
            for col in COLUMNS:
                value = outputs.get(col) if col in ("mask", "geojson", "overlay", "probs") else row.get(col)
                cells.append(_cell(value))
            cells += [_cell(areas.get(c)) for c in self.classes]
            writer.writerow(cells)
        return buf.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
