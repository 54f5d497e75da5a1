"""Task records: read from a local JSONL (``--data_path``) or the public sources, then split.

Splits (spec §4): MBPP by task number — the paper's MBPP/1–487 train and MBPP/488–974 test, or the standard
split (train MBPP/601–974, test MBPP/11–510); CRUXEval by sample number — 0–399 train, 400–799 test.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import sys
import warnings

from utils.errors import UserError
from utils.fileio import atomic_write_text
from utils.tasks import get_task

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
_SHARED_FILES = {"mbpp": "mbpp/mbpp_release_v1.jsonl", "cruxeval": "cruxeval/cruxeval.jsonl"}

MBPP_SOURCE_URL = "https://raw.githubusercontent.com/amazon-science/mxeval/main/data/mbxp/mbpp_release_v1.jsonl"
MBPP_SOURCE_SHA256 = "2ea7949f20ed5ecaacf4c9970d29430ec3f13772f4dd379665b1234f14b0ec3e"  # the file the splits were checked on
CRUXEVAL_HUB_ID = "cruxeval-org/cruxeval"

MBPP_SPLITS = {
    "paper": {"train": (1, 487), "test": (488, 974)},
    "standard": {"train": (601, 974), "test": (11, 510)},
}
CRUXEVAL_SPLITS = {"train": (0, 399), "test": (400, 799)}


def _family(task_name: str) -> str:
    return "mbpp" if get_task(task_name).is_mbpp else "cruxeval"


def default_data_path(task_name: str) -> str | None:
    """The copy under ../shared/data beside the project, when it exists (tests and benchmarks use it)."""
    path = SHARED_DATA / _SHARED_FILES[_family(task_name)]
    return str(path) if path.exists() else None


def check_is_file(path: pathlib.Path) -> None:
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a file; pass the file's path")
    if not path.is_file():
        raise UserError(f"{path}: no such file")


def read_text_file(path: pathlib.Path, fix: str = "save it as UTF-8") -> str:
    """A whole UTF-8 file's text; a missing file or undecodable bytes are one line naming it and ``fix``."""
    check_is_file(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                        f"{fix}") from None


def read_json_object(path: str | os.PathLike, what: str, fix: str = "") -> dict:
    """A JSON file holding an object; a missing file, undecodable bytes, invalid JSON or another value is one line
    naming ``what`` and the file, and ``fix`` (what to do) after a semicolon."""
    path = pathlib.Path(path)
    then = f"; {fix}" if fix else ""
    if not path.is_file():
        raise UserError(f"{what} {path}: no such file{then}")
    try:
        value = json.loads(read_text_file(path, fix=fix or f"{what} takes a JSON file"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{what} {path}: not valid JSON ({exc.msg} at line {exc.lineno}){then}") from None
    if not isinstance(value, dict):
        raise UserError(f"{what} {path}: expected a JSON object{then}")
    return value


def read_jsonl(path: str | os.PathLike, required_fields=(), hint: str = "") -> list[dict]:
    """Read a JSONL file; a bad line or a missing field fails with ``file:line`` and the field's name, plus
    ``hint`` (what the file should be) after a semicolon. Required fields must be strings (every task's are)."""
    path = pathlib.Path(path)
    hint = f"; {hint}" if hint else ""
    check_is_file(path)
    records = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                                f"{exc.start + 1}); save it as UTF-8{hint}") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                msg = exc.msg.removesuffix(" at")  # json's position goes after "at": ours is the column below
                raise UserError(f"{path}:{lineno}: not valid JSON ({msg}, column {exc.colno}){hint}") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}{hint}")
            missing = [f for f in required_fields if f not in record]
            if missing:
                raise UserError(f"{path}:{lineno}: record is missing field {missing[0]!r}"
                                f"{_other_tasks_file(record, required_fields)}{hint}")
            mistyped = [f for f in required_fields if not isinstance(record[f], str)]
            if mistyped:  # a list 'test' or null 'prompt' was a TypeError deep in generation or the evaluator
                raise UserError(f"{path}:{lineno}: field {mistyped[0]!r} must be a string, got "
                                f"{type(record[mistyped[0]]).__name__}{hint}")
            records.append(record)
    return records


def _other_tasks_file(record: dict, required_fields) -> str:
    """``"; it looks like ..."`` when ``record`` is the other task's (the usual cause of a missing field), else ""."""
    if "task_id" in record and "task_id" not in required_fields:
        what = "MBPP predictions" if "completion" in record and "prompt" not in record else "MBPP data"
        return f"; it looks like {what} (its records have MBPP's field 'task_id')"
    if "id" in record and "code" in record and "id" not in required_fields:
        return "; it looks like CRUXEval data (its records have CRUXEval's fields 'id' and 'code')"
    return ""


def _mbpp_public_file() -> pathlib.Path:
    """MBPP's MBXP file, downloaded once into the datasets cache. Not through ``datasets``: its https path needs
    aiohttp, which neither it nor requirements.txt installs (it failed with an ImportError, network or not)."""
    import http.client
    import urllib.request

    from datasets import config

    path = pathlib.Path(config.HF_DATASETS_CACHE) / "lopa-peft" / MBPP_SOURCE_URL.rsplit("/", 1)[1]
    if path.is_file():
        return path
    if config.HF_DATASETS_OFFLINE:
        raise UserError(f"the public mbpp data is not in the cache ({path}) and HF_DATASETS_OFFLINE is set; "
                        f"pass --data_path with a local copy of {MBPP_SOURCE_URL}")
    try:
        with urllib.request.urlopen(MBPP_SOURCE_URL, timeout=60) as response:
            body = response.read()
        text = body.decode("utf-8")
    except (OSError, http.client.HTTPException, UnicodeDecodeError) as exc:  # a cut download too
        raise UserError(f"could not download {MBPP_SOURCE_URL} ({type(exc).__name__}: {exc}); "
                        f"pass --data_path with a local JSONL copy") from exc
    digest = hashlib.sha256(body).hexdigest()
    if digest != MBPP_SOURCE_SHA256:  # upstream changed the file: the splits still go by task id, the records may not
        warnings.warn(f"{MBPP_SOURCE_URL} is not the file the paper's splits were checked on (sha256 {digest}, "
                      f"expected {MBPP_SOURCE_SHA256}); results may not be comparable", stacklevel=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    return path


def _load_public(task_name: str) -> list[dict]:
    """Download (and cache) the public source; used when no --data_path is given."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is in requirements.txt
        raise UserError("the `datasets` package is needed to fetch the public data; pass --data_path") from exc
    if _family(task_name) == "mbpp":
        return read_jsonl(_mbpp_public_file(), hint=dataset_hint(task_name))
    try:
        ds = datasets.load_dataset(CRUXEVAL_HUB_ID, split="test")
    except Exception as exc:  # datasets raises many types for network / offline failures
        raise UserError(f"could not load the public {task_name} data ({type(exc).__name__}: {exc}); "
                        f"pass --data_path with a local JSONL copy") from exc
    return [dict(r) for r in ds]


def load_records(task_name: str, data_path: str | None = None) -> list[dict]:
    task = get_task(task_name)
    if data_path is None:
        records = _load_public(task_name)
        missing = [f for f in task.required_fields if records and f not in records[0]]
        if missing:
            raise UserError(f"public {task_name} data lacks field {missing[0]!r}")
        return records
    return read_jsonl(data_path, task.required_fields, dataset_hint(task_name))


def dataset_hint(task_name: str) -> str:
    """What a --data_path for this task must hold (appended to errors about a wrong file)."""
    task = get_task(task_name)
    family = "the MBXP-format MBPP JSONL (mbpp_release_v1.jsonl)" if task.is_mbpp else "the CRUXEval JSONL"
    return (f"the task {task_name} needs {family}, one record per line with fields "
            f"{', '.join(task.required_fields)}; pass that file as --data_path")


def _number(task_name: str, record: dict, data_path) -> int:
    rid = get_task(task_name).record_id(record)
    match = re.fullmatch(r"(?:MBPP/|sample_)(\d+)", str(rid))
    if not match:
        raise UserError(f"{data_path or task_name}: id {rid!r} is not of the form "
                        f"{'MBPP/<n>' if _family(task_name) == 'mbpp' else 'sample_<n>'}")
    return int(match.group(1))


def split_records(task_name: str, records: list[dict], split: str, *, mbpp_split: str = "paper",
                  data_path: str | None = None) -> list[dict]:
    if split not in ("train", "test"):
        raise UserError(f"unknown split {split!r}; choose train or test")
    if _family(task_name) == "mbpp":
        if mbpp_split not in MBPP_SPLITS:
            raise UserError(f"unknown MBPP split {mbpp_split!r}; choose one of: {', '.join(MBPP_SPLITS)}")
        lo, hi = MBPP_SPLITS[mbpp_split][split]
    else:
        lo, hi = CRUXEVAL_SPLITS[split]
    numbers = [_number(task_name, r, data_path) for r in records]
    if len(set(numbers)) < len(numbers):  # generation keys predictions by id: a second copy cannot be told apart
        twice = next(get_task(task_name).record_id(r) for i, r in enumerate(records) if numbers[i] in numbers[:i])
        raise UserError(f"{data_path or task_name}: id {twice!r} appears more than once; keep one record per id")
    chosen = [r for r, number in zip(records, numbers) if lo <= number <= hi]
    if not chosen:
        raise UserError(f"{data_path or task_name}: the {split} split is empty (ids {lo}-{hi}); "
                        f"check --data_path and --task_name")
    if len(chosen) < hi - lo + 1 and (data_path, split, lo) not in _WARNED_PARTIAL:
        _WARNED_PARTIAL.add((data_path, split, lo))  # once per file and split: several stages read it
        print(f"warning: {data_path or task_name}: the {split} split has {len(chosen)} of its {hi - lo + 1} ids "
              f"({lo}-{hi}); a partial file trains on, or scores, only those", file=sys.stderr)
    return chosen


_WARNED_PARTIAL: set = set()


def records_digest(records: list[dict]) -> str:
    """A content hash of a split's records (what a training trained on: a resumed run must read the same)."""
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()


def load_task_split(task_name: str, split: str, data_path: str | None = None, mbpp_split: str = "paper",
                    limit: int | None = None) -> list[dict]:
    """Records of one split, in id order; ``limit`` keeps the first n (smoke runs)."""
    records = split_records(task_name, load_records(task_name, data_path), split, mbpp_split=mbpp_split,
                            data_path=data_path)
    records.sort(key=lambda r: _number(task_name, r, data_path))
    return records[:limit] if limit else records
