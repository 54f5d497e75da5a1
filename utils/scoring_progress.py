"""A scoring's bookkeeping: where its outputs go, the progress file it resumes from, the lock on its predictions.

Nothing is lost on a crash: each finished sample is appended to ``<stem>_results.partial.jsonl`` (``Progress``), and
the next run of the same command runs only the samples it lacks; the file is deleted once the results are written.
A finished scoring of the same predictions, programs and settings can be reused the same way (``resume(finished=
True)``). ``scoring_lock`` keeps a second scorer of the same file out while one runs.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import pathlib

from utils.errors import UserError
from utils.fileio import atomic_write_text, naming_full_disk, parse_appended_lines
from utils.scoring import Sample, SampleResult


def output_paths(path) -> tuple[pathlib.Path, pathlib.Path]:
    path = pathlib.Path(path)
    return path.with_name(path.stem + "_results.jsonl"), path.with_name(path.stem + "_summary.json")


def progress_path(path) -> pathlib.Path:
    """Where scoring keeps the samples finished so far (``Progress``): ``<stem>_results.partial.jsonl``."""
    path = pathlib.Path(path)
    return path.with_name(path.stem + "_results.partial.jsonl")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def program_hash(sample: Sample) -> str:
    """What a sample's result depends on besides the run's settings: its program (or why it has none) and the
    prediction its result records. JSON escapes every non-ASCII character (lone surrogates too)."""
    return _sha256(json.dumps([sample.program, sample.reason, sample.prediction]).encode("ascii"))


class Progress:
    """``<stem>_results.partial.jsonl``: a header line (``fingerprint``: what the results depend on), then one line
    per finished sample, its ``_results.jsonl`` line plus ``program_sha256``. Each line is appended as its sample
    finishes, from the thread that collects the results, so a kill loses at most the line being written (a torn last
    line is ignored). A run whose header matches reuses the results of the same task id, sample index and program
    hash, except sandbox errors (the next run's sandbox may work); a file that does not match is replaced. ``remove``
    it once the results are written. The header is also the summary's ``fingerprint``: a finished scoring that
    records this run's can be reused the same way (``resume(finished=True)``)."""

    CHANGED = {"task_name": "it was scored as {old}, this run as {new}",
               "predictions_sha256": "the predictions file has changed",
               "programs_sha256": "the problems have changed (other programs)",
               "timeout_s": "its timeout was {old} s, this run's is {new} s"}

    def __init__(self, predictions: pathlib.Path, samples: list[Sample], task_name: str, **settings):
        """``settings``: the run's other settings the results depend on (timeout_s, memory_mb, sandbox_mode, ...)."""
        self.path, self.samples, self.predictions = progress_path(predictions), samples, predictions
        self.hashes = [program_hash(s) for s in samples]
        keys = [[s.task_id, s.index, h] for s, h in zip(samples, self.hashes)]
        self.fingerprint = {"scoring_progress": 1, "task_name": task_name,
                            "predictions_sha256": _sha256(predictions.read_bytes()),
                            "programs_sha256": _sha256(json.dumps(keys).encode("ascii")), **settings}
        self.kept = 0

    def resume(self, finished: bool = False) -> dict[int, SampleResult]:
        """The kept results of the samples (by index); says in one line what is reused, or why nothing is. The file
        is rewritten with them (a torn line dropped, sandbox errors left out), ready for appends. ``finished``: a
        finished scoring of the file (``_results.jsonl``) whose summary records this run's fingerprint is reused
        instead, all but its sandbox errors."""
        stored, why = self._read()
        done, why_not_done = self._read_finished() if finished else ({}, "")
        source = done or stored
        reused = {i: source[key] for i, (s, h) in enumerate(zip(self.samples, self.hashes))
                  if (key := (s.task_id, s.index, h)) in source}
        results = output_paths(self.predictions)[0]
        if done:
            print(f"reusing: {len(reused):,} of {len(self.samples):,} samples already scored with these predictions, "
                  f"programs and settings in {results}; delete it to score again", flush=True)
        elif reused:
            print(f"resuming: {len(reused):,} of {len(self.samples):,} samples already scored in {self.path}; "
                  f"delete it to score from scratch", flush=True)
        elif why_not_done:
            print(f"scoring again: {results} is of another scoring ({why_not_done})", flush=True)
        elif why:
            print(f"scoring from scratch: {self.path} is another run's ({why}); it is replaced", flush=True)
        lines = [self.fingerprint] + [{**reused[i].to_json(), "program_sha256": self.hashes[i]} for i in sorted(reused)]
        atomic_write_text(self.path, "".join(json.dumps(line) + "\n" for line in lines))
        self.kept = len(reused)
        return reused

    def _read(self) -> tuple[dict, str]:
        """``({(task id, index, program hash): result}, "")``, or ``({}, why the file is of no use)``."""
        if not self.path.is_file():
            return {}, ""
        try:
            records = parse_appended_lines(self.path, self.path.read_bytes().splitlines(), dict, "")
            header = records[0] if records else {}
            if header != self.fingerprint:
                return {}, self._changed(header)
            stored = {}
            for r in records[1:]:
                result = _stored_result(r)
                if not result.reason.startswith("sandbox error"):
                    stored[result.task_id, result.sample_index, r["program_sha256"]] = result
            return stored, ""
        except (UserError, KeyError, TypeError, AttributeError):
            return {}, "it is not a file of scored samples"

    def _read_finished(self) -> tuple[dict, str]:
        """``({(task id, index, program hash): result}, "")`` from ``_results.jsonl`` when ``_summary.json`` records
        this run's fingerprint (the same predictions, programs and settings; the results are in sample order),
        without sandbox errors; else ``({}, why they are of no use)`` (no reason where there is no summary)."""
        results_path, summary_path = output_paths(self.predictions)
        if not summary_path.is_file():
            return {}, ""
        try:
            recorded = json.loads(summary_path.read_text(encoding="utf-8")).get("fingerprint")
            if recorded != self.fingerprint:
                return {}, self._changed(recorded) if isinstance(recorded, dict) else "it records no fingerprint"
            records = [json.loads(line) for line in results_path.read_text(encoding="utf-8").splitlines()]
            if len(records) != len(self.samples):
                return {}, f"{len(records):,} results for {len(self.samples):,} samples"
            stored = {}
            for sample, h, r in zip(self.samples, self.hashes, records):
                result = _stored_result(r)
                if (result.task_id, result.sample_index, result.prediction) != (sample.task_id, sample.index,
                                                                                sample.prediction):
                    return {}, f"its results differ from the samples at {sample.task_id}"
                if not result.reason.startswith("sandbox error"):
                    stored[sample.task_id, sample.index, h] = result
            return stored, ""
        except (OSError, ValueError, KeyError, TypeError, AttributeError):  # not ours: score it
            return {}, "it is not a finished scoring of this version"

    def _changed(self, header: dict) -> str:
        if header.get("scoring_progress") != self.fingerprint["scoring_progress"]:
            return "it has no header line of this version"
        for key, new in self.fingerprint.items():
            if header.get(key) != new:
                return self.CHANGED.get(key, f"its --{key} was {{old}}, this run's is {{new}}").format(
                    old=header.get(key), new=new)
        return "its header has other fields"

    def append(self, index: int, result: SampleResult) -> None:
        """Keep the finished sample at ``index`` (``run_samples``' ``on_result``)."""
        line = json.dumps({**result.to_json(), "program_sha256": self.hashes[index]}) + "\n"
        fix = (lambda: f"the {self.kept:,} samples scored before are kept in it; free space there, then rerun the "
                       f"same command to go on from there")
        with naming_full_disk(self.path, fix), self.path.open("a", encoding="ascii") as fh:
            fh.write(line)
        self.kept += not result.reason.startswith("sandbox error")  # the next run redoes those (resume)

    def interrupt_hint(self) -> str:
        return (f"{self.kept:,} of {len(self.samples):,} samples are kept in {self.path}; rerun the same command to "
                f"go on from there")

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _stored_result(record: dict) -> SampleResult:
    """A result read back from a results line (``SampleResult.to_json``)."""
    return SampleResult(record["task_id"], record["sample_index"], record["status"], record["reason"],
                        record["seconds"], record["prediction"])


@contextlib.contextmanager
def scoring_lock(path: pathlib.Path):
    """An exclusive lock on the predictions file while it is scored (other files, a stage 1 and a stage 2 say, can be
    scored at once): a second scoring of the same file would replace the first one's progress file, and each would
    lose the samples the other kept. The OS drops the lock when the process ends, however it ends."""
    with open(path, "rb") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{path}: another evaluate_preds.py is scoring this file; wait for it to finish (or stop "
                            f"it: a rerun goes on from the samples it kept)") from None
        yield
