"""SIGTERM (timeout, kill, docker stop, SLURM before a time limit) takes Ctrl-C's path through cli_entry: the same
kept work and hint, "terminated (SIGTERM)", exit status 143. Real signals; each test waits for a line or a file, never
for a time."""
import json
import signal
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from utils.data import load_task_split
from utils.errors import _on_stop_signal, cli_entry

# A script's main: says it is ready (with the disposition of SIGTERM it runs under, and that of a Python it starts),
# then waits for a signal.
SCRIPT = """
import signal, subprocess, sys
from utils.errors import cli_entry, on_interrupt

@cli_entry
def main():
    on_interrupt("rerun the same command")
    check = "import signal; print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)"
    child = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True).stdout.strip()
    print(f"ready {signal.getsignal(signal.SIGTERM)!r}; the child's is SIG_DFL: {child}", flush=True)
    while True:
        signal.pause()

main()
"""


def test_sigterm_ends_a_script_as_ctrl_c_does_with_its_hint_and_exit_status_143():
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    ready = proc.stdout.readline()
    # the script's handler, and not one that a Python it starts inherits (exec resets it: the sandbox's fork
    # servers, torch's compile workers)
    assert ready.startswith("ready <function _on_stop_signal"), ready
    assert ready.endswith("the child's is SIG_DFL: True\n"), ready
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err  # 128 + SIGTERM, as a shell reports a process SIGTERM killed
    assert err.startswith("Traceback (most recent call last):") and "utils.errors.Terminated" in err
    assert err.endswith("\nterminated (SIGTERM): rerun the same command\n"), err


def test_the_handlers_are_the_scripts_only_while_its_main_runs_and_an_ignored_signal_stays_ignored():
    seen = []

    @cli_entry
    def main():
        seen.append((signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)))

    before = signal.signal(signal.SIGTERM, signal.SIG_DFL), signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        main()
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == (signal.SIG_DFL,
                                                                                     signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # nohup, or a launcher's choice; SIGINT in a background job
        main()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        main()
        assert seen == [(_on_stop_signal, _on_stop_signal), (signal.SIG_IGN, _on_stop_signal),
                        (_on_stop_signal, signal.SIG_IGN)]
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGINT, before[1])


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _sleeps(problem: dict) -> str:
    """A body for the problem's function that sleeps for a minute, indented as its canonical solution is."""
    first = next(line for line in problem["canonical_solution"].splitlines() if line.strip())
    indent = first[:len(first) - len(first.lstrip())]
    return f"{indent}import time\n{indent}time.sleep(60)\n"


def test_sigterm_while_scoring_keeps_the_scored_samples_and_leaves_no_sandboxed_process(tmp_path, data_paths):
    """Two samples pass at once, the next ones sleep past the timeout: SIGTERM once the first results are kept. The
    running sample is stopped at once (as after Ctrl-C); the fork server and all under it go."""
    import time

    import psutil

    problems = load_task_split("mbpp", "test", data_paths["mbpp"])[:6]  # (the fixture file has 3)
    n = len(problems)
    (tmp_path / "problems.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    rows = [{"task_id": p["task_id"], "completion": p["canonical_solution"] if i < 2 else _sleeps(p)}
            for i, p in enumerate(problems)]
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    partial = tmp_path / "preds_results.partial.jsonl"
    proc = subprocess.Popen([sys.executable, "evaluate_preds.py", "--task_name", "mbpp", "--path", str(preds),
                             "--problem_file", str(tmp_path / "problems.jsonl"), "--n_workers", "1", "--timeout",
                             "5", "--no_progress"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        # the header and both passing samples kept: the worker now runs the first sleeper
        while not (partial.is_file() and len(partial.read_text().splitlines()) >= 3):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        sandboxed = _descendants(proc.pid)
        assert sandboxed  # the fork server, and the sample it runs
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    lines = [json.loads(line) for line in partial.read_text().splitlines()[1:]]  # after the header
    kept = len(lines)  # 2, or more if a sleeper timed out before the signal came
    assert 2 <= kept < n and [r["status"] for r in lines] == ["passed", "passed"] + ["timed out"] * (kept - 2)
    assert not (tmp_path / "preds_results.jsonl").exists()
    assert err.endswith(f"\nterminated (SIGTERM): {kept} of {n} samples are kept in {partial}; rerun the same command "
                        f"to go on from there\n"), err[-2000:]
    _, alive = psutil.wait_procs(sandboxed, timeout=10)
    alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]  # killed, not yet reaped (no init here)
    assert not alive, [p.cmdline() for p in alive]


def test_a_held_stop_raises_what_its_signal_stands_for():
    """Ctrl-C: KeyboardInterrupt (Python's exit); SIGTERM, and a stop that only another process received (no signal
    here): Terminated, so that the run exits with 143 as the signalled one does."""
    from utils.errors import HeldStop, Terminated

    held = HeldStop()
    assert type(held.interrupt()) is Terminated
    held.signum = signal.SIGTERM
    assert type(held.interrupt()) is Terminated
    held.signum = signal.SIGINT
    assert type(held.interrupt()) is KeyboardInterrupt


def test_a_held_signal_is_said_once_and_a_second_one_raises_except_under_a_launcher(monkeypatch, capfd):
    """In a hold: the first signal is recorded and said on stderr by the first process only; a second raises at once,
    except under a launcher (LOCAL_RANK), which forwards the same stop to every process (SIGKILL is its hard stop).
    A hold inside another gives the outer one back when it ends."""
    from utils import errors
    from utils.errors import Terminated, hold_stop_signals

    monkeypatch.setattr(errors, "_RECEIVED", [])
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(KeyboardInterrupt) as stopped, hold_stop_signals() as held:
        _on_stop_signal(signal.SIGINT, None)
        assert held.signum == signal.SIGINT
        _on_stop_signal(signal.SIGTERM, None)
    assert type(stopped.value) is Terminated  # the second, at once
    assert capfd.readouterr().err == ("\nCtrl-C: stopping at the end of this step, once a checkpoint is saved (a "
                                      "second Ctrl-C stops at once)\n")
    monkeypatch.setenv("LOCAL_RANK", "0")
    reached = []
    with pytest.raises(KeyboardInterrupt) as stopped, hold_stop_signals("once final/ is written") as held:
        _on_stop_signal(signal.SIGTERM, None)
        _on_stop_signal(signal.SIGTERM, None)  # forwarded by the launcher: held too
        reached.append(held.signum)
    assert reached == [signal.SIGTERM] and type(stopped.value) is Terminated  # raised when the block ends
    assert capfd.readouterr().err == "\nSIGTERM: stopping once final/ is written (SIGKILL stops at once)\n"
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(KeyboardInterrupt), hold_stop_signals() as outer:
        with hold_stop_signals() as inner:
            pass
        _on_stop_signal(signal.SIGTERM, None)
    assert (outer.signum, inner.signum) == (signal.SIGTERM, None)
    assert capfd.readouterr().err == ""  # another process than the first says nothing
    assert errors._RECEIVED == [signal.SIGINT, signal.SIGTERM, signal.SIGTERM, signal.SIGTERM, signal.SIGTERM]


def test_only_the_first_process_of_a_launched_run_keeps_interrupt_advice(monkeypatch):
    from utils import errors
    from utils.errors import on_interrupt

    monkeypatch.setattr(errors, "_INTERRUPT_HINT", [None])
    monkeypatch.setenv("RANK", "1")
    on_interrupt("rerun")
    assert errors._INTERRUPT_HINT == [None]
    monkeypatch.setenv("RANK", "0")
    on_interrupt("rerun")
    assert errors._INTERRUPT_HINT == ["rerun"]


def test_a_scripts_main_run_in_another_thread_leaves_the_signal_handlers_alone():
    """Only the main thread may set a handler (signal.signal raises ValueError elsewhere)."""
    import threading

    seen = []

    @cli_entry
    def main():
        seen.append(signal.getsignal(signal.SIGTERM))
        return 7

    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        worker = threading.Thread(target=lambda: seen.append(main()))
        worker.start()
        worker.join()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == [signal.SIG_DFL, 7]
