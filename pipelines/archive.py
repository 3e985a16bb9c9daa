"""Which slides a batch processes, and where each one's outputs go.

An archive is named by folders (searched recursively), globs, single slide files and CSV manifests, in
any mix.  A slide is identified by its resolved path, so one reached through two inputs runs once.

Outputs mirror the input tree, ``OUT/<path relative to the input's root>/<stem>.mask.tif`` and
friends, so the archive's own structure (case / block / slide) survives and two slides of the same
name in different folders never collide.  The root of a folder input is that folder; of a glob or a
manifest, the deepest folder common to all its slides (a manifest row may instead name its output
with an ``out`` column).

Whether a slide still needs work is read from its outputs alone, never from a database: a mask that
exists, opens as a TIFF and has no ``.work`` folder beside it is done (``segment_slide`` writes the
mask last and atomically); a ``.work`` folder is a partial run that ``segment_slide`` resumes.
"""

from __future__ import annotations

import csv
import glob
import os
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Iterable, Iterator, Literal, Mapping, Sequence

from wsi_espnet.errors import UserError

#: Files a folder search picks up.  DICOM slides are folders of .dcm files: one per folder is kept.
DEFAULT_PATTERNS = ("*.svs", "*.ndpi", "*.mrxs", "*.scn", "*.vms", "*.vmu", "*.svslide", "*.bif",
                    "*.tif", "*.tiff", "*.dcm")
#: Output name suffixes, appended to a slide's output stem.
OUTPUT_SUFFIXES = {"mask": ".mask.tif", "geojson": ".geojson", "overlay": ".overlay.png", "probs": ".probs.zarr"}
#: Per-slide options a manifest may set, with their types.
MANIFEST_OPTIONS: dict[str, type] = {"mpp": float, "tile": int, "overlap": int, "batch": int,
                                     "tissue_threshold": float}

# Our own outputs and work files, never slides, even when OUT lies inside the input tree.
_OUTPUT_NAME_ENDS = (".mask.tif", ".mask.tiff", ".partial", ".overlay.png", ".geojson", ".tmp")
_WORK_DIR_ENDS = (".work", ".zarr", ".partial")

State = Literal["done", "partial", "todo"]


@dataclass
class SlideJob:
    """One slide and where its outputs go (``stem`` + a suffix of :data:`OUTPUT_SUFFIXES`)."""

    slide: Path
    stem: Path
    options: dict = field(default_factory=dict)  # per-slide overrides of the batch options
    source: str = ""  # the input that named it, for messages

    @property
    def mask(self) -> Path:
        return self.output("mask")

    def output(self, kind: str) -> Path:
        return self.stem.with_name(self.stem.name + OUTPUT_SUFFIXES[kind])

    def outputs(self, extras: Iterable[str] = ()) -> dict[str, Path]:
        """The mask and the requested extra outputs (``geojson``, ``overlay``, ``probs``)."""
        return {"mask": self.mask, **{kind: self.output(kind) for kind in extras}}


@dataclass
class Archive:
    jobs: list[SlideJob]
    duplicates: list[tuple[Path, str]] = field(default_factory=list)  # (slide, input) listed again
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Finding slides


def slide_stem(name: str) -> str:
    """``a.svs`` -> ``a``; ``a.ome.tif`` -> ``a`` (the OME part is format, not name)."""
    lower = name.lower()
    for double in (".ome.tif", ".ome.tiff"):
        if lower.endswith(double):
            return name[: -len(double)]
    return Path(name).stem


def _is_output(name: str) -> bool:
    return name.lower().endswith(_OUTPUT_NAME_ENDS)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    lower = name.lower()
    return any(fnmatch(lower, p.lower()) for p in patterns)


def _walk(root: Path, patterns: Sequence[str], skip: Path | None) -> Iterator[Path]:
    """Slide files under ``root`` in a stable order, leaving out hidden and work folders and ``skip``
    (the output folder when it lies inside the input tree)."""
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames
            if not d.startswith(".") and not d.lower().endswith(_WORK_DIR_ENDS)
            and (skip is None or (here / d).resolve() != skip)
        )
        for name in sorted(filenames):
            if not name.startswith(".") and not _is_output(name) and _matches(name, patterns):
                yield here / name


def _common_root(paths: Sequence[Path]) -> Path:
    return Path(os.path.commonpath([str(p.parent) for p in paths])) if paths else Path(".")


def _stem_for(slide: Path, root: Path, out_dir: Path) -> Path:
    """OUT/<slide's folder relative to root>/<stem>; a DICOM slide (its folder, or a file in it) is
    named for its folder."""
    if slide.is_dir() or slide.suffix.lower() == ".dcm":
        folder = slide if slide.is_dir() else slide.parent
        if folder == root:
            return out_dir / folder.name
        return out_dir / folder.relative_to(root)
    return out_dir / slide.parent.relative_to(root) / slide_stem(slide.name)


def _one_dicom_per_folder(paths: list[Path]) -> list[Path]:
    """A folder of .dcm files stands for one slide, as the folder: OpenSlide reads a DICOM slide's
    sibling files itself (listing each .dcm would run it N times), and which file to open it through
    is ``open_slide``'s choice (the first alphabetically may be a non-image object)."""
    seen: set[Path] = set()
    kept = []
    for p in paths:
        if p.suffix.lower() == ".dcm":
            if p.parent in seen:
                continue
            seen.add(p.parent)
            p = p.parent
        kept.append(p)
    return kept


def _parse_option(name: str, text: str, where: str):
    kind = MANIFEST_OPTIONS[name]
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{where}: {name} {text!r} is not a number") from None
    if kind is int:
        if not value.is_integer():
            raise UserError(f"{where}: {name} {text!r} must be a whole number")
        return int(value)
    return value


def read_manifest(path: Path) -> tuple[list[tuple[Path, dict, str | None]], list[str]]:
    """Rows of a CSV manifest as (slide path, per-slide options, out name); and warnings.

    Relative slide paths are relative to the manifest's folder, so a manifest travels with its
    archive.  Unknown columns are allowed (labs keep case ids there) but named in a warning, so a
    misspelt option is not silently ignored.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise UserError(f"manifest {path}: empty file")
            columns = [c.strip().lower() for c in header]
            if "slide" not in columns:
                raise UserError(f"manifest {path}: no 'slide' column (columns: {', '.join(columns) or 'none'})")
            unknown = [c for c in columns if c and c not in MANIFEST_OPTIONS and c not in ("slide", "out")]
            rows = []
            for line, values in enumerate(reader, start=2):
                if not any(v.strip() for v in values):
                    continue
                cells = {c: v.strip() for c, v in zip(columns, values)}
                where = f"manifest {path} line {line}"
                slide = cells.get("slide", "")
                if not slide:
                    raise UserError(f"{where}: empty 'slide'")
                slide_path = Path(slide).expanduser()
                if not slide_path.is_absolute():
                    slide_path = path.parent / slide_path
                options = {c: _parse_option(c, v, where) for c, v in cells.items() if c in MANIFEST_OPTIONS and v}
                rows.append((slide_path, options, cells.get("out") or None))
    except OSError as exc:
        raise UserError(f"manifest {path}: cannot read it ({exc.strerror})") from None
    except (csv.Error, UnicodeDecodeError) as exc:
        raise UserError(f"manifest {path}: not a readable CSV ({exc})") from None
    warnings = [f"manifest {path}: ignoring unknown column(s) {', '.join(unknown)}"] if unknown else []
    return rows, warnings


def _out_name(out: str, out_dir: Path, where: str) -> Path:
    rel = Path(out)
    if rel.is_absolute() or ".." in rel.parts:
        raise UserError(f"{where}: out {out!r} must be a relative name inside --out")
    name = rel.name
    for suffix in (".mask.tiff", ".mask.tif", ".tiff", ".tif"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return out_dir / rel.parent / name


def _expand(text: str, out_dir: Path, patterns: Sequence[str], warnings: list[str]) -> list[SlideJob]:
    """The slides one INPUT names, with their output stems."""
    path = Path(text).expanduser()
    if path.is_dir():
        root = path.resolve()
        skip = out_dir if out_dir != root else None
        slides = _one_dicom_per_folder(list(_walk(root, patterns, skip)))
        return [SlideJob(p, _stem_for(p, root, out_dir), source=text) for p in slides]
    if path.is_file() and path.suffix.lower() == ".csv":
        rows, notes = read_manifest(path.resolve())
        warnings.extend(notes)
        root = _common_root([p.resolve() for p, _, out in rows if not out])
        jobs = []
        for slide, options, out in rows:
            slide = slide.resolve()
            stem = _out_name(out, out_dir, f"manifest {path}") if out else _stem_for(slide, root, out_dir)
            jobs.append(SlideJob(slide, stem, options, source=text))
        return jobs
    if path.is_file():
        slide = path.resolve()
        return [SlideJob(slide, _stem_for(slide, slide.parent, out_dir), source=text)]
    if any(ch in text for ch in "*?["):
        matches = [Path(m).resolve() for m in sorted(glob.glob(os.path.expanduser(text), recursive=True))]
        slides = _one_dicom_per_folder([m for m in matches if m.is_file() and not _is_output(m.name)])
        if not slides:
            warnings.append(f"{text}: the pattern matches no files")
        root = _common_root(slides)
        return [SlideJob(p, _stem_for(p, root, out_dir), source=text) for p in slides]
    raise UserError(f"{text}: no such file or folder")


def find_slides(inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                patterns: Sequence[str] = DEFAULT_PATTERNS) -> Archive:
    """Every slide the inputs name, once, with its output stem under ``out_dir``.

    Raises :class:`UserError` for an input that does not exist, a bad manifest, no slides at all, or
    two different slides that would write the same output.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    archive = Archive(jobs=[])
    seen: dict[str, SlideJob] = {}
    for text in inputs:
        for job in _expand(str(text), out_dir, patterns, archive.warnings):
            key = os.path.normcase(os.path.realpath(job.slide))
            if key in seen:
                archive.duplicates.append((job.slide, job.source))
                continue
            seen[key] = job
            archive.jobs.append(job)
    if not archive.jobs:
        raise UserError(f"no slides found in {', '.join(map(str, inputs))} (looked for {', '.join(patterns)})")
    by_mask: dict[Path, SlideJob] = {}
    for job in archive.jobs:
        other = by_mask.setdefault(job.mask, job)
        if other is not job:
            raise UserError(f"{other.slide} and {job.slide} would both write {job.mask}: rename one, or name "
                            "the outputs with an 'out' column in a CSV manifest")
    return archive


# ---------------------------------------------------------------------------------------------
# What is left to do


def mask_is_complete(path: Path) -> bool:
    """A cheap check that ``path`` is a whole TIFF: it parses, and its first image's data lies inside
    the file (a copy cut short, or a disk that filled up, fails this without decoding anything)."""
    import tifffile

    try:
        size = path.stat().st_size
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            if not tif.series or 0 in page.shape:
                return False
            ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts) if n]
            return bool(ends) and max(ends) <= size
    except Exception:  # tifffile raises many types for a broken file: all mean "not complete"
        return False


def work_folder(mask: Path) -> Path:
    """Where ``segment_slide`` keeps a slide's resumable state until its mask is written."""
    return mask.with_name(mask.name + ".work")


def output_state(job: SlideJob, extras: Iterable[str] = ()) -> State:
    """``done`` (skip), ``partial`` (a run to resume) or ``todo``."""
    return outputs_state(job.outputs(extras))


def outputs_state(outputs: Mapping[str, str | os.PathLike]) -> State:
    """The same for a slide's outputs by kind (``mask`` and the extras), as a task is given them."""
    mask = Path(outputs["mask"])
    if work_folder(mask).exists():
        return "partial"
    if not mask.is_file() or not mask_is_complete(mask):
        return "todo"
    for kind, target in outputs.items():
        target = Path(target)
        complete = (target / "zarr.json").is_file() if kind == "probs" else target.is_file()
        if not complete:
            return "todo"
    return "done"
