"""Second red-team round of the sandbox: a program that fills its private /tmp is still scored by its own result, the
evaluator's virtualenv is read-only wherever programs see it (on a nodev mount too), and mode none says that programs
run as the caller."""
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

from utils.sandbox import PROJECT_ROOT, Sandbox, SandboxConfig

# Fills the sample's 64 MiB /tmp (where its stdout, stderr and status live, unlinked), then checks that it is full.
_FILL_TMP = """
import os
for i in range(6):
    try:
        with open('/tmp/fill%d' % i, 'wb') as fh:
            fh.write(b'x' * (15 << 20))
    except OSError:
        pass
st = os.statvfs('/tmp')
assert st.f_bavail * st.f_frsize < (1 << 20), st.f_bavail
"""


@pytest.mark.parametrize("start", ["forkserver", "exec"])
def test_a_program_that_fills_its_tmp_is_scored_by_its_own_result(start):
    """Found in review: with the status file on the full tmpfs its 'P'/'F' line was lost, so a passing program
    scored 'failed: exited with code 0 before the program finished (os._exit or similar)'."""
    with Sandbox(SandboxConfig(timeout=5.0, start=start)) as sandbox:
        if not sandbox.features["private_tmp"]:
            pytest.skip("only the namespaces mode puts the status file on the sample's own tmpfs")
        passing = sandbox.run(_FILL_TMP + "assert 1 + 1 == 2\n")
        failing = sandbox.run(_FILL_TMP + "assert 1 + 1 == 3, 'wrong sum'\n")
    assert (passing.status, passing.reason) == ("passed", "")
    assert (failing.status, failing.reason) == ("failed", "AssertionError: wrong sum (line 11)")


_MOUNT_OPTIONS = """
target = TARGET
print([line.split()[5].split(",")[0] for line in open("/proc/self/mountinfo") if line.split()[4] == target])
"""


def test_the_evaluators_virtualenv_is_mounted_read_only_where_programs_see_it(monkeypatch):
    """Found in review: only the venv's site-packages was read-only, so a non-root evaluator's programs (root of their
    user namespace, the caller on the host) rewrote its pyvenv.cfg and bin/activate (shown as nobody with a venv in
    /opt). A visible stand-in for the venv (/usr/bin: outside every hidden directory) must come back read-only."""
    with Sandbox(SandboxConfig(timeout=5.0)) as sandbox:
        if not sandbox.features["mount_namespace"]:
            pytest.skip("read-only mounts need the namespaces mode")
        monkeypatch.setattr(sys, "prefix", "/usr/bin")  # the venv root the request names (sys.base_prefix differs)
        result = sandbox.run(_MOUNT_OPTIONS.replace("TARGET", repr("/usr/bin")))
    assert (result.status, result.stdout) == ("passed", "['ro']\n"), (result.reason, result.stdout)


def test_mode_none_warns_that_programs_run_as_the_callers_user(tmp_path, capsys):
    """Found in review: mode none said only 'network and /tmp are not isolated', yet its programs (as root: uid 0)
    rewrote the project and the venv and killed the evaluator, so that the run ended with no results."""
    import json

    import evaluate_preds

    problem = {"task_id": "t/0", "prompt": "", "entry_point": "None", "test": "def check(candidate):\n    pass\n"}
    (tmp_path / "problems.jsonl").write_text(json.dumps(problem) + "\n")
    (tmp_path / "preds.jsonl").write_text(json.dumps({"task_id": "t/0", "completion": "x = 1\n"}) + "\n")
    summary = evaluate_preds.main(["--task_name", "mbpp", "--path", str(tmp_path / "preds.jsonl"), "--problem_file",
                                   str(tmp_path / "problems.jsonl"), "--sandbox_mode", "none", "--no_progress",
                                   "--k", "1", "--n_workers", "1"])
    assert summary["counts"]["passed"] == 1
    assert f"programs run as your user (uid {os.geteuid()})" in capsys.readouterr().err


_AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


@pytest.mark.skipif(os.getuid() != 0 or not shutil.which("setpriv") or not os.path.exists("/usr/bin/python3"),
                    reason="needs root (to mount a nodev tmpfs and run the evaluator as nobody), setpriv, python3")
def test_a_non_root_evaluators_venv_on_a_nodev_mount_keeps_the_namespaces_mode():
    """Found in review: in a user namespace a host mount's nodev and noexec are locked, so the read-only remount of a
    venv on a nodev mount (a separate /home or /scratch) failed with EPERM and a non-root evaluator lost the
    namespaces mode (auto fell back to none). The read-only remount must keep those flags."""
    if subprocess.run([*_AS_NOBODY, "unshare", "--map-root-user", "true"], capture_output=True).returncode:
        pytest.skip("no user namespaces for an unprivileged user here")
    base = tempfile.mkdtemp(dir="/tmp")  # pytest's tmp_path is private to root
    mounted = tempfile.mkdtemp(dir="/run")  # the venv: outside /tmp and the project, which programs never see
    venv = os.path.join(mounted, "venv")
    try:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "nodev,size=1m", "tmpfs", mounted]).returncode:
            pytest.skip("cannot mount a tmpfs here")
        os.mkdir(venv)
        shutil.copytree(os.path.join(PROJECT_ROOT, "utils"), os.path.join(base, "utils"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        program = f"print([l.split()[5] for l in open('/proc/self/mountinfo') if l.split()[4] == {venv!r}])"
        with open(os.path.join(base, "driver.py"), "w") as fh:
            fh.write(textwrap.dedent(f"""
                import sys
                sys.path.insert(0, {base!r})
                sys.prefix = {venv!r}  # the evaluator's venv, as the request names it (sys.base_prefix differs)
                from utils.sandbox import Sandbox, SandboxConfig
                with Sandbox(SandboxConfig(timeout=10, mode="namespaces", start="exec")) as sandbox:
                    result = sandbox.run({program!r})
                print(result.status, result.stdout, end="")
            """))
        for dirpath, dirnames, filenames in [*os.walk(base), *os.walk(mounted)]:
            for path in [dirpath] + [os.path.join(dirpath, name) for name in dirnames + filenames]:
                os.chmod(path, 0o755)
        proc = subprocess.run([*_AS_NOBODY, "/usr/bin/python3", "-s", "driver.py"], capture_output=True, text=True,
                              timeout=120, cwd=base)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout == "passed ['ro,nosuid,nodev,relatime']\n"
    finally:
        subprocess.run(["umount", mounted], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
        os.rmdir(mounted)
