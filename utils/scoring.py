"""Samples and their scores: the program each prediction runs as, parallel runs in the sandbox, pass@k.

Semantics follow the public harnesses (spec §7); which files and tasks are scored is utils/evaluation.py's:

* MBPP (mxeval): the program is ``prompt + completion + "\\n" + test + "\\n" + "check(<entry_point>)"``.
* CRUXEval: the program is ``code + "\\nassert " + output + " == " + prediction``. In input mode a prediction
  without ``f(`` fails without running; in output mode one that contains ``f(<input>)`` fails (it would
  let the program compute the answer). Such predictions count as failures, so n is always the number of
  generations, as in the official CRUXEval script (the LOPA repository's copy drops them from n: a bias when
  n > 1).
* pass@k is the unbiased estimator ``1 - C(n-c, k) / C(n, k)`` averaged over tasks, reported for each k that
  every task's n reaches.

Samples run in parallel with a tqdm progress bar: ``n_workers`` threads (default: the usable CPUs), each
driving its own worker slot of the sandbox (utils/sandbox.py). A sample whose sandbox failed (not the
program) counts as failed with a reason that starts with "sandbox error", counted in the summary.
"""
from __future__ import annotations

import dataclasses
import math
import os
from concurrent.futures import ThreadPoolExecutor, as_completed

from tqdm import tqdm

from utils.sandbox import Sandbox

DEFAULT_K = (1, 5, 10)


@dataclasses.dataclass
class Sample:
    task_id: str
    index: int
    program: str | None
    """None: the prediction is malformed and fails without running (``reason`` says why)."""
    reason: str = ""
    prediction: str = ""


@dataclasses.dataclass
class SampleResult:
    task_id: str
    sample_index: int
    status: str
    reason: str
    seconds: float
    prediction: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_json(self) -> dict:
        return {"task_id": self.task_id, "sample_index": self.sample_index, "status": self.status,
                "passed": self.passed, "reason": self.reason, "seconds": round(self.seconds, 4),
                "prediction": self.prediction}


# -- programs --------------------------------------------------------------------------------------------
def mbpp_program(problem: dict, completion: str) -> str:
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"


def cruxeval_program(record: dict, prediction: str, mode: str) -> tuple[str | None, str]:
    """``(program, "")``, or ``(None, reason)`` for a prediction CRUXEval's rules reject without running."""
    if mode == "input" and "f(" not in prediction:
        return None, "malformed input prediction: no call f(...)"
    if mode == "output" and f"f({record['input']})" in prediction:
        return None, "malformed output prediction: it calls f on the input"
    return record["code"] + "\nassert " + record["output"] + " == " + prediction, ""


def mbpp_samples(solutions: list[dict], problems: dict[str, dict]) -> list[Sample]:
    counts: dict[str, int] = {}
    samples = []
    for sol in solutions:
        tid = sol["task_id"]
        index = counts[tid] = counts.get(tid, -1) + 1
        samples.append(Sample(tid, index, mbpp_program(problems[tid], sol["completion"]),
                              prediction=sol["completion"]))
    return samples


def cruxeval_samples(predictions: dict[str, list[str]], records: dict[str, dict], mode: str) -> list[Sample]:
    samples = []
    for rid, preds in predictions.items():
        for index, pred in enumerate(preds):
            program, reason = cruxeval_program(records[rid], pred, mode)
            samples.append(Sample(rid, index, program, reason, pred))
    return samples


# -- running and scoring ------------------------------------------------------------------------------------
def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def run_samples(samples: list[Sample], sandbox: Sandbox, n_workers: int | None = None, progress: bool = True,
                desc: str = "evaluating", reused: dict[int, SampleResult] | None = None,
                on_result=None) -> list[SampleResult]:
    """Run every sample (in parallel, results in input order); malformed samples fail without running. The samples
    at the indices of ``reused`` are not run (their results are taken from it); ``on_result(index, result)`` is
    called in this thread as each of the others finishes. On Ctrl-C the queued samples are dropped, the running
    ones stopped at once (``Sandbox.cancel``), and ``on_result`` still gets every sample that had finished."""

    def one(sample: Sample) -> SampleResult:
        if sample.program is None:
            return SampleResult(sample.task_id, sample.index, "failed", sample.reason, 0.0, sample.prediction)
        r = sandbox.run(sample.program)
        return SampleResult(sample.task_id, sample.index, r.status, r.reason, r.seconds, sample.prediction)

    results: list[SampleResult | None] = [None] * len(samples)
    for i, result in (reused or {}).items():
        results[i] = result
    futures = {}
    with ThreadPoolExecutor(max(1, n_workers or default_workers())) as pool, \
            tqdm(total=len(samples), initial=len(reused or {}), desc=desc, disable=not progress, unit="sample") as bar:
        try:
            futures = {pool.submit(one, s): i for i, s in enumerate(samples) if results[i] is None}
            for fut in as_completed(futures):
                i = futures[fut]
                results[i] = fut.result()
                if on_result is not None:
                    on_result(i, results[i])
                bar.update(1)
        except BaseException as exc:
            # Ctrl-C (or an error): drop the queued samples, or leaving the pool would still run them all, and stop
            # the running ones, or it would wait for each to end (up to --timeout)
            pool.shutdown(wait=False, cancel_futures=True)
            sandbox.cancel()
            if isinstance(exc, KeyboardInterrupt) and on_result is not None:
                for fut, i in futures.items():  # keep what finished before, and not yet collected
                    if results[i] is None and not fut.cancelled() and fut.exception() is None:
                        on_result(i, fut.result())
            raise
    return results  # type: ignore[return-value]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of P(at least one of k samples passes) from n samples with c passing."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"need 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def summarize(results: list[SampleResult], ks=DEFAULT_K) -> dict:
    """pass@k (fractions, for each k <= every task's n), per-status counts and sample counts."""
    per_task: dict[str, list[bool]] = {}
    for r in results:
        per_task.setdefault(r.task_id, []).append(r.passed)
    ns = [len(v) for v in per_task.values()]
    min_n = min(ns) if ns else 0
    scores = {f"pass@{k}": sum(pass_at_k(len(v), sum(v), k) for v in per_task.values()) / len(per_task)
              for k in sorted(set(ks)) if per_task and k <= min_n}
    counts = {s: sum(r.status == s for r in results) for s in ("passed", "failed", "timed out")}
    counts["sandbox_errors"] = sum(r.reason.startswith("sandbox error") for r in results)
    return {**scores, "n_tasks": len(per_task), "n_samples": len(results),
            "samples_per_task": {"min": min_n, "max": max(ns) if ns else 0}, "counts": counts}
