"""Evaluation speed: our sandboxed evaluator against the classic harness pattern, on the same samples.

    python benchmarks/bench_evaluate.py            # 487 MBPP + 2 x 400 CRUXEval test samples
    python benchmarks/bench_evaluate.py --smoke    # 8 samples per task, one round (CI; fixture data if needed)

Samples: the MBPP test-split canonical solutions (MBPP/488-974) and the CRUXEval test rows 400-799 with their
ground truth in both modes. "classic" is this project's own minimal re-implementation of the pattern of the
human-eval-derived harnesses (mxeval, CRUXEval): a ThreadPoolExecutor whose threads each start one
``multiprocessing.Process`` (forked) per sample, with a ``multiprocessing.Manager`` list for the result, a
temporary directory, swallowed IO, a ``setitimer`` time limit and a reliability-guard-style monkey-patch of
os/shutil/subprocess (not a sandbox). Variant "pipe" replaces the Manager by a Pipe: the cheapest form of
that pattern. Both sides use the same number of workers. One JSON line per (method, task) is appended to
benchmarks/results.jsonl.
"""
from __future__ import annotations

import builtins
import contextlib
import datetime
import io
import json
import multiprocessing
import os
import pathlib
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, argument_parser, device_name, versions  # noqa: E402  (torch-free)
from utils.data import default_data_path, load_task_split  # noqa: E402
from utils.evaluation import DEFAULT_TIMEOUT  # noqa: E402
from utils.fixtures import write_fixture_data  # noqa: E402
from utils.sandbox import Sandbox, SandboxConfig  # noqa: E402
from utils.scoring import cruxeval_samples, default_workers, mbpp_samples, run_samples  # noqa: E402



# -- the classic pattern (our own code) ------------------------------------------------------------------
class _ClassicTimeout(Exception):
    pass


def _disable_dangerous_functions() -> None:
    """Reliability-guard style: replace destructive os/shutil/subprocess functions by None. Not a sandbox."""
    for name in ("kill", "killpg", "system", "putenv", "remove", "removedirs", "rmdir", "unlink", "rename",
                 "renames", "replace", "truncate", "fork", "forkpty", "setuid", "chmod", "fchmod", "chown",
                 "fchown", "lchown", "chroot", "fchdir", "chdir", "getcwd"):
        setattr(os, name, None)
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, None)
    subprocess.Popen = None
    builtins.exit = builtins.quit = None
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[name] = None


def _classic_child(program: str, timeout: float, sink) -> None:
    saved = {"rmtree": shutil.rmtree, "rmdir": os.rmdir, "unlink": os.unlink, "chdir": os.chdir}
    tmp = tempfile.mkdtemp()
    os.chdir(tmp)

    def on_alarm(signum, frame):
        raise _ClassicTimeout()

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    swallow = io.StringIO()
    _disable_dangerous_functions()
    try:
        with contextlib.redirect_stdout(swallow), contextlib.redirect_stderr(swallow):
            exec(program, {})
        outcome = "passed"
    except _ClassicTimeout:
        outcome = "timed out"
    except BaseException as exc:  # noqa: BLE001 - the harnesses record every failure
        outcome = f"failed: {exc}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    sink(outcome)
    os.rmdir, os.unlink, os.chdir = saved["rmdir"], saved["unlink"], saved["chdir"]
    os.chdir("/")
    saved["rmtree"](tmp, ignore_errors=True)


def classic_check(program: str, timeout: float, variant: str = "manager") -> str:
    if variant == "manager":
        with multiprocessing.Manager() as manager:
            results = manager.list()
            proc = multiprocessing.Process(target=_classic_child, args=(program, timeout, results.append))
            proc.start()
            proc.join(timeout + 1)
            if proc.is_alive():
                proc.kill()
                proc.join()
            out = list(results)
        return out[0] if out else "timed out"
    receiver, sender = multiprocessing.Pipe(duplex=False)
    proc = multiprocessing.Process(target=_classic_child, args=(program, timeout, sender.send))
    proc.start()
    outcome = receiver.recv() if receiver.poll(timeout + 1) else "timed out"
    proc.join(1)
    if proc.is_alive():
        proc.kill()
        proc.join()
    return outcome


def classic_evaluate(programs: list[str], timeout: float, n_workers: int, variant: str) -> list[str]:
    with ThreadPoolExecutor(n_workers) as pool:
        return list(pool.map(lambda p: classic_check(p, timeout, variant), programs))


# -- the benchmark -------------------------------------------------------------------------------------------
def build_samples(limit: int | None, mbpp_path: str | None, crux_path: str | None) -> dict:
    mbpp_path = mbpp_path or default_data_path("mbpp")
    crux_path = crux_path or default_data_path("cruxeval_output_prediction")
    if not (mbpp_path and crux_path):
        if not limit:
            sys.exit("error: ../shared/data is absent; pass --mbpp_data and --cruxeval_data (MBPP and CRUXEval JSONL)")
        paths = write_fixture_data(tempfile.mkdtemp(prefix="bench_evaluate_"))  # smoke runs work anywhere
        mbpp_path, crux_path = mbpp_path or paths["mbpp"], crux_path or paths["cruxeval"]
    problems = load_task_split("mbpp", "test", mbpp_path, limit=limit)
    records = {r["id"]: r for r in load_task_split("cruxeval_output_prediction", "test", crux_path, limit=limit)}
    return {
        "mbpp": mbpp_samples([{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in problems],
                             {p["task_id"]: p for p in problems}),
        "cruxeval_input_prediction": cruxeval_samples(
            {rid: [f"f({r['input']})"] for rid, r in records.items()}, records, "input"),
        "cruxeval_output_prediction": cruxeval_samples(
            {rid: [r["output"]] for rid, r in records.items()}, records, "output"),
    }


def _time_sandbox(task_samples, timeout, workers, start):
    t0 = time.perf_counter()
    with Sandbox(SandboxConfig(timeout=timeout, start=start)) as sandbox:  # the probe is part of the cost
        results = run_samples(task_samples, sandbox, workers, progress=False)
    return time.perf_counter() - t0, sum(r.passed for r in results), f"{sandbox.mode}/{sandbox.start}"


def _time_classic(task_samples, timeout, workers, variant):
    t0 = time.perf_counter()
    outcomes = classic_evaluate([s.program for s in task_samples], timeout, workers, variant)
    return time.perf_counter() - t0, sum(o == "passed" for o in outcomes), variant


def main(argv=None) -> list[dict]:
    p = argument_parser(__doc__)
    p.add_argument("--smoke", action="store_true", help="8 samples per task, one round")
    p.add_argument("--n_workers", type=int, default=None, help="workers for every method (default: CPU count)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved repetitions (the table shows the median)")
    p.add_argument("--methods", default="sandbox:forkserver,sandbox:exec,classic:manager,classic:pipe")
    p.add_argument("--results", default=str(RESULTS), help="JSONL file the measurements are appended to")
    p.add_argument("--mbpp_data", default=None, help="MBPP JSONL (default: ../shared/data)")
    p.add_argument("--cruxeval_data", default=None, help="CRUXEval JSONL (default: ../shared/data)")
    args = p.parse_args(argv)
    workers = args.n_workers or default_workers()
    rounds = 1 if args.smoke else args.rounds
    samples = build_samples(8 if args.smoke else None, args.mbpp_data, args.cruxeval_data)
    common = {"bench": "evaluate", "model": None, "batch_size": None, "device": device_name(), "versions": versions(),
              "date": datetime.date.today().isoformat(), "run_id": uuid.uuid4().hex[:12], "n_workers": workers,
              "smoke": args.smoke}
    rows = []
    for round_ in range(rounds):  # methods interleaved, so that a busy spell of the machine hits all of them
        for task, task_samples in samples.items():
            for spec in args.methods.split(","):
                method, variant = spec.split(":")
                timer = _time_sandbox if method == "sandbox" else _time_classic
                seconds, passed, variant = timer(task_samples, DEFAULT_TIMEOUT[task], workers, variant)
                rows.append({**common, "method": method, "variant": variant, "task": task, "round": round_,
                             "seconds": seconds, "n_samples": len(task_samples), "passed": passed,
                             "samples_per_s": len(task_samples) / seconds})
                print(f"round {round_} {task} {method}/{variant}: {seconds:.2f} s, {passed} passed", flush=True)
    with open(args.results, "a", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    print(f"device: {common['device']}; n_workers {workers}; rounds {rounds}; run_id {common['run_id']}")
    print("| task | method | variant | samples | passed | seconds (median) | samples/s |")
    print("|---|---|---|---|---|---|---|")
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["task"], r["method"], r["variant"]), []).append(r)
    for (task, method, variant), group in groups.items():
        secs = statistics.median(r["seconds"] for r in group)
        n = group[0]["n_samples"]
        print(f"| {task} | {method} | {variant} | {n} | {group[0]['passed']} | {secs:.2f} | {n / secs:.1f} |")
    return rows


if __name__ == "__main__":
    main()
