"""User-facing errors: raised at the boundary (CLI, files, checkpoints) and printed as one line."""
from __future__ import annotations

import errno
import functools
import sys


class UserError(Exception):
    """A problem with the user's input. The message names the thing, the field and the fix."""


RUST_DISK_FULL = ("(os error 28)", "(os error 122)")
"""How safetensors and tokenizers (Rust) report ENOSPC and EDQUOT: only in the text of their own exception types."""


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is a write that failed because the file system (or the user's quota) is full."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    rust = type(exc) is Exception or type(exc).__module__.startswith("safetensors")
    return rust and any(text in str(exc) for text in RUST_DISK_FULL)


def disk_full_message(exc: BaseException) -> str:
    """One line for a full disk met where no caller named the file (an append, a log): the OS's file name if any."""
    where = getattr(exc, "filename", None)
    if where:
        return f"{where}: no space left on device; free space there (or write elsewhere) and rerun"
    return "no space left on device writing the output; free space on its file system (or write elsewhere) and rerun"


_INTERRUPT_HINT: list = [None]
_DEPTH = [0]  # cli_entry mains running: run_experiment runs each stage's main inside its own


def on_interrupt(hint) -> None:
    """What to tell the user when Ctrl-C (SIGINT) ends this run: a string, or a callable that
    makes it then; the latest call wins. ``cli_entry`` prints it after Python's traceback. A stage's main that
    run_experiment runs inside its own (same process) says nothing: the outer script's advice is the one to follow."""
    if _DEPTH[0] <= 1:
        _INTERRUPT_HINT[0] = hint


def cli_entry(main):
    """Wrap a script's ``main`` so that a UserError (or a full disk) prints one line and exits with status 2, and
    an interrupted run says how to go on (``on_interrupt``)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        outermost = _DEPTH[0] == 0
        if outermost:
            _INTERRUPT_HINT[0] = None
        _DEPTH[0] += 1
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            if outermost and (hint := _INTERRUPT_HINT[0]) is not None:
                _after_the_traceback(f"interrupted: {hint() if callable(hint) else hint}")
            raise
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        except Exception as exc:  # a full disk is the user's to fix, like a bad argument: no traceback
            if not is_disk_full(exc):
                raise
            print(f"error: {disk_full_message(exc)}", file=sys.stderr)
            sys.exit(2)
        finally:
            _DEPTH[0] -= 1

    return wrapper


def _after_the_traceback(line: str) -> None:
    """Print ``line`` once Python has printed the uncaught exception's traceback (the traceback still shows where a
    run stopped; the line below it is what to do)."""
    previous = sys.excepthook

    def excepthook(kind, value, tb):
        previous(kind, value, tb)
        print(line, file=sys.stderr)

    sys.excepthook = excepthook


def unknown_choice(kind: str, value: str, choices) -> UserError:
    return UserError(f"unknown {kind} {value!r}; choose one of: {', '.join(sorted(choices))}")
