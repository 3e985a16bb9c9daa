"""Command-line entry points: a thin layer over the library.

Each sub-command lives in the module that does its job and exposes two functions,
``add_arguments(parser)`` and ``run(args) -> int``; this file only wires them up, turns a
:class:`UserError` into one line on stderr and a non-zero exit, and keeps tracebacks for bugs.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import Callable

from .errors import InputWarning, UserError

# sub-command -> (module, one-line help).  Modules are imported only when their command runs, so
# `wsi-espnet --help` stays fast and an edge install without some extras still starts.
COMMANDS: dict[str, tuple[str, str]] = {
    "predict": ("wsi_espnet.predict", "segment ordinary images (PNG, JPEG, TIFF) into label PNGs and overlays"),
    "segment": ("wsi_espnet.segment", "segment a whole slide (same as wsi-segment)"),
    "tile": ("wsi_espnet.patchstore", "tile a slide's tissue into a Zarr patch store"),
    "demo-slide": ("wsi_espnet.demo", "write a synthetic H&E demo slide (SVS or OME-TIFF) and its truth"),
    "bench": ("wsi_espnet.bench", "parameters, FLOPs, latency and throughput of a model"),
    "train": ("wsi_espnet.train", "train ESPNet-C then ESPNet from a dataset config"),
    "evaluate": ("wsi_espnet.evaluate", "confusion matrix, per-class IoU and mIoU of a model"),
    "export": ("wsi_espnet.export", "export a model to ONNX (fp32 or int8)"),
}


#: OSErrors that say what the machine lacks (space, quota, permission, a working disk), not a bug:
#: one line and exit 1, like a UserError, never a traceback.
ENVIRONMENT_ERRNOS = frozenset(getattr(errno, name) for name in (
    "ENOSPC", "EDQUOT", "EFBIG", "EROFS", "EACCES", "EPERM", "EIO", "EMFILE", "ENFILE", "ENOMEM")
    if hasattr(errno, name))


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Our own warnings (:class:`InputWarning`) as one ``warning:`` line on stderr; others as Python
    prints them."""
    if issubclass(category, InputWarning):
        print(f"warning: {message}", file=file or sys.stderr)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch system's time limit, ``kill``), raised as an interruption: the same clean-up
    as Ctrl-C runs (locks released, no half-written output) and the run says how to resume,
    instead of dying silently with 143."""


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # signals go to the main thread only
        yield
        return

    def raise_terminated(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_guarded(fn: Callable[[], int]) -> int:
    """Run a command's body: a :class:`UserError` becomes its one ``error:`` line and exit code, what
    the machine lacks (space, permissions) one line and exit 1, Ctrl-C or SIGTERM one line and
    130/143; anything else is a bug and keeps its traceback."""
    warnings.showwarning = _one_line_warning
    try:
        with terminate_as_interrupt():
            return int(fn() or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # `wsi-espnet ... | head`: the reader has what it wanted (before OSError, its base)
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # nothing more to flush into the closed pipe at exit
        return 0
    except OSError as exc:
        if exc.errno not in ENVIRONMENT_ERRNOS:
            raise
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where} (fix it and re-run the same command: finished work is kept)",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        return interrupted(exc)


def interrupted(exc: KeyboardInterrupt) -> int:
    """The line and exit code of a run stopped by Ctrl-C (130) or SIGTERM (143)."""
    terminated = isinstance(exc, Terminated)
    hint = getattr(exc, "resume_hint", "re-run the same command to resume")  # a command's own, if it differs
    print(f"{'terminated' if terminated else 'interrupted'}: {hint}", file=sys.stderr)
    return 143 if terminated else 130


class CommandParser(argparse.ArgumentParser):
    """argparse, but a mistake in the command line is one ``error:`` line (exit 2) like every other
    user mistake, not the usage block before it: in a batch job's log the usage buries the line
    that says what was wrong."""

    def error(self, message: str):  # type: ignore[override]
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="wsi-espnet", description="Whole-slide segmentation with ESPNet.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # Parse the command name first, then let the command's own module add its arguments.
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}")
        parser.print_help()
        return 0 if argv else 2
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    about = COMMANDS[name][1] if prog is None else COMMANDS[name][1].split(" (same as")[0]
    sub = CommandParser(prog=prog or f"wsi-espnet {name}", description=about)
    module.add_arguments(sub)
    # intermixed: `train CONFIG --out X train.lr=1e-3` puts options between positionals
    args = sub.parse_intermixed_args(argv[1:])
    return run_guarded(lambda: module.run(args))


def segment_main(argv: list[str] | None = None) -> int:
    """``wsi-segment``: the product's main job, also reachable as ``wsi-espnet segment``."""
    argv = sys.argv[1:] if argv is None else argv
    return main(["segment", *argv], prog="wsi-segment")


if __name__ == "__main__":
    sys.exit(main())
