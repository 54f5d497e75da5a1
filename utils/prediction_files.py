"""The files generation leaves in ``--log_dir``: progress while it runs, and the evaluators' inputs at the end.

MBPP (read by mxeval's ``evaluate_functional_correctness``):
  ``mbxp_solutions.jsonl``     {"task_id", "language": "python", "completion"} — n lines per task for n samples
  ``mbxp_raw.jsonl``           {"task_id", "raw"} — the decoded new text before cutting at a stop string
  ``mbpp_test_problems.jsonl`` the test records, as mxeval's ``--problem_file``
CRUXEval (read as is by the LOPA repository's copy of CRUXEval's ``evaluate_generations.py``; the official one
needs every id and the mode in the file name: docs/EVALUATION.md):
  ``output.json``              {"sample_412": [answer, …]} — answers extracted after ``[ANSWER]``
  ``output_raw.json``          {"sample_412": [raw completion, …]}
A fresh start (no ``--resume``) refuses a directory that holds them, or progress, unless ``--overwrite``
(``check_fresh_start``), and then deletes them and the files derived from them (``derived_files``); it refuses a
directory that holds another task family's (``check_no_other_task_files``).
Both: ``generation_progress.jsonl`` (one line per finished batch, appended and fsynced; ``--resume`` reads it
back) and ``generate_preds_config.json`` (the resolved settings).

Every final file is written to a temporary name and renamed into place, so a reader never sees half a file.
They are ASCII (JSON escapes any other character), since the harnesses read them in the locale's encoding.
The final files are always rebuilt from the progress file, so a resumed run writes the same bytes as an
uninterrupted one.
"""
from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable, Sequence

from utils.data import read_json_object
from utils.errors import UserError
from utils.tasks import Task, cruxeval_prompt
from utils.fileio import atomic_write_text, naming_full_disk, parse_appended_lines

PROGRESS_FILE = "generation_progress.jsonl"
CONFIG_FILE = "generate_preds_config.json"
MBPP_FILES = ("mbxp_solutions.jsonl", "mbxp_raw.jsonl", "mbpp_test_problems.jsonl")
CRUXEVAL_FILES = ("output.json", "output_raw.json")
MXEVAL_PROBLEM_FIELDS = ("task_id", "language", "prompt", "test", "entry_point", "canonical_solution")
_MBPP_OPTIONAL_FIELDS = ("description",)


def output_files(task: Task) -> tuple[str, ...]:
    return MBPP_FILES if task.is_mbpp else CRUXEVAL_FILES


def derived_files(task: Task) -> tuple[str, ...]:
    """What post-processing and evaluate_preds.py write beside the predictions (``<stem>_stageN.jsonl``,
    ``<stem>_results.jsonl``, ``<stem>_summary.json``, an interrupted scoring's ``<stem>_results.partial.jsonl``),
    and mxeval's scores of them (``<file>_results.jsonl``, ``<file>_passatk.json``): stale once the predictions are
    replaced."""
    from utils.scoring_progress import output_paths, progress_path
    from utils.postprocess import stage_path

    def scores(name: str) -> list[pathlib.Path]:
        return [*output_paths(name), progress_path(name)]

    if not task.is_mbpp:
        return tuple(p.name for p in scores(CRUXEVAL_FILES[0]))
    stages = [stage_path(MBPP_FILES[0], n).name for n in (1, 2)]
    scored = [MBPP_FILES[0], *stages]
    mxeval = [f"{name}{suffix}" for name in scored for suffix in ("_results.jsonl", "_passatk.json")]
    return (*stages, *(p.name for name in scored for p in scores(name)), *mxeval)


def check_generated_for(path, task_name: str, fix: Callable[[str], str]) -> None:
    """Refuse a predictions file whose directory's ``generate_preds_config.json`` says it was generated for another
    task (above all the other CRUXEval mode, whose answers score 0 without any other sign). ``fix(recorded task)``:
    what to do instead. A directory without that file, or with one that is not ours, is not judged."""
    config = pathlib.Path(path).parent / CONFIG_FILE
    try:
        recorded = json.loads(config.read_text(encoding="utf-8")).get("task_name")
    except (OSError, ValueError, AttributeError):  # absent, unreadable or not a JSON object
        return
    if isinstance(recorded, str) and recorded != task_name:
        raise UserError(f"{path}: generated for {recorded} ({config}), not {task_name}; {fix(recorded)}")


def check_no_other_task_files(log_dir: pathlib.Path, task: Task) -> None:
    """Refuse a fresh run into a directory that holds another task family's predictions or scores (MBPP's beside
    CRUXEval's): they would look current beside the new run's config, and deleting them could lose hours of work."""
    from utils.registry import TASKS
    from utils.tasks import get_task

    own = {*output_files(task), *derived_files(task)}
    others = dict.fromkeys(name for other in map(get_task, TASKS) for name in (*output_files(other),
                                                                                *derived_files(other))
                           if name not in own and (log_dir / name).exists())
    if others:
        raise UserError(f"--log_dir {log_dir} holds another task's predictions or scores ({', '.join(list(others)[:3])}"
                        f"); choose another --log_dir (or move them)")


def check_fresh_start(log_dir: pathlib.Path, task: Task) -> None:
    """Refuse a fresh run into a directory that holds an earlier run's progress, predictions or scores of this
    task: rerunning the same command after a crash would delete them (``--overwrite`` says it is meant)."""
    names = (PROGRESS_FILE, *output_files(task), *derived_files(task))
    found = [name for name in names if (log_dir / name).is_file() and (log_dir / name).stat().st_size]
    if found:
        done = ProgressLog(log_dir).tasks_done() if PROGRESS_FILE in found else 0
        what = f"{done} finished tasks in {PROGRESS_FILE}" if done else ", ".join(found[:3])
        raise UserError(f"--log_dir {log_dir} holds an earlier run's work ({what}); pass --resume to continue it "
                        f"(same settings), --overwrite to delete it and start afresh, or another --log_dir")


def _jsonl(rows: Sequence[dict]) -> str:
    # ASCII (non-ASCII as \u escapes): mxeval and CRUXEval open files in the locale's encoding, not always UTF-8
    return "".join(json.dumps(r) + "\n" for r in rows)


# --------------------------------------------------------------------------------------------- progress
class ProgressLog:
    """``generation_progress.jsonl``: one line per finished batch, ``{"predictions": {task_id: [raw, ...]}}``.

    A whole batch is one line, written by one ``write`` and fsynced, so a process killed mid-write loses that
    batch only (the torn last line is ignored) and a resumed run regroups the remaining tasks into the same
    batches as an uninterrupted run.
    """

    def __init__(self, log_dir: str | os.PathLike):
        self.path = pathlib.Path(log_dir) / PROGRESS_FILE

    def read(self) -> dict[str, list[str]]:
        """Finished tasks; a torn last line (the process died mid-write) is ignored."""
        done: dict[str, list[str]] = {}
        if not self.path.is_file():
            return done
        # bytes: only "\n" ends a record (str.splitlines also splits at a U+2028 or U+0085 in a prediction)
        batches = parse_appended_lines(
            self.path, self.path.read_bytes().splitlines(),
            lambda record: {str(tid): [str(t) for t in raw] for tid, raw in record["predictions"].items()},
            "not a progress record; delete the file and rerun without --resume")
        for batch in batches:
            done.update(batch)
        return done

    def tasks_done(self) -> int:
        """How many tasks the file holds (0 when it cannot be read)."""
        try:
            return len(self.read())
        except (UserError, OSError):
            return 0

    def reset(self) -> None:
        self.path.unlink(missing_ok=True)

    def repair(self) -> None:
        """Drop a torn last line so that appends start on a fresh line."""
        if self.path.is_file():
            data = self.path.read_bytes()  # as in read()
            if data and not data.endswith(b"\n"):
                atomic_write_text(self.path, data[:data.rfind(b"\n") + 1].decode("utf-8"))

    def append(self, predictions: dict[str, list[str]]) -> None:
        if not predictions:
            return
        kept = "the batches before this one are kept (a cut-off line is dropped): free space, then rerun with --resume"
        with naming_full_disk(self.path, kept), self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"predictions": predictions}, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


DECODED_BY = "decoded_by"
"""``generate_preds_config.json``'s record of the decoding paths that made the predictions, in the order they ran
("the own decoding loop, fast decoding", "generate", ...): a resumed run adds its own when it differs. In bf16 the
paths can differ at near ties. Never compared by ``check_resumable``."""


def decoded_by(log_dir: str | os.PathLike, now: str) -> list[str]:
    """For a resumed run: the saved config's ``DECODED_BY`` list with ``now`` added when it differs from the last
    entry (a config from before the field starts the list with ``"unrecorded"``)."""
    saved = _saved_config(log_dir)
    saved = [] if saved is None else saved.get(DECODED_BY, ["unrecorded"])
    return saved if saved[-1:] == [now] else [*saved, now]


def _saved_config(log_dir: str | os.PathLike) -> dict | None:
    """The saved ``CONFIG_FILE`` of ``log_dir`` (None when there is none); one that is not a JSON object (empty, cut,
    edited by hand) is a UserError naming it and what to do."""
    path = pathlib.Path(log_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    return read_json_object(path, "saved generation config", fix=f"delete it to resume from {PROGRESS_FILE} without "
                            f"comparing the settings, or rerun with --overwrite instead of --resume to start over")


def check_something_to_resume(log_dir: str | os.PathLike | None) -> None:
    """``--resume`` needs the directory of the run it goes on with. Without ``--log_dir`` (or with a directory
    holding no such run: a typo) it used to start a new run and quietly generate everything again."""
    if not log_dir:
        raise UserError("--resume needs --log_dir: the directory of the run to go on with (the interrupted run "
                        "named it)")
    root = pathlib.Path(log_dir)
    if not (root / CONFIG_FILE).is_file() and not (root / PROGRESS_FILE).is_file():
        raise UserError(f"--resume: {log_dir} holds no earlier generation (no {CONFIG_FILE} or {PROGRESS_FILE}); "
                        f"check the path, or run without --resume to start one")


def check_resumable(log_dir: str | os.PathLike, config: dict, ignore: Sequence[str] = ()) -> None:
    """Refuse to resume into a directory whose saved settings differ (other than the ``ignore`` keys and
    ``DECODED_BY``)."""
    path = pathlib.Path(log_dir) / CONFIG_FILE
    saved = _saved_config(log_dir)
    if saved is None:
        return
    config = json.loads(json.dumps(config))  # tuples become lists, as in the saved file
    differ = []
    for key in sorted(set(saved) | set(config)):
        old, new = saved.get(key), config.get(key)
        if key in ignore or key == DECODED_BY or old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):  # the decoding settings: name the ones that differ
            differ += [(f"{key}.{k}", old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
                       if old.get(k) != new.get(k)]
        else:
            differ.append((key, old, new))
    if differ:
        fields = "; ".join(f"{key!r} is {old!r} but this run has {new!r}" + (
            f" (--peft_method {old} resumes it as it began)" if key == "peft_method" and {old, new} == {"none", "fft"}
            else "")  # a full fine-tuning's final/ as --model_path: none before it was read as fft
            for key, old, new in differ)
        raise UserError(f"{path}: {'field' if len(differ) == 1 else 'fields'} {fields}; rerun with the same "
                        f"settings, or with --overwrite instead of --resume (or another --log_dir) to start over")


def write_config(log_dir: str | os.PathLike, config: dict) -> None:
    atomic_write_text(pathlib.Path(log_dir) / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------ final files
def mbpp_problem(record: dict) -> dict:
    """A test record in the form mxeval's ``--problem_file`` reads."""
    problem = {k: record[k] for k in MXEVAL_PROBLEM_FIELDS if k != "language"}
    problem["language"] = record.get("language", "python")
    problem.update({k: record[k] for k in _MBPP_OPTIONAL_FIELDS if k in record})
    return {k: problem[k] for k in (*MXEVAL_PROBLEM_FIELDS, *_MBPP_OPTIONAL_FIELDS) if k in problem}


def write_predictions(log_dir: str | os.PathLike, task: Task, records: Sequence[dict],
                      raw: dict[str, list[str]], stop_sequences: Sequence[str]) -> list[pathlib.Path]:
    """Write the evaluator's files for ``records`` (in their order) from the raw completions."""
    from utils.postprocess import cut_at_stop, extract_cruxeval_answer

    log_dir = pathlib.Path(log_dir)
    ids = [task.record_id(r) for r in records]
    missing = [tid for tid in ids if tid not in raw]
    if missing:
        raise RuntimeError(f"no prediction for {len(missing)} tasks, e.g. {missing[0]}")
    if task.is_mbpp:
        contents = {
            "mbxp_solutions.jsonl": _jsonl([{"task_id": tid, "language": "python",
                                             "completion": cut_at_stop(text, stop_sequences)}
                                            for tid in ids for text in raw[tid]]),
            "mbxp_raw.jsonl": _jsonl([{"task_id": tid, "raw": text} for tid in ids for text in raw[tid]]),
            "mbpp_test_problems.jsonl": _jsonl([mbpp_problem(r) for r in records]),
        }
    else:
        # with its prompt, a bare completion is used whole (without, what follows an "[ANSWER]" in it would be)
        answers = {tid: [extract_cruxeval_answer(text, task.mode, cruxeval_prompt(r, task.mode)) for text in raw[tid]]
                   for tid, r in zip(ids, records)}
        contents = {
            "output.json": json.dumps(answers, indent=1) + "\n",
            "output_raw.json": json.dumps({tid: raw[tid] for tid in ids}, indent=1) + "\n",
        }
    paths = []
    resume = f"free space, then rerun with --resume (every task is in {PROGRESS_FILE}: none is generated again)"
    for name, text in contents.items():
        atomic_write_text(log_dir / name, text, resume)
        paths.append(log_dir / name)
    return paths


def validate_prediction_files(log_dir: str | os.PathLike, task: Task, task_ids: Sequence[str],
                              num_samples: int = 1) -> None:
    """Check the final files against the formats above: names, fields, types, one entry per task.

    Raises UserError naming the file, the line and the field.
    """
    log_dir = pathlib.Path(log_dir)
    expected = list(task_ids)
    if task.is_mbpp:
        fields = {"mbxp_solutions.jsonl": {"task_id": str, "language": str, "completion": str},
                  "mbxp_raw.jsonl": {"task_id": str, "raw": str},
                  "mbpp_test_problems.jsonl": {k: str for k in MXEVAL_PROBLEM_FIELDS}}
        for name, schema in fields.items():
            rows = _read_rows(log_dir / name, schema)
            got = [r["task_id"] for r in rows]
            want = expected if name == "mbpp_test_problems.jsonl" else [t for t in expected for _ in range(num_samples)]
            if got != want:
                raise UserError(f"{log_dir / name}: task ids {got[:5]}… do not match the test split {want[:5]}… "
                                f"(one line per task and sample, in task order)")
        return
    for name in CRUXEVAL_FILES:
        path = log_dir / name
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or list(data) != expected:
            raise UserError(f"{path}: keys must be exactly the test ids in order, got {list(data)[:5]}…")
        for key, values in data.items():
            if not (isinstance(values, list) and len(values) == num_samples and all(isinstance(v, str)
                                                                                     for v in values)):
                raise UserError(f"{path}: field {key!r} must be a list of {num_samples} strings")


def _read_rows(path: pathlib.Path, schema: dict) -> list[dict]:
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        row = json.loads(line)
        for field, kind in schema.items():
            if not isinstance(row.get(field), kind):
                raise UserError(f"{path}:{lineno}: field {field!r} must be a {kind.__name__}, got "
                                f"{type(row.get(field)).__name__}")
        rows.append(row)
    return rows
