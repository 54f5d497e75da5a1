"""The child side of the sandbox: run as a script (never imported by the evaluator) by utils/sandbox.py.

    python -s -S -B -P utils/sandbox_child.py serve isolated|plain   # a fork server for one worker slot
    python -s -S -B -P utils/sandbox_child.py run '<request JSON>'    # one program (exec start)

It imports only the standard library (os, sys, json, select, resource, ctypes), so it starts fast and works
with any Python 3.11+. The fork server reads one JSON request per line on stdin, forks a child per request,
enforces its wall-clock timeout and answers ``D <timed out 0|1>``; when the host closes its stdin while a sample
runs, it stops the sample as at its timeout (answering ``D 1``) and exits. Each sample's supervisor (PID 1 of its
PID namespace when namespaced) reports on the status file: ``E <setup error>``, then the program's ``P``
(ran to its end) or ``F <exception>``, then (namespaces) ``T <seconds>`` when it stopped the program at its
wall-clock limit, then ``X <exit code or -signal>``.
"""
import ctypes
import json
import os
import resource
import select
import sys
import time

_write, _exit, _fork, _waitpid, _kill = os.write, os._exit, os.fork, os.waitpid, os.kill
libc = ctypes.CDLL(None, use_errno=True)
REAL_EXECUTABLE = os.path.realpath(sys.executable)
"""The interpreter's file, resolved while the host's paths are in view: a venv linked from a hidden or private
directory (/tmp) is not at sys.executable for the program, and multiprocessing's spawn starts sys.executable."""
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
NEWNS, NEWUTS, NEWIPC, NEWPID, NEWNET = 0x20000, 0x4000000, 0x8000000, 0x20000000, 0x40000000
NOSUID, NODEV, NOEXEC, RDONLY, REMOUNT, BIND, REC, PRIVATE = 2, 4, 8, 1, 32, 4096, 16384, 1 << 18
SYS_OPEN_TREE, SYS_MOVE_MOUNT = 428, 429  # the same number on every architecture (Linux >= 5.2)
OPEN_TREE_CLONE, AT_RECURSIVE, O_CLOEXEC, AT_FDCWD, MOVE_MOUNT_F_EMPTY_PATH = 1, 0x8000, 0o2000000, -100, 4
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_CHILD_SUBREAPER, SIGKILL = 1, 38, 36, 9
PR_CAPBSET_DROP, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, CAPABILITY_VERSION_3, EINVAL = 24, 47, 4, 0x20080522, 22
FALLOC_FL_KEEP_SIZE, STATUS_CAP = 1, 1 << 16  # the status file: space reserved on the tmpfs, and copied out


def report(fd, line):
    """Write one status line (the caller reads the status file after the sample ends)."""
    try:
        _write(fd, (line.replace("\n", " ")[:400] + "\n").encode("utf-8", "replace"))
    except Exception:
        pass


def check(ret, what):
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, "%s: %s" % (what, os.strerror(err)))
    return ret


def mount(src, target, fstype, flags, data):
    enc = lambda s: s.encode() if s is not None else None
    check(libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)), "mount " + target)


def under(path, root):
    """Whether ``path`` is ``root`` or inside it."""
    return path == root or path.startswith(root.rstrip("/") + "/")


def remount_read_only(path):
    """Make the bind mount at ``path`` read-only and nosuid. Its nodev and noexec are kept: in a user namespace they
    are locked on the host's mounts, and a remount that drops them fails with EPERM (a venv on a nodev /home)."""
    flags = os.statvfs(path).f_flag
    kept = (NODEV if flags & os.ST_NODEV else 0) | (NOEXEC if flags & os.ST_NOEXEC else 0)
    mount(None, path, None, REMOUNT | BIND | RDONLY | NOSUID | kept, None)


def isolate(hide, tmpfs_mb, readonly=()):
    """In a new mount namespace: private tmpfs over the scratch dirs, empty tmpfs over ``hide``; ``readonly``
    paths that stay visible become read-only."""
    os.chdir("/")
    # the interpreter (a venv's bin/python and pyvenv.cfg too: multiprocessing's spawn and the resource tracker
    # start sys.executable) and its import paths
    keep = {os.path.realpath(p) for p in [sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix,
                                          os.path.dirname(sys.executable)] + sys.path if p}
    keep = sorted(p for p in keep if os.path.isdir(p))
    keep = [p for p in keep if not any(q != p and under(p, q) for q in keep)]
    plan = [(d, mb, "1777") for d, mb in [("/tmp", tmpfs_mb), ("/var/tmp", 1), ("/dev/shm", 1), ("/run/lock", 1)]]
    plan += [(d, 1, "755") for d in hide]
    done = []
    for d, mb, mode in plan:
        if not os.path.isdir(d) or os.path.islink(d):
            continue
        d = os.path.realpath(d)
        if d == "/" or any(under(d, q) for q in done):
            continue
        # Python itself may live under a hidden directory: clone its tree first, put it back read-only after.
        trees = [(p, check(libc.syscall(SYS_OPEN_TREE, AT_FDCWD, p.encode(),
                                            OPEN_TREE_CLONE | AT_RECURSIVE | O_CLOEXEC), "open_tree " + p))
                 for p in keep if under(p, d)]
        mount("tmpfs", d, "tmpfs", NOSUID | NODEV, "size=%dm,nr_inodes=4096,mode=%s" % (mb, mode))
        for p, fd in trees:
            os.makedirs(p, exist_ok=True)
            check(libc.syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, p.encode(), MOVE_MOUNT_F_EMPTY_PATH),
                  "move_mount " + p)
            remount_read_only(p)
            os.close(fd)
        done.append(d)
    for p in keep + [p for p in readonly if os.path.isdir(p)]:  # read-only wherever they stay visible
        if not any(under(p, d) for d in done):
            mount(p, p, None, BIND | REC, None)
            remount_read_only(p)


def effective_capabilities():
    """The effective capability mask; -1 when /proc cannot tell (then root is assumed to hold some)."""
    try:
        with open("/proc/self/status") as fh:
            return int(next(line for line in fh if line.startswith("CapEff:")).split()[1], 16)
    except (OSError, StopIteration, ValueError):
        return -1 if os.geteuid() == 0 else 0


def drop_bounding_capabilities():
    """Empty the bounding set (no capability can come back through an execve). Only a process that holds
    capabilities needs it, and only it may: the evaluator as root, or root of its own user namespace."""
    if not effective_capabilities():
        return False
    try:
        with open("/proc/sys/kernel/cap_last_cap") as fh:
            last = int(fh.read())
    except (OSError, ValueError):
        last = 63  # past the kernel's last capability, PR_CAPBSET_DROP fails with EINVAL
    for cap in range(last + 1):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 and ctypes.get_errno() != EINVAL:
            check(-1, "drop capability %d" % cap)
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    return True


def clear_capabilities():
    """No effective, permitted or inheritable capability. Without this, a program that runs as root of its own user
    namespace (the namespaces mode started by a non-root evaluator) could remount the read-only site-packages
    writable or unmount the tmpfs that hides the project and home directories."""
    header = (ctypes.c_uint32 * 2)(CAPABILITY_VERSION_3, 0)
    check(libc.capset(header, (ctypes.c_uint32 * 6)()), "capset")
    if effective_capabilities() > 0:
        raise OSError(1, "capabilities remain after capset")


def describe(exc):
    """``Type: message (line N)`` of an exception raised by the program (N: its last line in program.py)."""
    try:
        msg = str(exc)
    except BaseException:
        msg = "?"
    line, tb = getattr(exc, "lineno", None) if isinstance(exc, SyntaxError) else None, exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "program.py":
            line = tb.tb_lineno
        tb = tb.tb_next
    return type(exc).__name__ + (": " + msg[:300] if msg else "") + (" (line %s)" % line if line else "")


def run_program(req, src, fd):
    """The program's process: limits, unprivileged uid, clean environment, then exec; never returns."""
    uid, lim = req["uid"], req["limits"]
    try:
        for res, val in ((resource.RLIMIT_AS, lim["as"]), (resource.RLIMIT_FSIZE, lim["fsize"]),
                         (resource.RLIMIT_NOFILE, lim["nofile"]), (resource.RLIMIT_CORE, 0)):
            resource.setrlimit(res, (val, val))
        resource.setrlimit(resource.RLIMIT_CPU, (lim["cpu"], lim["cpu"] + 1))
        privileged = drop_bounding_capabilities()
        if uid >= 0:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        if privileged:
            clear_capabilities()
        if lim["nproc"] > 0:
            resource.setrlimit(resource.RLIMIT_NPROC, (lim["nproc"], lim["nproc"]))
        libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)  # die with the supervisor (set after the uid change)
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # setuid binaries cannot raise privileges
        os.chdir(req["workdir"])
        os.environ.clear()
        os.environ.update(req["env"])
        sys.argv = ["program.py"]
    except OSError as exc:
        report(fd, "E sandbox setup: %s" % exc)
        _exit(3)
    if not os.path.exists(sys.executable):
        sys.executable = REAL_EXECUTABLE
    # The program is __main__, as under `python program.py`: pickle and multiprocessing look its names up there
    main = type(sys)("__main__")
    main.__builtins__ = __builtins__
    sys.modules["__main__"] = main
    own, error = os.getpid(), None
    try:
        exec(compile(src, "program.py", "exec"), main.__dict__)
        status, code = "P", 0
    except BaseException as exc:
        status, code, error = "F " + describe(exc), 1, exc
    if os.getpid() != own:  # a child the program made with os.fork(): its end is not the program's result
        code = forked_child_code(error)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    if os.getpid() == own:
        report(fd, status)
    _exit(code)


def forked_child_code(error):
    """The exit status Python gives a process that ends with ``error`` (None: at the end of the program), the
    message or traceback printed as Python prints them."""
    if error is None:
        return 0
    if isinstance(error, SystemExit):
        if error.code is None or isinstance(error.code, int):
            return (error.code or 0) & 0xFF
        print(error.code, file=sys.stderr)
        return 1
    try:
        sys.excepthook(type(error), error, error.__traceback__)
    except BaseException:
        pass
    return 1


def sweep(uid):
    """Kill every process of the slot uid (what a program left behind without a PID namespace)."""
    pid = _fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            _kill(-1, SIGKILL)
        finally:
            _exit(0)
    _waitpid(pid, 0)


def _children(parent):
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/%s/stat" % name) as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == parent:
                        found.append(int(name))
            except (OSError, ValueError, IndexError):
                pass
    return found


def reap_orphans():
    """Kill and reap every child left: as a child subreaper we inherit the program's orphaned descendants
    (daemons that called setsid included). Returns at once when no child is left (the usual case)."""
    me = os.getpid()
    while True:
        try:
            if _waitpid(-1, os.WNOHANG)[0]:
                continue
        except ChildProcessError:
            return
        for child in _children(me):
            try:
                _kill(child, SIGKILL)
            except OSError:
                pass
        time.sleep(0.001)


def anonymous_file(directory):
    """An unlinked file on ``directory``'s filesystem (nothing can open it by path)."""
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
    except (AttributeError, OSError):
        path = os.path.join(directory, ".sandbox-%d-%d" % (os.getpid(), time.monotonic_ns()))
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.unlink(path)
        return fd


def private_streams(status_fd, directory):
    """Namespaces: the program's stdout, stderr and status go to unlinked files on the sample's own size-capped
    tmpfs, not to the host's files (``fallocate`` grows a host file past RLIMIT_FSIZE, and a process the program
    leaves behind could write after the exit line). Returns (host fds, private fds); fds 1 and 2 now point to the
    private stdout and stderr."""
    host = [os.dup(1), os.dup(2), status_fd]
    private = [anonymous_file(directory) for _ in range(3)]
    # Reserved, so the status line fits when the program filled its tmpfs (a passing program read as failed).
    libc.fallocate(private[2], FALLOC_FL_KEEP_SIZE, 0, STATUS_CAP)  # best effort: without it, as before
    os.dup2(private[0], 1)
    os.dup2(private[1], 2)
    return host, private


def copy_tail(src, dst, cap):
    """The last ``cap`` bytes of ``src`` (a private file) to ``dst`` (the host's)."""
    size = os.fstat(src).st_size
    os.lseek(src, max(0, size - cap), os.SEEK_SET)
    left = min(size, cap)
    while left > 0:
        chunk = os.read(src, min(left, 1 << 20))
        if not chunk:
            break
        os.write(dst, chunk)
        left -= len(chunk)


def supervise(req, src, fd):
    """The sample's PID 1 (or plain parent): fork the program, wait, clean up, report its exit, exit."""
    host = private = None
    if req["ns"]:  # (in a PID namespace its end kills everything)
        try:
            host, private = private_streams(fd, req["workdir"])
        except OSError as exc:
            report(fd, "E sandbox setup: private output files: %s" % exc)
            _exit(3)
    else:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    started = time.monotonic()
    pid = _fork()
    if pid == 0:
        if host:  # the program holds only its private files
            for h in host + private[:2]:
                os.close(h)
            fd = private[2]
        run_program(req, src, fd)
    # Namespaces: we stop the program at its limit ourselves (the host's kill comes a little later, a backstop), so
    # that its output is still copied out below; killed by the host, we could not.
    status = wait_for(pid, max(0.0, started + req["timeout"] - time.monotonic())) if req["ns"] else None
    stopped = req["ns"] and status is None
    if stopped:
        stop_namespace(pid)
    code = os.waitstatus_to_exitcode(_waitpid(pid, 0)[1] if status is None else status)
    if host:
        for src_fd, dst_fd, cap in zip(private, host, (req["limits"]["fsize"],) * 2 + (STATUS_CAP,)):
            try:
                copy_tail(src_fd, dst_fd, cap)
            except OSError:
                pass
        fd = host[2]
    if not req["ns"]:
        reap_orphans()
    if req["uid"] >= 0 and not req["ns"]:
        sweep(req["uid"])
    if stopped:
        report(fd, "T %g" % req["timeout"])
    report(fd, "X %d" % code)
    _exit(0)


def stop_namespace(pid):
    """As PID 1 of the sample's PID namespace: SIGKILL every other process in it (the program ``pid`` and whatever
    it forked, daemons in their own sessions included). One forked meanwhile dies with the namespace when we exit;
    none of them holds the host's files."""
    try:  # kill(-1) anywhere but PID 1 of a namespace would reach the host's processes: then the program only
        _kill(-1 if os.getpid() == 1 else pid, SIGKILL)
    except OSError:
        pass


def read_program(req, fd):
    """The program's source, read as the caller's user before anything is hidden (never sent in the request, so
    the fork server's memory holds no program). Also puts the evaluator's site-packages on sys.path, so that
    ``isolate`` keeps them visible (read-only)."""
    sys.path.extend(p for p in req.get("import_paths", ()) if p not in sys.path)
    try:
        with open(req["program"], encoding="utf-8", errors="surrogatepass") as fh:  # as written; compile judges
            return fh.read()
    except OSError as exc:
        report(fd, "E sandbox setup: cannot read the program: %s" % exc)
        _exit(3)


def forked_sample(req, net_error):
    """Fork-server child: streams, then (namespaces) unshare and become PID 1's parent, then supervise."""
    os.setsid()
    libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)  # die with the fork server
    for i, path, flags in ((0, "/dev/null", os.O_RDONLY), (1, req["stdout"], os.O_WRONLY | os.O_TRUNC),
                           (2, req["stderr"], os.O_WRONLY | os.O_TRUNC)):
        tmp = os.open(path, flags)
        os.dup2(tmp, i)
        os.close(tmp)
    fd = os.open(req["status"], os.O_WRONLY | os.O_TRUNC)
    src = read_program(req, fd)
    if req["ns"]:
        try:
            if net_error:
                raise OSError(net_error)
            # The server already holds an empty network (and UTS) namespace for its slot; the rest is per sample.
            check(libc.unshare(NEWNS | NEWPID | NEWIPC), "unshare")
            pid1 = _fork()
            if pid1:
                _exit(os.waitstatus_to_exitcode(_waitpid(pid1, 0)[1]) & 0xFF)
            libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)  # PID 1 dies with its parent: the namespace ends
            mount(None, "/", None, REC | PRIVATE, None)  # nothing mounted here propagates to the host
            mount("proc", "/proc", "proc", NOSUID | NODEV | NOEXEC, None)
            isolate(req["hide"], req["tmpfs_mb"], req.get("readonly", ()))
        except OSError as exc:
            report(fd, "E sandbox setup: %s" % exc)
            _exit(3)
    supervise(req, src, fd)


def wait_for(pid, timeout, hangup=None):
    """The wait status of ``pid`` (a child, reaped) if it ended within ``timeout`` s, else None (still running).
    ``hangup``: a descriptor that ends the wait early (None) once readable: the fork server's stdin, on which the
    host sends nothing while a sample runs, so it is readable only when the host closed it (``Sandbox.cancel``,
    or the evaluator died)."""
    watch = [] if hangup is None else [hangup]
    try:
        pfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pfd = None
    if pfd is not None:
        ready = select.select([pfd] + watch, [], [], timeout)[0]
        os.close(pfd)
        return _waitpid(pid, 0)[1] if pfd in ready else None
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        done, status = _waitpid(pid, os.WNOHANG)
        if done:
            return status
        if watch and select.select(watch, [], [], 0)[0]:
            return None
        time.sleep(0.002)
    return None


def serve(isolated):
    """The fork server: one request per line on stdin, one ``D <timed out>`` line per request on stdout."""
    net_error = None
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans of a killed sample come back to us: reap_orphans
    if isolated:
        try:
            check(libc.unshare(NEWNET | NEWUTS), "unshare network namespace")
        except OSError as exc:
            net_error = str(exc)
    buf = b""
    while True:
        while b"\n" not in buf:
            chunk = os.read(0, 65536)
            if not chunk:
                _exit(0)
            buf += chunk
        line, buf = buf.split(b"\n", 1)
        req = json.loads(line)
        pid = _fork()
        if pid == 0:
            try:
                forked_sample(req, net_error)
            finally:
                _exit(3)
        # stopped at its limit, or at once when the host hangs up: either way as a timed-out sample is (the next
        # read then finds the end of stdin and the server exits)
        ended = wait_for(pid, req["kill_after"], hangup=0) is not None
        if not ended:
            for target in (lambda: os.killpg(pid, SIGKILL), lambda: _kill(pid, SIGKILL)):
                try:
                    target()
                except OSError:
                    pass
            _waitpid(pid, 0)
            if req["uid"] >= 0 and not req["ns"]:
                sweep(req["uid"])
        reap_orphans()
        _write(1, ("D %d\n" % (0 if ended else 1)).encode())


def run_one(req):
    """Exec start: streams and namespaces are already set up (Popen, the unshare binary)."""
    src = read_program(req, req["status_fd"])
    if req["ns"]:
        try:
            isolate(req["hide"], req["tmpfs_mb"], req.get("readonly", ()))
        except OSError as exc:
            report(req["status_fd"], "E sandbox setup: %s" % exc)
            _exit(3)
    supervise(req, src, req["status_fd"])


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2] == "isolated")
    else:
        run_one(json.loads(sys.argv[2]))
