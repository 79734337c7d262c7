"""One error taxonomy for every galr command, the Python API and (later) the HTTP service.

Each class carries the process exit code and the HTTP status it maps to, so the same cause ends the
same way everywhere. Library modules raise these (or subclasses that keep their older names and
built-in bases, e.g. ``BundleError`` is an :class:`InputError` and a ``ValueError``);
:mod:`galr.console` turns them into one line on stderr and the exit code.

Exit codes (the one table; ``--help`` of every command prints it):

====  ======================================================================================
code  meaning
====  ======================================================================================
0     done
1     nothing done: no input found to work on (e.g. no image could be indexed); nothing written
2     bad input or usage: a missing, corrupt or foreign file (bundle, index, checkpoint, query
      file, image list), arguments that do not fit together, another writer holding the file
3     unavailable here: the requested backend, device, engine or optional dependency cannot run
      on this machine
4     a parity or accuracy gate failed (an export then writes nothing)
130   interrupted (Ctrl-C)
====  ======================================================================================
"""

from __future__ import annotations

from typing import ClassVar

EXIT_OK = 0
EXIT_NOTHING_DONE = 1
EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 3
EXIT_GATE_FAILED = 4
EXIT_INTERRUPTED = 130

#: (code, meaning) rows of the table above, for help texts and the README.
EXIT_CODES: tuple[tuple[int, str], ...] = (
    (EXIT_OK, "done"),
    (EXIT_NOTHING_DONE, "nothing done: no input found to work on; nothing written"),
    (EXIT_BAD_INPUT, "bad input or usage: missing, corrupt or foreign file, conflicting arguments, "
                     "file locked by another writer"),
    (EXIT_UNAVAILABLE, "unavailable here: backend, device, engine or optional dependency missing"),
    (EXIT_GATE_FAILED, "a parity or accuracy gate failed (an export then writes nothing)"),
    (EXIT_INTERRUPTED, "interrupted"),
)


class GalrError(Exception):
    """Base of every error galr reports to a user; ``str(error)`` is the whole message."""

    exit_code: ClassVar[int] = EXIT_BAD_INPUT
    http_status: ClassVar[int] = 500


class InputError(GalrError, ValueError):
    """Bad input: a file, value or argument galr cannot use. The message names it and the fix."""

    exit_code = EXIT_BAD_INPUT
    http_status = 400


class NotFoundError(InputError, FileNotFoundError):
    """A file or item that was named does not exist."""

    http_status = 404


class ModelMismatchError(InputError):
    """Two artifacts come from different models (e.g. an index built with another bundle)."""

    http_status = 409


class BusyError(GalrError):
    """Another process holds what this one needs (an index being written); try again later."""

    exit_code = EXIT_BAD_INPUT
    http_status = 503


class NothingDoneError(GalrError):
    """The command found nothing to work on (e.g. every image failed); nothing was written."""

    exit_code = EXIT_NOTHING_DONE
    http_status = 422


class UnavailableError(GalrError, RuntimeError):
    """Something this machine lacks: a backend, a device, an engine built for it, a package."""

    exit_code = EXIT_UNAVAILABLE
    http_status = 503


class GateError(GalrError, RuntimeError):
    """A parity or accuracy gate failed, so the artifact was not written."""

    exit_code = EXIT_GATE_FAILED
    http_status = 500


def exit_code_for(error: BaseException) -> int:
    """The exit code of any exception galr reports without a traceback.

    ``GalrError`` subclasses carry their own; ``OSError`` (full disk, read-only file system, a
    missing folder, no permission) counts as bad input: nothing galr can fix, and the user can.
    """
    if isinstance(error, GalrError):
        return error.exit_code
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_BAD_INPUT


def exit_codes_help() -> str:
    """The exit-code table as plain text (click prints it verbatim after a ``\\b`` line)."""
    width = max(len(str(code)) for code, _ in EXIT_CODES)
    return "\n".join(f"  {code:>{width}}  {meaning}" for code, meaning in EXIT_CODES)


__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_CODES",
    "EXIT_GATE_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_NOTHING_DONE",
    "EXIT_OK",
    "EXIT_UNAVAILABLE",
    "BusyError",
    "GalrError",
    "GateError",
    "InputError",
    "ModelMismatchError",
    "NotFoundError",
    "NothingDoneError",
    "UnavailableError",
    "exit_code_for",
    "exit_codes_help",
]
