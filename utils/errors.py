"""User-facing errors: raised at the boundary (CLI, files, checkpoints) and printed as one line."""
from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """A problem with the user's input. The message names the thing, the field and the fix."""


def cli_entry(main):
    """Wrap a script's ``main`` so that a UserError prints one line and exits with status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def unknown_choice(kind: str, value: str, choices) -> UserError:
    return UserError(f"unknown {kind} {value!r}; choose one of: {', '.join(sorted(choices))}")
