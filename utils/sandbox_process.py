"""The parent side of the sandbox's processes (utils/sandbox.py decides the policy; utils/sandbox_child.py is the
child side): the fork-server client, the exec start, the uid sweep, and reading a finished sample's result.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import select
import shutil
import signal
import subprocess
import sys

UNSHARE_FLAGS = ["--net", "--ipc", "--uts", "--pid", "--fork", "--kill-child", "--mount-proc", "--mount"]
PYTHON_FLAGS = ["-s", "-S", "-B", "-u"] + (["-P"] if sys.version_info >= (3, 11) else [])
"""``-u``: unbuffered stdout and stderr, so what a program printed before it was killed (a timeout) is in its
files; buffered, a killed program's last output (up to 8 KiB of stdout) was lost."""

NS_KILL_GRACE = 2.0
"""Seconds past the timeout before the host kills a namespaced sample: its supervisor stops the program at the
timeout itself and copies its output out; the host's kill (which would lose that output) is only the backstop."""

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
"""The child-side script (stdlib only), run with ``python -s -S -B -u -P``."""


@dataclasses.dataclass
class RunResult:
    status: str
    """'passed', 'failed' or 'timed out'."""
    reason: str
    seconds: float = 0.0
    stdout: str = ""
    stderr: str = ""
    sandbox_error: bool = False


_SIGNAL_NOTES = {signal.SIGXCPU: "CPU time limit", signal.SIGXFSZ: "file size / output limit",
                 signal.SIGSEGV: "e.g. stack overflow"}


def signal_reason(code: int) -> str:
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    note = _SIGNAL_NOTES.get(-code)
    return f"killed by {name}" + (f" ({note})" if note else "")


def read_tail(path: str, n: int) -> str:
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        fh.seek(max(0, fh.tell() - n))
        return fh.read().decode("utf-8", "replace")


def process_uids() -> collections.Counter:
    """How many visible processes run as each uid."""
    count = collections.Counter()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                count[os.stat(f"/proc/{name}").st_uid] += 1
            except OSError:
                pass
    return count


def same_interpreter(python: str) -> bool:
    return os.path.realpath(shutil.which(python) or python) == os.path.realpath(sys.executable)


def site_packages() -> list[str]:
    """The evaluator's site-packages, resolved (a symlinked venv path would vanish under a hidden directory)."""
    import site

    paths = [p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages"))]
    paths += site.getsitepackages() if hasattr(site, "getsitepackages") else []
    return list(dict.fromkeys(os.path.realpath(p) for p in paths if os.path.isdir(p)))


def wait_process(proc: subprocess.Popen, timeout: float, wake: int | None = None) -> bool:
    """Wait for ``proc`` up to ``timeout`` s; True if it ended. A pidfd wakes at once (Popen.wait polls). ``wake``:
    a descriptor that ends the wait early (False) once readable (``Sandbox.cancel``); not without a pidfd."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        ready = select.select([fd] + ([] if wake is None else [wake]), [], [], timeout)[0]
    finally:
        os.close(fd)
    if fd in ready:
        proc.wait()
    return fd in ready


class ServerGone(Exception):
    pass


class ForkServer:
    """One template interpreter (for one worker slot) that forks a sandboxed child per request."""

    def __init__(self, python: str, env: dict, isolated: bool):
        self.proc = subprocess.Popen([python, *PYTHON_FLAGS, CHILD, "serve",
                                      "isolated" if isolated else "plain"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd="/",
                                     start_new_session=True)

    def request(self, req: dict, wait: float) -> bool:
        """Send one sample; return whether it timed out. Raises _ServerGone if the server died or hung."""
        try:
            self.proc.stdin.write((json.dumps(req) + "\n").encode())
            self.proc.stdin.flush()
        except (OSError, ValueError) as exc:  # ValueError: hung up (a closed stdin)
            raise ServerGone(f"fork server is gone ({exc})") from None
        out = self.proc.stdout
        if not select.select([out], [], [], wait)[0]:
            raise ServerGone(f"fork server did not answer within {wait:g} s")
        line = out.readline().decode()
        if not line.startswith("D "):
            raise ServerGone(f"fork server ended (exit {self.proc.poll()})")
        return line.split()[1] == "1"

    def hang_up(self) -> None:
        """Close the server's stdin: it stops a running sample as at its timeout (its kill, uid sweep and reaping of
        orphans), answers for it, and exits. The request in flight still reads that answer."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


def close_servers(servers: dict) -> None:
    for server in list(servers.values()):
        server.close()
    servers.clear()


def exec_sample(req: dict, cwd: str, python: str, unshare: str | None, is_root: bool,
                wake: int | None = None) -> bool:
    """Exec start: run one sample as a new interpreter (under ``unshare`` with namespaces); True if it outlived
    ``req["kill_after"]``, or was still running when ``wake`` became readable (``Sandbox.cancel``): then its process
    group is killed, and without namespaces every process of its uid."""
    with open(req["status"], "wb") as status, open(req["stdout"], "wb") as out, \
            open(req["stderr"], "wb") as err:
        req = {**req, "status_fd": status.fileno()}
        prefix = []
        if req["ns"]:
            prefix = [unshare] + ([] if is_root else ["--map-root-user"]) + UNSHARE_FLAGS + ["--"]
        proc = subprocess.Popen(prefix + [python, *PYTHON_FLAGS, CHILD, "run", json.dumps(req)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=req["env"], cwd=cwd,
                                pass_fds=(status.fileno(),), start_new_session=True)
        if wait_process(proc, req["kill_after"], wake):
            return False
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        if req["uid"] >= 0 and not req["ns"]:
            sweep_uid(req["uid"])
        return True


def sweep_uid(uid: int) -> None:
    """Kill every process of the slot uid (the program's escaped daemons): kill(-1) as that uid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def interpret(paths: dict, timed_out: bool, timeout: float, max_output_bytes: int, memory_mb: int) -> RunResult:
    """The result of a finished sample from its status file (see sandbox_child) and output tails. ``timed_out``:
    the host killed it; a ``T`` line: its supervisor stopped it at the limit (namespaces)."""
    n = max_output_bytes
    stdout, stderr = read_tail(paths["stdout"], n), read_tail(paths["stderr"], n)
    with open(paths["status"], encoding="utf-8", errors="replace") as fh:
        lines = [line.rstrip("\n") for line in fh if line.strip()]
    outcome = next((line for line in lines if line[:1] in "PF"), None)
    exit_line = next((line for line in reversed(lines) if line.startswith("X ")), None)
    setup = next((line[2:] for line in lines if line.startswith("E ")), None)

    def done(status, reason, error=False):
        return RunResult(status, reason, 0.0, stdout, stderr, error)

    if timed_out or any(line.startswith("T ") for line in lines):
        return done("timed out", f"exceeded the {timeout:g} s wall-clock limit")
    if setup:
        return done("failed", f"sandbox error: {setup}", True)
    if exit_line is None:
        return done("failed", "sandbox supervisor ended without a result", True)
    try:  # without namespaces a process the program left behind may write this file too: parse defensively
        code = int(exit_line[2:].strip()[:12])
    except ValueError:
        return done("failed", f"sandbox supervisor wrote no readable exit status ({exit_line[:40]!r})", True)
    if code < 0:
        return done("failed", signal_reason(code))
    if outcome == "P" and code == 0:
        return done("passed", "")
    if outcome and outcome.startswith("F "):
        reason = outcome[2:]
        if reason.startswith("MemoryError"):
            reason += f" (memory limit {memory_mb} MiB)"
        return done("failed", reason)
    return done("failed", f"exited with code {code} before the program finished (os._exit or similar)")
