"""Run untrusted Python programs in a process sandbox, each in a fresh process with a hard wall-clock limit.

Each program runs in its own process, temporary directory and session/process group, with:

* a **clean interpreter**: by default a child forked from a per-worker *template* interpreter (a fork server
  started once with ``python -s -S -B -P`` and a scrubbed environment, which imports only os, sys, json,
  select, resource and ctypes and never runs a program itself), or with ``start="exec"`` a new interpreter per
  program; either way no state of the evaluator (torch, tokens, the environment) is in the program's memory;
* a **scrubbed environment** (PATH, LANG, HOME/TMPDIR pointing at the work dir, PYTHONHASHSEED=0, one BLAS/OpenMP
  thread; no HF_TOKEN, WANDB_API_KEY or other secret), stdin on /dev/null, stdout and stderr to files that
  RLIMIT_FSIZE caps (only the last ``max_output_bytes`` are read back; with namespaces they live on the sample's
  own tmpfs and its supervisor copies them out, so ``fallocate`` cannot fill the host's disk);
* the evaluator's **site-packages** importable (read-only with namespaces, as is its virtualenv), as in the
  classic harnesses;
* **rlimits** on address space (RLIMIT_AS), CPU time, file size, open files and core dumps;
* a **wall-clock timeout** after which the whole process group is SIGKILLed (with namespaces the sample's
  supervisor kills its whole PID namespace at the timeout and keeps the output; the host kills the group
  ``NS_KILL_GRACE`` s later only if it is still there).

Where the OS allows it (mode ``namespaces``; chosen automatically by probing; as root on these machines):

* a new **network namespace** (only a downed loopback: no connection leaves, not even to the host's
  127.0.0.1), held by the fork server for its worker slot (the exec start makes one per program: it costs
  ~3 ms), and a new **IPC namespace** per program (SysV segments die with it);
* a new **PID namespace** whose PID 1 is the sample's supervisor: when it ends or is killed, the kernel kills
  every process the program left behind (daemonised grandchildren included);
* a new **mount namespace** with private tmpfs mounts over /tmp (the program's work dir), /var/tmp, /dev/shm
  and /run/lock, and empty tmpfs mounts over /root, /home, the caller's home and working directory, the
  project and ``SandboxConfig.hide`` (evaluate_file: the predictions' and the problems' directories); the Python
  installation is bind-mounted back read-only when it lives under one of them;
* an **unprivileged uid/gid** per worker slot (as root): the program cannot write root-owned files, cannot
  signal the evaluator, and RLIMIT_NPROC (which root ignores) caps a fork bomb.

Fallbacks, recorded in ``Sandbox.features`` and in every evaluation summary: mode ``uid`` (root without
namespaces, e.g. Docker without privileges: the uid drop and RLIMIT_NPROC still hold, and processes left behind
are killed with ``kill(-1)`` as the slot uid; needs a Python whose stdlib that uid can read) and mode ``none``
(rlimits, process group, scrubbed env and timeout; the fork server is a child subreaper, so the daemons a
program leaves are re-parented to it and killed). As root, ``auto`` never falls back to ``none`` (the programs
would run as uid 0): it raises, naming the fixes, and only an explicit ``mode="none"`` runs that way. A non-root
caller gets ``namespaces`` through ``unshare --map-root-user`` (exec start) when the kernel allows user
namespaces; the program is then root of its own user namespace, so it gives up every capability before it runs
(else it could unmount what hides the host's files or remount the read-only paths writable).

Not covered in any mode: kernel exploits and side channels; a program that deliberately forges its result
(it shares its process with the code that reports it); answers that game the assertion, as in mxeval/CRUXEval;
reads of world-readable files outside the hidden directories (the dataset, /etc); CPU and memory pressure on
other samples (no cgroups; RLIMIT_AS is per process, so a forking sample holds up to nproc x memory_mb); with the
fork server, all samples share the template's address-space layout (weaker ASLR). Without namespaces also:
network access, writes to world-writable directories such as /tmp, fallocate past RLIMIT_FSIZE on the host's
disk, and nothing hidden; without the uid drop (mode none, non-root callers): killing the caller's other
processes, reading its files and /proc/<pid>/environ, fork bombs beyond RLIMIT_NPROC's per-user count, and (exec
start only) a daemon left by a program killed at its timeout; with or without user namespaces, the caller's host
identity (uid, groups) outside the hidden directories. Mode none as root is no isolation: the program is uid 0
(without capabilities) and can rewrite the project, the venv and the results, and kill the evaluator. See
docs/EVALUATION.md.

This module chooses the mode and builds each request; utils/sandbox_process.py talks to the processes (fork
server client, exec start, reading a result) and utils/sandbox_child.py is the child side.
"""
from __future__ import annotations

import dataclasses
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import weakref

from utils.errors import UserError
from utils.sandbox_process import (NS_KILL_GRACE, ForkServer, RunResult, ServerGone, close_servers, exec_sample,
                                   interpret, process_uids, same_interpreter, site_packages)

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("auto", "namespaces", "uid", "none")
STARTS = ("auto", "forkserver", "exec")


class SandboxUnavailable(UserError, RuntimeError):
    """No mode of those asked for runs a probe program; a UserError, so a CLI prints it as one line."""


class SampleCancelled(Exception):
    """``Sandbox.cancel`` stopped the sample before it ended by itself: it has no result (a rerun runs it)."""


@dataclasses.dataclass
class SandboxConfig:
    timeout: float = 10.0
    """Wall-clock seconds before the program is killed (the result is 'timed out'; with namespaces its supervisor
    kills it and keeps its output, and the host kills the whole sample ``NS_KILL_GRACE`` s later if it is still
    there)."""
    memory_mb: int = 1024
    """RLIMIT_AS of the program, in MiB."""
    file_size_mb: int = 16
    """RLIMIT_FSIZE: the largest file (stdout and stderr included) the program may write."""
    nproc: int = 16
    """RLIMIT_NPROC for the program's uid (processes and threads); binding only for an unprivileged uid."""
    nofile: int = 128
    tmpfs_mb: int = 64
    """Size of the private /tmp work dir in mode 'namespaces'."""
    max_output_bytes: int = 4096
    """How much of the end of stdout and stderr is read back."""
    mode: str = "auto"
    """auto | namespaces | uid | none (see the module docstring); auto picks the strongest that works."""
    start: str = "auto"
    """auto | forkserver | exec: fork each sample from a clean template interpreter, or exec a new one."""
    python: str = sys.executable
    """The interpreter that runs the programs (Python 3.11+; only its standard library is used)."""
    uid_base: int | None = None
    """First uid of the worker slots (uid_base + slot); by default a random block of ``UID_RANGE`` that no running
    process uses."""
    hide: tuple[str, ...] = ()
    """More directories to hide (mode namespaces), beside the caller's home, working directory and the project:
    evaluate_file hides the predictions' and the problems' (they hold every sample and every task's tests)."""
    site_packages: bool = True
    """Let programs import the packages installed for the evaluator (numpy, ...), read-only, as in the classic
    harnesses, which run programs in the evaluator's own environment. Only when ``python`` is the evaluator's
    interpreter (another one may not load them)."""

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"sandbox mode must be one of {MODES}, not {self.mode!r}")
        if self.start not in STARTS:
            raise ValueError(f"sandbox start must be one of {STARTS}, not {self.start!r}")
        if self.timeout <= 0 or self.memory_mb <= 0:
            raise ValueError("sandbox timeout and memory_mb must be positive")


UID_RANGE = (2_000_200_192, 2_147_352_576)
"""Where the slot uids are drawn from, in blocks of 256: above sssd's default ID mapping (to 2,000,200,000) and the
ranges of real users and container subuids, below systemd's foreign-uid range (0x7FFE0000) and 2**31 (which some
tools read as negative)."""
_SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/bin", "/sbin", "/etc", "/dev", "/proc", "/sys")


def _random_uid_base() -> int:
    """A block of ``UID_RANGE`` that no visible process runs as (two evaluations at once, or a real user, would
    share RLIMIT_NPROC, and mode uid's sweep would kill the other's processes)."""
    in_use, draw = process_uids(), random.SystemRandom()
    while True:
        base = draw.randrange(UID_RANGE[0] // 256, UID_RANGE[1] // 256) * 256
        if not any(base <= uid < base + 256 for uid in in_use):
            return base


def _hidden_dirs(extra=()) -> list[str]:
    """``extra`` in or above a system directory stays visible: the programs need /usr, /lib, ..."""
    dirs = {"/root", "/home", os.path.expanduser("~"), os.getcwd(), PROJECT_ROOT}
    dirs |= {d for d in map(os.path.realpath, extra) if not any(_under(s, d) or _under(d, s) for s in _SYSTEM_DIRS)}
    return sorted({os.path.realpath(d) for d in dirs if d} - {"/"})


def _under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _evaluator_venv() -> list[str]:
    """The evaluator's virtualenv, which a non-root caller's programs could otherwise rewrite (pyvenv.cfg, bin/)."""
    return [os.path.realpath(sys.prefix)] if sys.prefix != sys.base_prefix else []


class Sandbox:
    """Runs programs; thread-safe (each concurrent ``run`` gets its own worker slot, uid and fork server).

    Use as a context manager (or call ``close``) to stop the fork servers; they also exit with the caller, stopping
    the samples they run. ``cancel`` stops the running samples at once (Ctrl-C).
    """

    _probe_cache: dict = {}
    _probe_lock = threading.Lock()

    def __init__(self, config: SandboxConfig | None = None):
        self.config = config or SandboxConfig()
        self._is_root = os.geteuid() == 0
        self._uid_base = self.config.uid_base or _random_uid_base()
        self._unshare = shutil.which("unshare")
        self._free_slots: list[int] = []
        self._n_slots = 0
        self._lock = threading.Lock()
        self._servers: dict[int, ForkServer] = {}
        self._slots_dir: str | None = None
        self._finalizer = weakref.finalize(self, close_servers, self._servers)
        self._cancelled = False
        self._wake = os.pipe()  # readable once cancelled: wakes the exec start's waits (never read, so all of them)
        for fd in self._wake:
            weakref.finalize(self, os.close, fd)
        self._import_paths = site_packages() if self.config.site_packages and same_interpreter(
            self.config.python) else []
        self.mode, self.start, self.features = self._choose()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the fork servers and remove the slot directories (a later ``run`` starts them again)."""
        with self._lock:
            close_servers(self._servers)
            if self._slots_dir is not None:
                self._finalizer_dir()
                self._slots_dir = None

    def cancel(self) -> None:
        """Stop every running sample now, the way a sample is stopped at its timeout (the fork server's kill, uid
        sweep and reaping of orphans, or the exec start's), and refuse new ones: ``run`` raises SampleCancelled for
        them, and for a sample stopped here (one that ended by itself meanwhile keeps its result). Final."""
        with self._lock:
            if self._cancelled:
                return
            self._cancelled = True
            os.write(self._wake[1], b"x")
            for server in self._servers.values():
                server.hang_up()

    # -- choosing the mode ------------------------------------------------------------------------------
    def _candidates(self) -> list[tuple[str, str]]:
        # As root, auto never falls back to none: the programs would run as uid 0 (asked for explicitly, it runs).
        modes = [self.config.mode] if self.config.mode != "auto" else (
            ["namespaces", "uid"] if self._is_root else (["namespaces"] if self._unshare else []) + ["none"])
        starts = [self.config.start] if self.config.start != "auto" else ["forkserver", "exec"]
        out = []
        for mode in modes:
            for start in starts:
                # Namespaces need root in the fork server, and the unshare binary with exec.
                if mode == "namespaces" and ((start == "forkserver" and not self._is_root)
                                             or (start == "exec" and not self._unshare)):
                    continue
                out.append((mode, start))
        return out

    def _choose(self) -> tuple[str, str, dict]:
        key = (self.config.python, self.config.mode, self.config.start, self._is_root, self._unshare,
               self.config.hide)
        with self._probe_lock:
            if key not in self._probe_cache:
                tried = {}
                for mode, start in self._candidates():
                    self.mode, self.start = mode, start
                    result = self.run("import json, math, re, collections\nprint('sandbox-ok')", 10.0)
                    self.close()
                    if result.status == "passed" and result.stdout == "sandbox-ok\n":
                        break
                    tried[f"{mode}/{start}"] = result.reason
                else:
                    fix = f"check that {self.config.python} runs"
                    if self.config.mode != "auto":
                        fix = f"--sandbox_mode auto tries the other modes; {fix}"
                    elif self._is_root:
                        fix = (f"as root, auto does not fall back to mode none, where programs would run as root "
                               f"with no isolation: allow user namespaces, or let mode uid work (a Python that an "
                               f"unprivileged user can read, e.g. outside /root), or pass --sandbox_mode none to "
                               f"accept that; {fix}")
                    raise SandboxUnavailable(f"no sandbox mode works with {self.config.python}: {tried}; {fix}")
                self._probe_cache[key] = (mode, start, tried)
            mode, start, tried = self._probe_cache[key]
        ns, uid = mode == "namespaces", mode in ("namespaces", "uid") and self._is_root
        features = {
            "mode": mode, "start": start, "process_group_kill": True, "scrubbed_env": True,
            "rlimits": {"as_mb": self.config.memory_mb, "fsize_mb": self.config.file_size_mb,
                        "nofile": self.config.nofile, "nproc": self.config.nproc, "cpu_s": "timeout + 2"},
            "network_namespace": ns, "pid_namespace": ns, "mount_namespace": ns, "private_tmp": ns,
            "hidden_dirs": _hidden_dirs(self.config.hide) if ns else [], "unprivileged_uid": uid,
            "nproc_limit_binding": uid or not self._is_root, "modes_that_failed": tried,
        }
        return mode, start, features

    # -- running ------------------------------------------------------------------------------------------
    def _acquire_slot(self) -> int:
        with self._lock:
            if self._free_slots:
                return self._free_slots.pop()
            self._n_slots += 1
            return self._n_slots - 1

    def _release_slot(self, slot: int) -> None:
        with self._lock:
            self._free_slots.append(slot)

    def run(self, program: str, timeout: float | None = None) -> RunResult:
        """Run ``program``; never raises for anything the program does (SampleCancelled: ``cancel`` stopped it).
        ``timeout`` overrides the config."""
        if self._cancelled:
            raise SampleCancelled
        slot = self._acquire_slot()
        try:
            start = time.monotonic()
            result = self._run(program, timeout or self.config.timeout, slot)
            result.seconds = time.monotonic() - start
            return result
        finally:
            self._release_slot(slot)

    def _env(self, home: str) -> dict:
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": home,
               "TMPDIR": home, "PYTHONHASHSEED": "0", "PYTHONIOENCODING": "utf-8",
               # one core per sample (n_workers = cores), and BLAS pools would hit RLIMIT_NPROC on big machines
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        if "LD_LIBRARY_PATH" in os.environ:  # some Python builds need it to start; it holds no secret
            env["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH"]
        return env

    def _slot_dir(self, slot: int) -> str:
        """A reusable directory with the output files of one worker slot (namespaces + fork server only)."""
        with self._lock:
            if self._slots_dir is None:
                self._slots_dir = tempfile.mkdtemp(prefix="lopa_sandbox_")
                self._finalizer_dir = weakref.finalize(self, shutil.rmtree, self._slots_dir, True)
        path = os.path.join(self._slots_dir, f"slot{slot}")
        if not os.path.isdir(path):
            os.mkdir(path, 0o700)
            for name in ("stdout", "stderr", "status"):
                open(os.path.join(path, name), "wb").close()
        return path

    def _run(self, program: str, timeout: float, slot: int) -> RunResult:
        cfg, ns = self.config, self.mode == "namespaces"
        drop = self.mode in ("namespaces", "uid") and self._is_root
        uid = self._uid_base + slot if drop else -1
        nproc = cfg.nproc if drop else (-1 if self._is_root else process_uids()[os.geteuid()] + cfg.nproc)
        # With namespaces and the fork server nothing of a sample outlives it (its PID namespace ends first), so
        # a slot's files are reused. Otherwise a leftover process could write into a reused file: every sample
        # gets a fresh directory, removed afterwards.
        reuse = ns and self.start == "forkserver"
        tmp = self._slot_dir(slot) if reuse else tempfile.mkdtemp(prefix="lopa_sandbox_")
        try:
            paths = {name: os.path.join(tmp, name) for name in ("program", "stdout", "stderr", "status")}
            home = "/tmp" if ns else os.path.join(tmp, "work")
            req = {"stdout": paths["stdout"], "stderr": paths["stderr"], "status": paths["status"], "workdir": home,
                   "uid": uid, "ns": ns, "env": self._env(home), "hide": _hidden_dirs(cfg.hide),
                   "tmpfs_mb": cfg.tmpfs_mb,
                   "import_paths": self._import_paths, "readonly": _evaluator_venv(),
                   # namespaces: the sample's supervisor stops the program at ``timeout``, the host at ``kill_after``
                   "timeout": timeout, "kill_after": timeout + (NS_KILL_GRACE if ns else 0.0),
                   "limits": {"as": cfg.memory_mb << 20, "fsize": cfg.file_size_mb << 20,
                              "nofile": cfg.nofile, "nproc": nproc, "cpu": int(timeout) + 2}}
            if not reuse and not ns:  # (with namespaces the work dir is the private /tmp)
                os.mkdir(home, 0o700)
                if drop:
                    os.chown(home, uid, uid)
                    os.chmod(tmp, 0o711)  # the slot uid may pass through to its work dir, not list the rest
            # The source goes through a file, never the fork server's request: the template every later sample is
            # forked from must not hold earlier samples' programs (and their tests) in its memory. 0600: a
            # concurrent sample (another slot uid) must not read this one's program or output.
            with open(os.open(paths["program"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w",
                      encoding="utf-8", errors="surrogatepass") as fh:  # a lone surrogate is legal JSON
                fh.write(program)
            req["program"] = paths["program"]
            if not reuse:
                for name in ("stdout", "stderr", "status"):
                    os.close(os.open(paths[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
            try:
                timed_out = (self._via_server(req, slot) if self.start == "forkserver" else
                             exec_sample(req, tmp, cfg.python, self._unshare, self._is_root, self._wake[0]))
                if timed_out and self._cancelled:  # stopped by cancel (or timed out just then: a rerun runs it)
                    raise SampleCancelled
                return interpret(paths, timed_out, timeout, cfg.max_output_bytes, cfg.memory_mb)
            except SampleCancelled:
                raise
            except Exception as exc:  # one sample's trouble is its own result, never the whole evaluation's
                return RunResult("failed", f"sandbox error: {type(exc).__name__}: {exc}", sandbox_error=True)
        finally:
            if not reuse:
                shutil.rmtree(tmp, ignore_errors=True)

    def _via_server(self, req: dict, slot: int) -> bool:
        for attempt in (0, 1):
            with self._lock:
                if self._cancelled:  # no new server: it would run the sample to its end
                    raise SampleCancelled
                server = self._servers.get(slot)
                if server is None or server.proc.poll() is not None:
                    server = self._servers[slot] = ForkServer(self.config.python, self._env("/"),
                                                              self.mode == "namespaces")
            try:
                return server.request(req, req["kill_after"] + 10)
            except ServerGone:
                with self._lock:
                    self._servers.pop(slot, None)
                server.close()
                if self._cancelled:
                    raise SampleCancelled from None
                if attempt:
                    raise
        raise AssertionError("unreachable")
