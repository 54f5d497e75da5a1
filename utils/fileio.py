"""Crash-safe file writes shared by training, generation, post-processing, evaluation and the pipeline."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import shutil
import tempfile

from utils.errors import UserError, is_disk_full


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask, read without changing it where /proc allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def open_file_modes(path: str | os.PathLike) -> None:
    """Give the files at or under ``path`` the mode a plain ``open()`` gives (0666 minus the umask). Private
    temporary files (``mkstemp``) and safetensors >= 0.8 create 0600 files, which another user — the evaluator in
    its own container, a colleague on a shared cluster — could not read. Execute bits stay (DeepSpeed makes a
    checkpoint's ``zero_to_fp32.py`` executable)."""
    path = pathlib.Path(path)
    mode = 0o666 & ~current_umask()
    for file in [path] if path.is_file() else (p for p in path.rglob("*") if p.is_file() and not p.is_symlink()):
        os.chmod(file, mode | (file.stat().st_mode & 0o111))


def check_writable_dir(directory: str | os.PathLike, what: str) -> None:
    """Fail before the work, not at its first write: ``directory`` (created later when missing) must be a directory,
    or creatable under a directory, that this process can write to. A read-only mount fails even for root."""
    path = pathlib.Path(directory).absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{what} {directory}: {existing} is a file, not a directory; pass another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what} {directory}: cannot write in {existing} (read-only or no permission); pass a "
                        f"directory you can write to")


@contextlib.contextmanager
def naming_full_disk(path: str | os.PathLike, fix="free space on its file system (or write elsewhere) and rerun"):
    """Turn a full disk (ENOSPC, EDQUOT) met inside into a one-line UserError naming ``path`` and the fix; ``fix``
    is text, or a function giving it once the error happened (what survived is known only then)."""
    try:
        yield
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        where = getattr(exc, "filename", None)  # the file the OS names, when it is another (e.g. in /tmp)
        parent = os.path.dirname(os.path.abspath(path))
        beside = where and pathlib.Path(os.path.abspath(str(where))).is_relative_to(parent)
        where = f" (writing {where})" if where and not beside else ""
        raise UserError(f"{path}: no space left on device{where}; {fix() if callable(fix) else fix}") from exc


@contextlib.contextmanager
def unfinished_directory(directory: pathlib.Path, fix, remove: bool = True):
    """Fill ``directory`` (a temporary name, renamed once complete) inside: on a failure it is removed when
    ``remove`` (never read, it only holds space) and a full disk becomes a UserError naming it (``fix`` as in
    naming_full_disk)."""
    with naming_full_disk(directory, fix):
        try:
            yield
        except BaseException:
            if remove:
                shutil.rmtree(directory, ignore_errors=True)
            raise


KEPT_FIX = "it keeps its earlier content, if any; free space there (or write elsewhere), rerun"


def atomic_write_text(path: str | os.PathLike, text: str, full_disk_fix: str = KEPT_FIX) -> None:
    """Replace ``path`` by ``text`` so that readers see the old or the new content, never a torn file: a temporary
    file beside it, fsynced, renamed over it, and the directory fsynced. A full disk raises a UserError naming
    ``path`` and ``full_disk_fix``."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory; pass a file path to write to")
    if not path.parent.is_dir():
        raise UserError(f"{path}: directory {path.parent} does not exist; create it or pass another path")
    with naming_full_disk(path, full_disk_fix):
        _replace_text(path, text)


def _replace_text(path: pathlib.Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes it 0600; the file is not a secret
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def parse_appended_lines(path: pathlib.Path, lines: list[bytes], parse, bad: str) -> list:
    """``parse(record)`` for each JSON line of the append-only file ``path`` (``lines``: its bytes split at
    newlines; a write cut short may end inside a UTF-8 character). A torn last line (a kill or a full disk
    mid-append) is left out; any other line that does not parse is a UserError ``<path>:<line>: <bad>``."""
    parsed = []
    for lineno, line in enumerate(lines, 1):
        try:
            parsed.append(parse(json.loads(line)))
        except (ValueError, KeyError, TypeError, AttributeError):  # JSONDecodeError, UnicodeDecodeError, shape
            if lineno == len(lines):
                break
            raise UserError(f"{path}:{lineno}: {bad}") from None
    return parsed


def try_lock(directory: str | os.PathLike):
    """``(open lock file, None)`` holding ``directory/.lock``, or ``(None, the holder's pid)`` when another open
    file (another process, or another open() in this one) holds it. The lock lives while the file stays open and
    the OS drops it when the process ends, however it ends: a killed run leaves nothing to clean up."""
    fh = open(pathlib.Path(directory) / ".lock", "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        pid = fh.read().strip() or "?"
        fh.close()
        return None, pid
    with naming_full_disk(fh.name):
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
    return fh, None


def lock_directory(directory: str | os.PathLike, flag: str, owner: str):
    """Hold ``directory/.lock`` (see try_lock) so that a second run writing the same directory stops at once instead
    of mixing its files with this one's; keep a reference to the returned file."""
    fh, pid = try_lock(directory)
    if fh is None:
        raise UserError(f"{flag} {directory}: another {owner} (pid {pid}) is writing there; wait for it to finish "
                        f"or pass another {flag}")
    return fh
