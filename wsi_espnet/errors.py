"""User-facing errors.

Anything a user can cause (a wrong path, a slide without mpp, a model that does not fit its config)
is raised as a :class:`UserError`.  The CLI prints its message on one line and exits non-zero;
everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the input that the user can fix; the message says how, in one line."""

    exit_code = 2


class SlideError(UserError):
    """A slide that cannot be opened or read (missing, not a slide, truncated, corrupt)."""


class NoMppError(SlideError):
    """A slide without a physical pixel size and no ``--mpp`` override."""


class ModelFileError(UserError):
    """A model file that cannot be read or that does not match what it claims to be."""


class OutputExistsError(UserError):
    """The output exists and ``--overwrite`` was not given."""


class OutputBusyError(UserError):
    """Another run is making the same output right now.  Not a mistake in the input but a moment's
    state: exit code 75 (``EX_TEMPFAIL``, "try again later"), and nothing of the other run's is touched."""

    exit_code = 75


class OutputLostError(UserError):
    """An output's folder, checked before the run, vanished or turned unwritable before the outputs
    were written.  Not a mistake in the command but the machine changing under the run, like a full
    disk: exit code 1, and the finished tiles are kept for the re-run."""

    exit_code = 1


class InputWarning(UserWarning):
    """Something the user may want to know about their input that does not stop the run (the CLI
    prints it as one ``warning:`` line)."""
