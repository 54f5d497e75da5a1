"""User-facing errors: raised at the boundary (CLI, files, checkpoints) and printed as one line; and how a run that
is stopped (Ctrl-C, SIGTERM) ends: keeping what it did and saying how to go on."""
from __future__ import annotations

import contextlib
import errno
import functools
import os
import signal
import sys
import threading
import traceback


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


class Terminated(KeyboardInterrupt):
    """SIGTERM, taken as Ctrl-C is: ``timeout``, ``kill``, ``docker stop`` and job schedulers (SLURM before a time
    limit or a preemption) send it, then SIGKILL after a grace period. A KeyboardInterrupt, so that every path that
    keeps work on Ctrl-C keeps it here too; its own class, so that the messages can say which it was."""


TERMINATED_EXIT = 128 + signal.SIGTERM
"""A script stopped by SIGTERM exits with 143, as the shell reports a process the signal killed (Ctrl-C keeps
Python's own exit: killed by SIGINT)."""

_INTERRUPT_HINT: list = [None]
_DEPTH = [0]  # cli_entry mains running: run_experiment runs each stage's main inside its own
_RECEIVED: list[int] = []  # the stop signals cli_entry's handler took since the outermost main began
_HOLD: list = [None]  # the HeldStop of a loop that stops at its own step boundaries (hold_stop_signals)


def on_interrupt(hint) -> None:
    """What to tell the user when Ctrl-C (SIGINT) or SIGTERM ends this run: a string, or a callable that makes it
    then; the latest call wins. ``cli_entry`` prints it after Python's traceback. A stage's main that
    run_experiment runs inside its own (same process) says nothing: the outer script's advice is the one to follow;
    nor does a process other than the first of a launched run (``RANK``), so that the advice is printed once."""
    if _DEPTH[0] <= 1 and _first_process():
        _INTERRUPT_HINT[0] = hint


def stop_requested() -> KeyboardInterrupt | None:
    """What to raise if a Ctrl-C or SIGTERM reached this script's handler since its main began (None if none did):
    Python drops a KeyboardInterrupt raised inside a finalizer (``__del__``, common in a training step), so a loop
    over long stages (run_experiment's cells) checks this between them."""
    if not _RECEIVED:
        return None
    return Terminated() if signal.SIGTERM in _RECEIVED else KeyboardInterrupt()


class HeldStop:
    """The stop signal a loop holds until its next step boundary (``hold_stop_signals``)."""

    def __init__(self, when: str = ""):
        self.signum: int | None = None
        self.when = when

    def interrupt(self) -> KeyboardInterrupt:
        """What the held signal would have raised: KeyboardInterrupt for Ctrl-C; Terminated for SIGTERM, and for a
        stop that only another process of the run received."""
        return KeyboardInterrupt() if self.signum == signal.SIGINT else Terminated()


def _first_process() -> bool:
    """Not a process other than the first of a launched run (torchrun and the deepspeed launcher set ``RANK``)."""
    return os.environ.get("RANK", "0") == "0"


def _under_a_launcher() -> bool:
    """Started by torchrun (``accelerate launch`` with several processes) or the ``deepspeed`` launcher: they pass
    a signal they receive on to every process, which may have received it from the terminal or the scheduler too."""
    return "LOCAL_RANK" in os.environ


STOP_AT_STEP_END = "at the end of this step, once a checkpoint is saved"


@contextlib.contextmanager
def hold_stop_signals(when: str = STOP_AT_STEP_END):
    """Within: the first Ctrl-C or SIGTERM that cli_entry's handler takes raises nothing; it is recorded in the
    yielded HeldStop, for a loop to stop at its next step boundary (after saving its state) instead of wherever the
    signal lands (inside an optimizer step or a checkpoint write). A second one raises at once, except under a
    launcher (``_under_a_launcher``: there a second one is most likely the same stop forwarded, and the launcher's
    SIGKILL after its grace period is the hard stop). Outside a script's main (a library call), and for a signal
    ignored or handled by someone else, nothing is held. A signal still held when the block ends is raised then.
    ``when``: the user is told the run stops then (``stopping <when>``)."""
    held, previous = HeldStop(when), _HOLD[0]
    _HOLD[0] = held
    try:
        yield held
    finally:
        _HOLD[0] = previous
    if held.signum is not None:  # came after the loop's last look (no exception is on its way: raise it now)
        raise held.interrupt()


def _on_stop_signal(signum, frame) -> None:
    """cli_entry's handler of SIGINT and SIGTERM: Python's Ctrl-C, for both (unless a loop holds it)."""
    _RECEIVED.append(signum)
    held = _HOLD[0]
    if held is not None and (held.signum is None or _under_a_launcher()):
        if held.signum is None:
            held.signum = signum
            if _first_process():  # one line per run, not one per process
                name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
                again = f"a second {name} stops at once" if not _under_a_launcher() else "SIGKILL stops at once"
                with contextlib.suppress(OSError):  # not print(): the interrupted code may be inside a write
                    os.write(2, f"\n{name}: stopping {held.when} ({again})\n".encode())
        return
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


@contextlib.contextmanager
def _stop_signals_handled():
    """``_on_stop_signal`` for SIGINT where Python's own handler has it and for SIGTERM where it has its default
    disposition (left alone: an ignored signal, a background job's SIGINT, someone else's handler), in the main
    thread only; the previous handlers come back on leaving. Exec resets handled signals to their default, so
    the programs this process starts (the sandbox's fork servers, torch's compile workers) do not inherit it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for signum, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
        if signal.getsignal(signum) is default:
            previous[signum] = signal.signal(signum, _on_stop_signal)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def cli_entry(main):
    """Wrap a script's ``main`` so that a UserError (or a full disk) prints one line and exits with status 2, and
    an interrupted run says how to go on (``on_interrupt``). SIGTERM takes Ctrl-C's path (``Terminated``) and exits
    with status 143."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        outermost = _DEPTH[0] == 0
        if outermost:
            _INTERRUPT_HINT[0] = None
            _RECEIVED.clear()
        _DEPTH[0] += 1
        try:
            with _stop_signals_handled() if outermost else contextlib.nullcontext():
                return main(*args, **kwargs)
        except KeyboardInterrupt as exc:
            if not outermost:
                raise
            hint = _INTERRUPT_HINT[0]
            hint = hint() if callable(hint) else hint
            if isinstance(exc, Terminated):  # Python would exit as if killed by SIGINT: print it all here
                traceback.print_exc()
                if hint is not None:
                    print(f"terminated (SIGTERM): {hint}", file=sys.stderr)
                raise SystemExit(TERMINATED_EXIT) from None
            if hint is not None:
                _after_the_traceback(f"interrupted: {hint}")
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
