"""The sandbox at its resource limits (second red-team round): a program that fills its private /tmp is still scored
by its own result, not as an early exit."""
import pytest

from utils.sandbox import Sandbox, SandboxConfig

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
