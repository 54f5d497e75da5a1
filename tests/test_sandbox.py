"""The sandbox against hostile programs: each one fails or times out within its limit, nothing escapes, and the
evaluator still scores every other sample right. Also: the fallback modes and graceful degradation."""
import ast
import contextlib
import json
import os
import pathlib
import shutil
import socket
import stat
import sys
import tempfile
import textwrap
import time
import uuid

import pytest

from utils.data import read_jsonl
from utils.evaluation import evaluate_file
from utils.sandbox import PROJECT_ROOT, Sandbox, SandboxConfig

SECRETS = {"HF_TOKEN": "hf_SECRETtoken1234567890", "WANDB_API_KEY": "wandb-SECRET-0987654321"}
TIMEOUT = 3.0
SLACK = 2.5  # seconds a sample may take beyond its timeout (kill, namespace teardown, a loaded machine)


def _live_pids() -> list[str]:
    """Pids of processes that are not zombies (a killed process lingers as a zombie until it is reaped)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] not in "ZX":
                    pids.append(pid)
        except (OSError, IndexError):
            pass
    return pids


def _settled(find, *args, within: float = 2.0) -> list[int]:
    """``find(*args)`` once it is empty, or its last answer after ``within`` s (dying processes take a moment)."""
    end = time.monotonic() + within
    while True:
        found = find(*args)
        if not found or time.monotonic() > end:
            return found
        time.sleep(0.05)


def _processes_with(marker: str) -> list[int]:
    found = []
    for pid in _live_pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if marker.encode() in fh.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def _processes_of_uids(lo: int, hi: int) -> list[int]:
    found = []
    for pid in _live_pids():
        try:
            if lo <= os.stat(f"/proc/{pid}").st_uid < hi:
                found.append(int(pid))
        except OSError:
            pass
    return found


@pytest.fixture
def arena(tmp_path, monkeypatch):
    """Secrets in the environment, a world-writable directory with a file, a listening socket, sentinels."""
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    token = uuid.uuid4().hex[:10]
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("original")
    os.chmod(outside, 0o777)
    os.chmod(outside / "keep.txt", 0o666)
    host_tmp_sentinel = f"/tmp/lopa_sentinel_{token}"
    with open(host_tmp_sentinel, "w") as fh:
        fh.write("original")
    os.chmod(host_tmp_sentinel, 0o666)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    evil = [f"/tmp/lopa_evil_{token}", f"/var/tmp/lopa_evil_{token}", f"/dev/shm/lopa_evil_{token}",
            os.path.join(PROJECT_ROOT, f"lopa_evil_{token}"), os.path.expanduser(f"~/lopa_evil_{token}"),
            str(outside / f"new_{token}")]
    yield {"token": token, "outside": outside, "sentinel": host_tmp_sentinel, "port": listener.getsockname()[1],
           "listener": listener, "evil": evil, "marker": f"4242.{int(token[:6], 16) % 99991}"}
    listener.close()
    for path in evil + [host_tmp_sentinel]:
        if os.path.exists(path):
            os.remove(path)


def hostile_programs(a: dict) -> dict[str, str]:
    """name -> top-level program. Each ends by raising, so that only an escape could make it 'pass'."""
    outside, keep = str(a["outside"]), str(a["outside"] / "keep.txt")
    return {k: textwrap.dedent(v) for k, v in {
        "infinite_loop": "while True:\n    pass\n",
        "fork_bomb": """
            import os
            while True:
                try:
                    os.fork()
                except OSError:
                    pass
            """,
        "memory_bomb": "hog = []\nwhile True:\n    hog.append(' ' * 10**7)\n",
        "deep_recursion": """
            import sys
            sys.setrecursionlimit(10**8)
            def down(n):
                return down(n + 1) + 1
            down(0)
            """,
        "print_1gb": "import sys\nfor _ in range(1024):\n    sys.stdout.write('x' * 2**20)\n",
        "files_outside": f"""
            import os, shutil
            done = []
            for path in {a['evil']!r}:
                try:
                    with open(path, 'w') as fh:
                        fh.write('pwned')
                    done.append('wrote ' + path)
                except OSError:
                    pass
            for action, path in [(os.remove, {keep!r}), (os.remove, {a['sentinel']!r}),
                                 (lambda p: open(p, 'w').write('pwned'), {keep!r}),
                                 (lambda p: open(p, 'w').write('pwned'), {a['sentinel']!r}),
                                 (shutil.rmtree, {outside!r})]:
                try:
                    action(path)
                    done.append('changed ' + path)
                except OSError:
                    pass
            raise SystemExit('did: %r' % done)
            """,
        "read_secrets": """
            import os
            seen = [repr(dict(os.environ))]
            for pid in os.listdir('/proc'):
                try:
                    seen.append(open('/proc/%s/environ' % pid, 'rb').read().decode('latin-1'))
                except OSError:
                    pass
            for path in ('/root/.cache/huggingface/token', os.path.expanduser('~/.netrc')):
                try:
                    seen.append(open(path).read())
                except OSError:
                    pass
            print('\\n'.join(seen))
            raise RuntimeError(' | '.join(seen)[:250])
            """,
        "os_exit_0": "import os\nos._exit(0)\n",
        "kill_parent": f"""
            import os, time
            for target in (os.getppid(), 1, {os.getpid()}):
                try:
                    os.kill(target, 9)
                except OSError:
                    pass
            try:
                os.kill(-1, 9)
            except OSError:
                pass
            time.sleep(0.5)
            raise SystemExit('still alive')
            """,
        "daemon_then_exit": f"""
            import os, time
            pid = os.fork()
            if pid == 0:
                os.setsid()
                if os.fork() == 0:
                    os.execv('/bin/sleep', ['sleep', '{a['marker']}'])
                os._exit(0)
            os.waitpid(pid, 0)
            time.sleep(0.2)
            raise SystemExit('left a daemon behind')
            """,
        "daemon_then_hang": f"""
            import os, time
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    time.sleep({TIMEOUT} + 0.5)
                    open({outside!r} + '/late.txt', 'w').write('after the timeout')
                    os.execv('/bin/sleep', ['sleep', '{a['marker']}1'])
                os._exit(0)
            while True:
                time.sleep(1)
            """,
        "socket": f"""
            import socket
            s = socket.create_connection(('127.0.0.1', {a['port']}), timeout=2)
            s.sendall(b'leak')
            raise SystemExit('connected')
            """,
    }.items()}


GOOD = {"good_0": "assert sum(range(5)) == 10\n", "good_1": "import re\nassert re.sub('a', 'b', 'aa') == 'bb'\n",
        "good_2": "import math\nassert math.isqrt(17) == 4\n", "good_3": "print('fine')\n"}
WRONG = {"wrong_0": "assert 1 + 1 == 3\n", "wrong_1": "undefined_name\n"}


def _as_mbpp(tmp_path, programs: dict[str, str]) -> tuple[str, str]:
    """Each program as an MBPP sample whose prompt and test do nothing: program = completion + no-op check."""
    problems = [{"task_id": name, "prompt": "", "entry_point": "None", "test": "def check(candidate):\n    pass\n"}
                for name in programs]
    (tmp_path / "problems.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    (tmp_path / "preds.jsonl").write_text(
        "".join(json.dumps({"task_id": n, "completion": p}) + "\n" for n, p in programs.items()))
    return str(tmp_path / "preds.jsonl"), str(tmp_path / "problems.jsonl")


def _snapshot(path) -> dict:
    return {os.path.join(d, f): open(os.path.join(d, f), "rb").read() for d, _, files in os.walk(path) for f in files}


def test_hostile_corpus_is_contained_and_the_rest_scores_right(tmp_path, arena):
    hostile = hostile_programs(arena)
    programs = {}
    for i, (name, prog) in enumerate(hostile.items()):  # interleave hostile and ordinary samples
        programs[name] = prog
        extra = list(GOOD.items()) + list(WRONG.items())
        if i < len(extra):
            programs[extra[i][0]] = extra[i][1]
    (tmp_path / "run").mkdir()
    preds, problems = _as_mbpp(tmp_path / "run", programs)
    before = _snapshot(arena["outside"])
    uid_base = 400_000 + (os.getpid() % 1000) * 256
    start = time.monotonic()
    summary = evaluate_file("mbpp", preds, problem_file=problems, n_workers=2, timeout=TIMEOUT, progress=False,
                            sandbox_config=SandboxConfig(uid_base=uid_base))
    elapsed = time.monotonic() - start
    features = summary["sandbox"]
    results = {r["task_id"]: r for r in read_jsonl(tmp_path / "run" / "preds_results.jsonl")}

    # Every hostile program failed or timed out, within its limit; the others scored as they should.
    for name in hostile:
        assert results[name]["status"] in ("failed", "timed out"), (name, results[name])
        assert results[name]["seconds"] <= TIMEOUT + SLACK, (name, results[name])
    assert {n: results[n]["status"] for n in GOOD} == {n: "passed" for n in GOOD}
    assert {n: results[n]["status"] for n in WRONG} == {n: "failed" for n in WRONG}
    assert summary["counts"]["passed"] == len(GOOD) and summary["n_samples"] == len(programs)
    assert elapsed < 30, elapsed
    reasons = {n: results[n]["reason"] for n in hostile}
    assert results["infinite_loop"]["status"] == "timed out"
    assert reasons["memory_bomb"].startswith("MemoryError") or results["memory_bomb"]["status"] == "timed out"
    assert "File too large" in reasons["print_1gb"] or "SIGXFSZ" in reasons["print_1gb"]
    assert "os._exit" in reasons["os_exit_0"]

    # Nothing outside the temp dir changed; no process is left; no secret reached any file.
    assert _snapshot(arena["outside"]) == before
    assert open(arena["sentinel"]).read() == "original"
    assert reasons["files_outside"].startswith("SystemExit: did:")  # it ran; what it wrote inside stayed inside
    if features["private_tmp"]:  # its /tmp, /var/tmp and /dev/shm were private tmpfs mounts
        assert not any(os.path.exists(p) for p in arena["evil"]), reasons["files_outside"]
    if features["unprivileged_uid"]:
        assert not any(os.path.exists(p) for p in arena["evil"][3:]), reasons["files_outside"]
    assert _settled(_processes_with, arena["marker"]) == []
    if features["unprivileged_uid"]:
        assert _settled(_processes_of_uids, uid_base, uid_base + 256) == []
    for path in tmp_path.rglob("*"):
        if path.is_file():
            text = path.read_bytes().decode("utf-8", "replace")
            assert not any(secret in text for secret in SECRETS.values()), path
    time.sleep(max(0.0, TIMEOUT + 1.0 - (time.monotonic() - start)))
    assert not (arena["outside"] / "late.txt").exists()
    assert _settled(_processes_with, arena["marker"]) == []

    if features["network_namespace"]:
        arena["listener"].settimeout(0.2)
        with pytest.raises(socket.timeout):
            arena["listener"].accept()
        assert "Network is unreachable" in reasons["socket"] or "refused" in reasons["socket"]


def test_program_sees_a_scrubbed_environment_and_no_host_files(arena):
    with Sandbox(SandboxConfig(timeout=TIMEOUT)) as sandbox:
        result = sandbox.run(hostile_programs(arena)["read_secrets"])
        probe = sandbox.run("import os\nprint(os.getuid(), os.getcwd(), sorted(os.listdir(os.path.expanduser('~'))))")
    assert result.status == "failed"
    assert "PYTHONHASHSEED" in result.stdout  # the program ran and printed its environment
    assert not any(secret in result.stdout + result.stderr + result.reason for secret in SECRETS.values())
    if sandbox.features["mount_namespace"]:
        uid, cwd, home = probe.stdout.split(" ", 2)
        # the interpreter and site-packages stay visible (read-only): a venv under /tmp shows its first directory
        python = [sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix, os.path.dirname(sys.executable)]
        kept = {os.path.realpath(p).split("/")[2] for p in python + sys.path
                if p and os.path.realpath(p).startswith("/tmp/")}
        assert int(uid) != 0 and cwd == "/tmp" and set(ast.literal_eval(home.strip())) <= kept, (home, kept)


def test_output_is_captured_and_capped():
    with Sandbox(SandboxConfig(timeout=TIMEOUT, max_output_bytes=100)) as sandbox:
        result = sandbox.run("import sys\nprint('a' * 5000)\nprint('tail', file=sys.stderr)\nraise ValueError('bad')")
    assert result.status == "failed" and result.reason == "ValueError: bad (line 4)"
    assert len(result.stdout) == 100 and result.stdout.endswith("a\n") and result.stderr == "tail\n"



def test_programs_import_the_evaluators_packages_read_only():
    """mxeval and CRUXEval run programs in the evaluator's environment, so a numpy solution passes there."""
    pytest.importorskip("numpy")
    with Sandbox(SandboxConfig(timeout=TIMEOUT)) as sandbox:
        ok = sandbox.run("import numpy as np\nassert int(np.arange(4).sum()) == 6")
        write = sandbox.run("import numpy as np\nopen(np.__file__, 'a')")
    with Sandbox(SandboxConfig(timeout=TIMEOUT, site_packages=False)) as bare:
        off = bare.run("import numpy")
    assert ok.status == "passed", ok.reason
    assert off.status == "failed" and off.reason.startswith("ModuleNotFoundError: No module named 'numpy'")
    if sandbox.features["mount_namespace"]:  # bind-mounted back read-only (as root the uid drop denies it first)
        assert write.status == "failed" and write.reason.startswith(("PermissionError", "OSError")), write.reason
        with Sandbox(SandboxConfig(timeout=TIMEOUT)) as sandbox:
            mounts = sandbox.run("import os, numpy\nsp = os.path.dirname(os.path.dirname(numpy.__file__))\n"
                                 "print([l.split()[5] for l in open('/proc/self/mountinfo') if l.split()[4] == sp])")
        options = eval(mounts.stdout)  # the program's own print of a list of strings
        assert options and options[-1].split(",")[0] == "ro", mounts.stdout


_CAPABILITY_PROBE = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
caps = open('/proc/self/status').read().split('CapEff:')[1].split()[0]
unmounted = libc.umount2(b'/tmp', 2), ctypes.get_errno()
remounted = libc.mount(None, b'/tmp', None, 32, None), ctypes.get_errno()  # MS_REMOUNT
print(caps, *unmounted, *remounted, os.path.exists(SECRET))
"""


_NOBODY_PRELUDE = """
import json, sys
BASE = {base!r}
sys.path.insert(0, BASE + "/proj")
from utils.sandbox import Sandbox, SandboxConfig
try:
    sandbox = Sandbox(SandboxConfig(timeout=10, mode="namespaces", start="exec"))
except RuntimeError as exc:
    print(json.dumps(["unavailable", str(exc)]))
    sys.exit(0)
"""
needs_nobody = pytest.mark.skipif(
    os.getuid() != 0 or not shutil.which("setpriv") or not os.path.exists("/usr/bin/python3"),
    reason="needs root (to run the evaluator as nobody), setpriv and a system python3")


@contextlib.contextmanager
def _nobody_driver(body: str, files: dict[str, str] | None = None):
    """The command (and its cwd) that runs ``body`` as nobody, after a prelude that makes ``sandbox`` (namespaces,
    exec start) from a copy of utils/ in a world-readable temp dir (pytest's tmp_path is private to root) holding
    ``files`` too (the prelude's BASE); where nobody gets no such mode, it prints ["unavailable", why]."""
    base = tempfile.mkdtemp(dir="/tmp")
    try:
        shutil.copytree(os.path.join(PROJECT_ROOT, "utils"), os.path.join(base, "proj", "utils"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        for name, text in {**(files or {}), "driver.py": _NOBODY_PRELUDE.format(base=base) + body}.items():
            with open(os.path.join(base, name), "w") as fh:
                fh.write(text)
        for dirpath, dirnames, filenames in os.walk(base):
            for name in dirnames + filenames:
                os.chmod(os.path.join(dirpath, name), 0o755)
        os.chmod(base, 0o755)
        yield ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "/usr/bin/python3", "-s",
               os.path.join(base, "driver.py")], base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _nobody_results(returncode: int, stdout: str, stderr: str) -> list:
    """The driver's JSON lines; skips the test where nobody gets no namespaces mode."""
    assert returncode == 0, stderr[-2000:]
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("[")]
    if lines and lines[0][0] == "unavailable":
        pytest.skip(f"no namespaces mode for an unprivileged user here: {lines[0][1]}")
    return lines


@needs_nobody
def test_a_non_root_evaluators_programs_hold_no_capabilities():
    """Started by an unprivileged user, the namespaces mode makes each program root of its own user namespace: it
    must hold no capability, or it could unmount the tmpfs that hides the host's files, or remount the read-only
    paths writable (shown possible before the fix)."""
    import subprocess

    body = textwrap.dedent(f"""
        with sandbox:
            result = sandbox.run({_CAPABILITY_PROBE!r}.replace("SECRET", repr(BASE + "/secret.txt")))
        print(json.dumps([sandbox.mode, result.status, result.reason, result.stdout]))
    """)
    with _nobody_driver(body, {"secret.txt": "hunter2"}) as (command, base):
        proc = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=base)
    mode, status, reason, stdout = (_nobody_results(proc.returncode, proc.stdout, proc.stderr)[-1] + [None] * 4)[:4]
    assert (mode, status) == ("namespaces", "passed"), reason
    caps, unmount, unmount_errno, remount, remount_errno, sees_secret = stdout.split()
    assert caps == "0000000000000000"
    assert (unmount, unmount_errno, remount, remount_errno) == ("-1", "1", "-1", "1")  # EPERM, both
    assert sees_secret == "False"


# A process that sleeps (ignoring SIGTERM) with MARKER in its argv, for the host to look for in /proc.
_LINGER = """import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
time.sleep(1000)
"""
_ORPHAN_SAYS = """import ctypes, os, signal
signal.signal(signal.SIGUSR1, lambda *_: os.write(2, b' orphaned'))
ctypes.CDLL(None).prctl(1, signal.SIGUSR1)  # PR_SET_PDEATHSIG: its parent, the program, ended before it did
"""
_NOBODY_CHATTY = """import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print('started')
sys.stderr.write('still going')
if os.fork() == 0:
    os.setsid()
    print('child', flush=True)
    os.execv(sys.executable, [sys.executable, '-c', ORPHAN_SAYS + LINGER, 'MARKER'])
os.wait()
"""
_NOBODY_SPAWNER = """import os, sys, time
for _ in range(4):
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.execv(sys.executable, [sys.executable, '-c', LINGER, 'MARKER'])
        os._exit(0)
    os.wait()
print('spawned')
time.sleep(1000)
"""


@needs_nobody
def test_a_non_root_evaluators_timed_out_sample_is_stopped_whole_by_its_supervisor():
    """Started by an unprivileged user (``unshare --map-root-user``, exec start), a timed-out sample's supervisor,
    PID 1 of its user-namespaced PID namespace, kills every process in it at the limit (``kill(-1)``) and keeps
    the output: no daemon in its own session survives, none runs on after the program ended (it would append
    ' orphaned'), and the host's backstop, ``NS_KILL_GRACE`` s later (it would lose the output), is not needed."""
    import subprocess

    from utils.sandbox_process import NS_KILL_GRACE

    markers = {name: f"lopa-linger-{name}-{uuid.uuid4().hex[:12]}" for name in ("chatty", "spawner")}
    programs = {name: src.replace("ORPHAN_SAYS", repr(_ORPHAN_SAYS)).replace("LINGER", repr(_LINGER))
                .replace("MARKER", markers[name]) for name, src in (("chatty", _NOBODY_CHATTY),
                                                                     ("spawner", _NOBODY_SPAWNER))}
    body = textwrap.dedent(f"""
        with sandbox:
            for name, program in {programs!r}.items():
                r = sandbox.run(program, 2.0)
                print(json.dumps([sandbox.mode, name, r.status, r.reason, r.stdout, r.stderr, r.seconds]),
                      flush=True)
    """)
    seen = dict.fromkeys(markers, 0)
    with _nobody_driver(body) as (command, base):
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=base)
        try:
            end = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < end:  # the control: the host sees them while they run
                for name, marker in markers.items():
                    seen[name] = max(seen[name], len(_processes_with(marker)))
                time.sleep(0.05)
            stdout, stderr = proc.communicate(timeout=5)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    results = {name: rest for mode, name, *rest in _nobody_results(proc.returncode, stdout, stderr)}
    assert set(results) == set(markers), stdout
    assert seen == {"chatty": 1, "spawner": 4}, seen
    for name, (status, reason, out, err, seconds) in results.items():
        assert (status, reason) == ("timed out", "exceeded the 2 s wall-clock limit"), (name, status, reason)
        assert (out, err) == {"chatty": ("started\nchild\n", "still going"), "spawner": ("spawned\n", "")}[name]
        assert seconds < 2.0 + NS_KILL_GRACE, (name, seconds)  # stopped by its supervisor, not the backstop
        assert _settled(_processes_with, markers[name]) == [], name


CHATTY_THEN_HANG = """import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print('started')
sys.stderr.write('still going')
if os.fork() == 0:
    os.setsid()
    print('child')
else:
    os.wait()
while True:
    time.sleep(1)
"""


@pytest.mark.parametrize("start", ["forkserver", "exec"])
def test_both_start_methods_contain_a_daemon_and_a_loop(arena, start):
    programs = hostile_programs(arena)
    with Sandbox(SandboxConfig(timeout=2.0, start=start)) as sandbox:
        assert sandbox.start == start
        ok = sandbox.run("print(6 * 7)")
        daemon = sandbox.run(programs["daemon_then_exit"])
        loop = sandbox.run(programs["infinite_loop"])
        connect = sandbox.run(programs["socket"])
        chatty = sandbox.run(CHATTY_THEN_HANG)
    assert (ok.status, ok.stdout) == ("passed", "42\n")
    assert daemon.status == "failed" and loop.status == "timed out" and loop.seconds < 2.0 + SLACK
    # What a timed-out program printed is kept in every mode (namespaces: its supervisor stops it at the limit and
    # copies the output out), a forked child's that left its session and ignores SIGTERM included.
    assert (chatty.status, chatty.reason) == ("timed out", "exceeded the 2 s wall-clock limit"), chatty.reason
    assert (chatty.stdout, chatty.stderr) == ("started\nchild\n", "still going") and chatty.seconds < 2.0 + SLACK
    if sandbox.features["pid_namespace"] or sandbox.features["unprivileged_uid"]:
        assert _settled(_processes_with, arena["marker"]) == []
    if sandbox.features["network_namespace"]:  # each start sets up its own (exec: the unshare flags)
        assert connect.reason.startswith("OSError: [Errno 101] Network is unreachable"), connect.reason
        arena["listener"].settimeout(0.2)
        with pytest.raises(socket.timeout):
            arena["listener"].accept()


@pytest.mark.parametrize("start", ["forkserver", "exec"])
def test_the_hosts_kill_backs_up_a_namespaced_samples_supervisor(monkeypatch, start):
    """Should the supervisor not stop the program at its limit, the host still kills the whole sample (its output
    is lost then) at ``kill_after``: here 1 s, while the supervisor waits for its 60 s."""
    with Sandbox(SandboxConfig(timeout=60.0, start=start)) as sandbox:
        if sandbox.mode != "namespaces":
            pytest.skip("the supervisor enforces the timeout only in the namespaces mode")
        monkeypatch.setattr("utils.sandbox.NS_KILL_GRACE", 1.0 - 60.0)
        result = sandbox.run(CHATTY_THEN_HANG)
        uids = (sandbox._uid_base, sandbox._uid_base + 256)
    assert result.status == "timed out" and result.seconds < 1.0 + SLACK, (result.status, result.seconds)
    if os.geteuid() == 0:
        assert _settled(_processes_of_uids, *uids) == []


@pytest.mark.parametrize("mode, start", [("auto", "forkserver"), ("auto", "exec"), ("none", "forkserver")])
def test_cancel_stops_the_running_sample_and_what_it_left_and_refuses_new_ones(mode, start):
    """Ctrl-C's path (run_samples calls ``cancel``): the program and a daemon it started in a session of its own are
    stopped as at the timeout, though the 60 s limit is far off; ``run`` raises SampleCancelled for it (no result:
    "timed out" would be wrong) and for any later sample."""
    import threading

    from utils.sandbox import SampleCancelled

    marker = f"600.{uuid.uuid4().int % 10**9}"  # seconds for sleep, and a mark on its command line
    program = (f"import os\nif os.fork() == 0:\n    os.setsid()\n    os.execv('/bin/sleep', ['sleep', '{marker}'])\n"
               f"os.execv('/bin/sleep', ['sleep', '{marker}'])")
    outcome = []
    with Sandbox(SandboxConfig(timeout=60.0, mode=mode, start=start)) as sandbox:
        def run():
            try:
                outcome.append(sandbox.run(program))
            except SampleCancelled as exc:
                outcome.append(exc)

        worker = threading.Thread(target=run)
        worker.start()
        for _ in range(600):  # until both are running (a loaded machine may take a while to start them)
            if len(_processes_with(marker)) == 2:
                break
            time.sleep(0.05)
        assert len(_processes_with(marker)) == 2
        sandbox.cancel()
        worker.join()
        assert [type(o) for o in outcome] == [SampleCancelled], outcome
        assert _settled(_processes_with, marker) == []
        with pytest.raises(SampleCancelled):
            sandbox.run("print(1)")


def test_a_request_to_a_fork_server_after_its_hang_up_is_a_gone_server_and_the_server_exits():
    """After ``cancel`` closed a server's stdin, a request sent to it (a sample that raced the cancel) must be
    ServerGone, which ``run`` turns into SampleCancelled, and not a ValueError escaping as a sandbox error; the
    server, idle, exits at the end of its input."""
    from utils.sandbox_process import ForkServer, ServerGone

    server = ForkServer(sys.executable, dict(os.environ), isolated=False)
    try:
        server.hang_up()
        with pytest.raises(ServerGone, match=r"^fork server is gone \(.*closed file"):
            server.request({}, 5.0)
        assert server.proc.wait(timeout=30) == 0
    finally:
        server.close()


def test_mode_none_still_enforces_timeout_limits_env_and_kills_daemons(arena):
    programs = hostile_programs(arena)
    with Sandbox(SandboxConfig(timeout=2.0, mode="none", memory_mb=256)) as sandbox:
        assert sandbox.mode == "none" and not sandbox.features["network_namespace"]
        loop = sandbox.run("import os, sys\nprint('started')\nsys.stderr.write('still going')\n"
                           "if os.fork() == 0:\n    pass\nwhile True:\n    pass")
        mem = sandbox.run("x = bytearray(512 * 2**20)")
        env = sandbox.run("import os\nassert 'HF_TOKEN' not in os.environ and os.environ['PYTHONHASHSEED'] == '0'")
        # No PID namespace and no uid here: the fork server, a child subreaper, inherits and kills the daemons.
        daemons = [sandbox.run(programs[name]) for name in ("daemon_then_exit", "daemon_then_hang")]
    assert loop.status == "timed out" and loop.seconds < 2.0 + SLACK
    # What it printed before the kill is kept: the interpreter runs unbuffered (-u).
    assert (loop.stdout, loop.stderr) == ("started\n", "still going")
    assert mem.status == "failed" and mem.reason.startswith("MemoryError")
    assert env.status == "passed", env.reason
    assert [d.status for d in daemons] == ["failed", "timed out"]
    assert _settled(_processes_with, arena["marker"]) == []


def _readable_by_others(path: str) -> bool:
    while path != "/":
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
        path = os.path.dirname(path)
    return True


@pytest.mark.skipif(os.geteuid() != 0, reason="the uid mode needs root")
def test_uid_mode_without_namespaces_sweeps_leftover_processes(arena):
    python = shutil.which("python3", path="/usr/bin:/usr/local/bin")
    if not python or not _readable_by_others(os.path.dirname(os.path.realpath(python))):
        pytest.skip("no Python whose stdlib an unprivileged uid can read")
    uid_base = 500_000 + (os.getpid() % 1000) * 256
    with Sandbox(SandboxConfig(timeout=2.0, mode="uid", python=python, uid_base=uid_base)) as sandbox:
        assert sandbox.mode == "uid" and sandbox.features["unprivileged_uid"]
        assert not sandbox.features["private_tmp"]  # documented: /tmp is not private without namespaces
        programs = hostile_programs(arena)
        results = {n: sandbox.run(programs[n]) for n in ("daemon_then_exit", "daemon_then_hang", "fork_bomb",
                                                         "kill_parent")}
    assert {n: r.status for n, r in results.items()} == {"daemon_then_exit": "failed", "daemon_then_hang": "timed out",
                                                         "fork_bomb": "timed out", "kill_parent": "failed"}
    assert _settled(_processes_with, arena["marker"]) == []
    assert _settled(_processes_of_uids, uid_base, uid_base + 256) == []


def test_falls_back_when_namespaces_are_not_permitted(tmp_path, monkeypatch):
    """As in Docker without privileges: unshare fails. The probe records why and picks a weaker mode."""
    fake = tmp_path / "unshare"
    fake.write_text("#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: str(fake) if name == "unshare" else None)
    monkeypatch.setattr(Sandbox, "_candidates", lambda self: [("namespaces", "exec"), ("none", "forkserver")])
    with Sandbox(SandboxConfig(timeout=2.0)) as sandbox:
        result = sandbox.run("print('degraded but working')")
    assert (sandbox.mode, sandbox.start) == ("none", "forkserver")
    assert "namespaces/exec" in sandbox.features["modes_that_failed"]
    assert not sandbox.features["network_namespace"] and not sandbox.features["unprivileged_uid"]
    assert result.status == "passed" and result.stdout == "degraded but working\n"


def test_as_root_auto_never_falls_back_to_running_programs_as_root(monkeypatch):
    """Root, with neither namespaces nor the uid drop working (a container without privileges and a Python under
    /root): mode none would run model code as uid 0, so auto refuses and names the fixes; non-root callers keep
    the fallback (their programs run as themselves, as in the classic harnesses)."""
    from types import SimpleNamespace

    from utils.errors import UserError

    probed = []

    def refuse(self, source, timeout=None):
        probed.append(f"{self.mode}/{self.start}")
        return SimpleNamespace(status="failed", stdout="", reason=f"{self.mode} refused")

    monkeypatch.setattr(Sandbox, "run", refuse)
    monkeypatch.setattr(Sandbox, "_probe_cache", {})
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: "/usr/bin/unshare" if name == "unshare" else None)
    with pytest.raises(UserError, match="as root, auto does not fall back to mode none.*pass --sandbox_mode none"):
        Sandbox(SandboxConfig())
    assert probed == ["namespaces/forkserver", "namespaces/exec", "uid/forkserver", "uid/exec"]
    probed.clear()
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(UserError, match="no sandbox mode works") as err:
        Sandbox(SandboxConfig())
    assert probed == ["namespaces/exec", "none/forkserver", "none/exec"] and "as root" not in str(err.value)


def test_no_working_mode_is_an_error_the_cli_prints_as_one_line():
    from utils.errors import UserError

    with pytest.raises(UserError, match="no sandbox mode works.*; --sandbox_mode auto tries the other modes; check that .*no-such-python runs"):
        Sandbox(SandboxConfig(python=os.path.join(sys.prefix, "no-such-python"), mode="none", start="exec"))
    with pytest.raises(RuntimeError, match="no sandbox mode works.*; check that .*no-such-python runs"):
        Sandbox(SandboxConfig(python=os.path.join(sys.prefix, "no-such-python"), start="exec"))


_JUNK_EXIT_LINES = """
import os, time
for _ in range(4):  # left behind, they write forged exit lines to the status descriptor until killed
    if os.fork() == 0:
        while True:
            try:
                os.write(3, b"X zz\\n")
            except OSError:
                pass
time.sleep(0.3)
"""
_FALLOCATE = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
libc.fallocate(2, 1, 0, 200 << 20)  # FALLOC_FL_KEEP_SIZE: RLIMIT_FSIZE does not see it on ext4
print(os.fstat(2).st_blocks * 512 >> 20)
"""


@pytest.mark.parametrize("start", ["forkserver", "exec"])
def test_hostile_output_streams_stay_the_samples_own_problem(start):
    """Found by a red-team review: junk exit lines from leftover processes aborted the whole evaluation
    (ValueError), fallocate grew a host file past the 16 MiB output limit, and a lone surrogate in a completion
    crashed the exec start."""
    with Sandbox(SandboxConfig(timeout=TIMEOUT, start=start)) as sandbox:
        junk = [sandbox.run(_JUNK_EXIT_LINES) for _ in range(3)]
        grown = sandbox.run(_FALLOCATE)
        surrogate = sandbox.run('s = "\ud800"\nprint("never")')
        after = sandbox.run("print(6 * 7)")
    assert all(r.status in ("passed", "failed") for r in junk), [r.reason for r in junk]
    if sandbox.features["mount_namespace"]:  # streams live on the sample's capped tmpfs
        assert grown.status == "passed" and int(grown.stdout) <= 64, grown.stdout
    assert surrogate.status == "failed" and surrogate.reason.startswith("UnicodeEncodeError"), surrogate.reason
    assert (after.status, after.stdout) == ("passed", "42\n")


def test_an_unreadable_exit_line_is_a_sandbox_error_not_a_crash(tmp_path):
    from utils.sandbox_process import interpret

    paths = {name: str(tmp_path / name) for name in ("stdout", "stderr", "status")}
    for name in ("stdout", "stderr"):
        (tmp_path / name).write_text("")
    (tmp_path / "status").write_text("P\nX 0\nX zz\n")
    result = interpret(paths, False, 3.0, 100, 256)
    assert (result.status, result.sandbox_error) == ("failed", True) and "'X zz'" in result.reason


def test_a_sample_cannot_find_earlier_samples_programs_in_its_memory():
    """The fork server's template is forked for every sample: it must not hold earlier programs (their tests)."""
    scan = textwrap.dedent("""
        import ctypes, re
        found = set()
        for line in open("/proc/self/maps"):
            fields = line.split()
            if len(fields) < 2 or not fields[1].startswith("rw"):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if end - start > 64 << 20:
                continue
            try:
                found.update(re.findall(rb"HIDDEN-TEST-(\\d)", ctypes.string_at(start, end - start)))
            except Exception:
                pass
        print(sorted(found))
    """)
    with Sandbox(SandboxConfig(timeout=TIMEOUT, start="forkserver")) as sandbox:
        for i in range(3):
            sandbox.run(f"assert 1 + 1 == 2, 'HIDDEN-TEST-{i}'")
        result = sandbox.run(scan)
    assert result.status == "passed", result.reason
    assert result.stdout.strip() == "[]", result.stdout


_MAIN_PROGRAM = textwrap.dedent("""
    import multiprocessing, pickle

    def square(x):
        return x * x

    class Point:
        def __init__(self, x):
            self.x = x

    assert pickle.loads(pickle.dumps(Point(3))).x == 3
    with multiprocessing.get_context("fork").Pool(2) as pool:
        assert pool.map(square, [1, 2, 3]) == [1, 4, 9]
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # re-runs no __main__ file (as in `python -c`)
        assert pool.map(abs, [-1, -2]) == [1, 2]
""")
_FORKED_CHILDREN = {  # a child's end is its own: the program's process decides the result, as under `python`
    "children_exit_and_raise_parent_passes": ("passed", textwrap.dedent("""
        import os, sys
        pid = os.fork()
        if pid == 0:
            sys.exit(0)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        pid = os.fork()
        if pid == 0:
            raise ValueError("the child fails; its parent copes")
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 1
    """)),
    "child_ends_parent_fails": ("failed", textwrap.dedent("""
        import os
        if os.fork() != 0:
            os.wait()
            assert False, "the parent fails"
    """)),
}


@pytest.mark.parametrize("start", ["forkserver", "exec"])
def test_the_program_is_main_and_its_forked_children_do_not_decide_its_result(start):
    """Under ``python program.py`` pickle and multiprocessing find the program's names in __main__ (they once
    failed, and a spawn Pool waited out the timeout: __main__ was the sandbox's own hidden file). A child made with
    os.fork() that ended first once wrote the sample's result."""
    with Sandbox(SandboxConfig(timeout=10.0, start=start)) as sandbox:
        main = sandbox.run(_MAIN_PROGRAM)
        forked = {name: sandbox.run(program) for name, (_, program) in _FORKED_CHILDREN.items()}
    assert main.status == "passed", (main.reason, main.stderr)
    assert {name: r.status for name, r in forked.items()} == {n: s for n, (s, _) in _FORKED_CHILDREN.items()}, \
        {name: r.reason for name, r in forked.items()}
    assert "ValueError: the child fails" in forked["children_exit_and_raise_parent_passes"].stderr
    assert forked["child_ends_parent_fails"].reason.startswith("AssertionError: the parent fails")


def test_the_predictions_and_problems_directories_are_hidden_wherever_they_are(tmp_path, monkeypatch):
    """They hold every sample and every task's tests; outside the caller's home, working directory and the project
    (and the private /tmp) they were readable, e.g. predictions under /srv or /data."""
    from utils import sandbox as sandbox_module

    parent = next((d for d in ("/srv", "/opt", "/mnt", "/var/lib") if os.access(d, os.W_OK)), None)
    if parent is None:
        pytest.skip("no writable directory outside /tmp, home and the project")
    run = pathlib.Path(tempfile.mkdtemp(prefix="lopa_hidden_test_", dir=parent))
    try:
        os.chmod(run, 0o755)
        programs = {"peek": f"import os\nprint(sorted(os.listdir({str(run)!r})))\n"}
        preds, problems = _as_mbpp(run, programs)
        os.chmod(preds, 0o644)
        summary = evaluate_file("mbpp", preds, problem_file=problems, n_workers=1, timeout=TIMEOUT, progress=False)
        if not summary["sandbox"]["mount_namespace"]:
            pytest.skip("no mount namespace here: nothing is hidden (documented)")
        assert str(run) in summary["sandbox"]["hidden_dirs"]
        assert sandbox_module._hidden_dirs(["/usr/lib", "/", str(run)]) == sandbox_module._hidden_dirs([str(run)])
        with Sandbox(SandboxConfig(timeout=TIMEOUT, hide=(str(run),))) as sandbox:
            seen = sandbox.run(programs["peek"])
        assert seen.status == "passed" and seen.stdout == "[]\n", (seen.reason, seen.stdout)
    finally:
        shutil.rmtree(run, ignore_errors=True)


def test_slot_uids_are_a_random_block_no_running_process_uses(monkeypatch):
    """They were 200,000 + (pid % 10,000) * 256: two evaluations whose pids matched shared RLIMIT_NPROC (and mode
    uid's sweep killed the other's programs), and sssd's default ID mapping hands out uids from 200,000."""
    from utils import sandbox as sandbox_module

    first = sandbox_module.UID_RANGE[0] // 256
    draws = iter([first, first + 1])

    class Draw:
        def randrange(self, lo, hi):
            assert (lo, hi) == (first, sandbox_module.UID_RANGE[1] // 256)
            return next(draws)

    monkeypatch.setattr(sandbox_module.random, "SystemRandom", Draw)
    monkeypatch.setattr(sandbox_module, "process_uids", lambda: {0: 3, first * 256 + 7: 1})
    assert sandbox_module._random_uid_base() == (first + 1) * 256  # the first block had a process
    monkeypatch.undo()
    bases = {sandbox_module._random_uid_base() for _ in range(5)}
    assert len(bases) > 1 and all(b % 256 == 0 and sandbox_module.UID_RANGE[0] <= b < b + 255 <
                                  sandbox_module.UID_RANGE[1] for b in bases)


def test_a_signal_that_kills_the_program_is_its_reason():
    """The results file names the signal (a segfault, the CPU limit, a kill), not an os._exit-like early exit."""
    with Sandbox(SandboxConfig(timeout=TIMEOUT)) as sandbox:
        killed = sandbox.run("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
        ok = sandbox.run("print('after')")
    assert (killed.status, killed.reason) == ("failed", "killed by SIGKILL")
    assert (ok.status, ok.stdout) == ("passed", "after\n")


def test_a_long_exception_message_reaches_the_reason_whole():
    """The reason keeps the first 300 characters of the message (an assertion's compared values, say)."""
    with Sandbox(SandboxConfig(timeout=TIMEOUT)) as sandbox:
        result = sandbox.run("raise ValueError('ab' * 100 + '\\n' + 'c' * 200)\n")
    assert result.status == "failed"
    assert result.reason == "ValueError: " + "ab" * 100 + " " + "c" * 99 + " (line 1)"


@pytest.mark.parametrize("status_lines, expected", [
    ("E sandbox setup: cannot read the program: gone\nX 3\n",
     ("failed", "sandbox error: sandbox setup: cannot read the program: gone", True)),
    ("F MemoryError\nX 1\n", ("failed", "MemoryError (memory limit 256 MiB)", False)),
    ("F ValueError: bad (line 2)\nX 1\n", ("failed", "ValueError: bad (line 2)", False)),
    ("P\nX 0\n", ("passed", "", False)),
    ("X 0\n", ("failed", "exited with code 0 before the program finished (os._exit or similar)", False)),
    ("P\nX -9\n", ("failed", "killed by SIGKILL", False)),
    ("T 3\nX -9\n", ("timed out", "exceeded the 3 s wall-clock limit", False)),  # its supervisor stopped it
    ("", ("failed", "sandbox supervisor ended without a result", True)),
])
def test_interpret_reads_the_status_file_into_a_verdict(tmp_path, status_lines, expected):
    from utils.sandbox_process import interpret

    paths = {name: str(tmp_path / name) for name in ("stdout", "stderr", "status")}
    for name in ("stdout", "stderr"):
        (tmp_path / name).write_text("")
    (tmp_path / "status").write_text(status_lines)
    result = interpret(paths, False, 3.0, 100, 256)
    assert (result.status, result.reason, result.sandbox_error) == expected
    timed_out = interpret(paths, True, 3.0, 100, 256)  # the wall-clock limit wins over whatever was written
    assert (timed_out.status, timed_out.reason) == ("timed out", "exceeded the 3 s wall-clock limit")
