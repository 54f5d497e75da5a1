"""Scoring: pass@k against the closed form, harness semantics on the real test splits, result files, the CLI."""
import json
import math
import pathlib
from types import SimpleNamespace

import pytest

import evaluate_preds
from tests.conftest import require_real_data
from utils.data import load_task_split, read_jsonl
from utils.errors import UserError
from utils.evaluation import evaluate_file
from utils.scoring import SampleResult, cruxeval_program, mbpp_program, pass_at_k, summarize
from utils.sandbox import SandboxConfig

# MBPP test-split canonical solutions that fail under any harness (plain exec too): dataset defects.
KNOWN_BAD_MBPP = {
    "MBPP/596": "AssertionError",  # expects sys.getsizeof values of an older CPython
    "MBPP/601": "NameError: name 'Pair' is not defined",  # Pair is defined inside the solution, used by the test
    "MBPP/607": "AssertionError",  # the solution hard-codes the pattern 'fox'
    "MBPP/631": "AssertionError",  # the solution hard-codes the text 'Python Exercises'
    "MBPP/642": "AssertionError",  # expects one iteration order of a set of tuples
    "MBPP/899": "TypeError",  # entry point `check` is shadowed by the test's check()
    "MBPP/927": "NameError: name 'root' is not defined",  # the test uses trees it never builds
    "MBPP/966": "IndentationError",  # 3-space code under a 1-space prompt (stage 2 re-indents it)
    "MBPP/967": "TypeError",  # entry point `check` is shadowed by the test's check()
}
FAST = dict(n_workers=4, progress=False)


@pytest.mark.parametrize("c, k, expected", [
    (0, 1, 0.0), (0, 5, 0.0), (0, 10, 0.0),
    (3, 1, 0.3), (3, 5, 1 - 21 / 252), (3, 10, 1.0),
    (10, 1, 1.0), (10, 5, 1.0), (10, 10, 1.0),
])
def test_pass_at_k_matches_the_closed_form(c, k, expected):
    n = 10
    closed = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12)
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_rejects_impossible_counts():
    for n, c, k in ((10, 11, 1), (10, -1, 1), (10, 3, 0)):
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_summary_averages_tasks_and_reports_only_reachable_k():
    results = [SampleResult(task, i, "passed" if i < c else ("timed out" if i == 9 else "failed"), "", 0.0, "")
               for task, c in (("a", 0), ("b", 3), ("c", 10)) for i in range(10)]
    s = summarize(results, ks=(1, 5, 10, 20))
    assert s["pass@1"] == pytest.approx((0 + 0.3 + 1) / 3)
    assert s["pass@5"] == pytest.approx((0 + 1 - 21 / 252 + 1) / 3)
    assert s["pass@10"] == pytest.approx(2 / 3)
    assert "pass@20" not in s
    assert s["counts"] == {"passed": 13, "failed": 15, "timed out": 2, "sandbox_errors": 0}
    assert (s["n_tasks"], s["n_samples"], s["samples_per_task"]) == (3, 30, {"min": 10, "max": 10})


def test_programs_follow_the_harnesses():
    problem = {"prompt": "def f(a):\n", "test": "def check(candidate):\n    assert candidate(1) == 2\n",
               "entry_point": "f"}
    assert mbpp_program(problem, "    return a + 1") == (
        "def f(a):\n    return a + 1\ndef check(candidate):\n    assert candidate(1) == 2\n\ncheck(f)")
    record = {"code": "def f(x):\n    return x", "input": "'a'", "output": "'a'"}
    assert cruxeval_program(record, "'a'", "output") == ("def f(x):\n    return x\nassert 'a' == 'a'", "")
    assert cruxeval_program(record, "f('a')", "input")[0].endswith("\nassert 'a' == f('a')")
    assert cruxeval_program(record, "'a'", "input")[0] is None  # input mode needs a call f(...)
    assert cruxeval_program(record, "f('a')", "output")[0] is None  # output mode may not call f on the input
    assert cruxeval_program(record, "f('b')", "output")[0] is not None



LEGIT_MBPP = {  # correct solutions in the forms models write; mxeval passes every one of them
    "prints": "    print('computing', a)\n    return a + 1",
    "helpers_at_top_level": "    return _Box(a).inc()\nimport math\nclass _Box:\n    def __init__(self, v):\n"
                            "        self.v = v\n    def inc(self):\n        return _helper(self.v)\n"
                            "def _helper(v):\n    return int(math.floor(v)) + 1",
    "deep_recursion": "    import sys\n    sys.setrecursionlimit(20000)\n    def down(n):\n"
                      "        return 0 if n == 0 else 1 + down(n - 1)\n    return a + 1 + down(5000) - 5000",
    "numpy": "    import numpy as np\n    return int(np.add(a, 1))",
    "slow_but_in_time": "    import time\n    time.sleep(0.8)\n    return a + 1",  # 1.6 s of a 2.5 s limit
}


def test_legitimate_mbpp_solutions_pass(tmp_path):
    pytest.importorskip("numpy")
    problems = [{"task_id": f"T/{name}", "prompt": "def inc(a):\n", "entry_point": "inc",
                 "test": "def check(candidate):\n    assert candidate(1) == 2\n    assert candidate(41) == 42\n"}
                for name in LEGIT_MBPP]
    problem_file = _write_jsonl(tmp_path / "problems.jsonl", problems)
    path = _write_jsonl(tmp_path / "sols.jsonl", [{"task_id": f"T/{name}", "completion": completion}
                                                  for name, completion in LEGIT_MBPP.items()])
    summary = evaluate_file("mbpp", path, problem_file=problem_file, timeout=2.5, **FAST)
    results = read_jsonl(summary["results_path"])
    assert {r["task_id"]: r["reason"] for r in results if not r["passed"]} == {}
    assert summary["pass@1"] == 1.0

def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_mbpp_canonical_solutions_score_all_but_the_known_dataset_defects(tmp_path, data_paths):
    """487 canonical solutions (sample 0) and 487 wrong ones (sample 1): n=2 per task."""
    require_real_data(data_paths)
    problems = load_task_split("mbpp", "test", data_paths["mbpp"])
    _write_jsonl(tmp_path / "mbpp_test_problems.jsonl", problems)
    rows = [{"task_id": p["task_id"], "language": "python", "completion": c}
            for p in problems for c in (p["canonical_solution"], "    return None")]
    path = _write_jsonl(tmp_path / "mbxp_solutions.jsonl", rows)
    summary = evaluate_file("mbpp", path, k=(1, 2), **FAST)
    results = read_jsonl(tmp_path / "mbxp_solutions_results.jsonl")
    assert len(results) == 974 and summary["n_tasks"] == 487 and summary["samples_per_task"]["min"] == 2
    right = {r["task_id"]: r for r in results if r["sample_index"] == 0}
    wrong = [r for r in results if r["sample_index"] == 1]
    failed = {t: r["reason"] for t, r in right.items() if not r["passed"]}
    assert set(failed) == set(KNOWN_BAD_MBPP)
    assert all(failed[t].startswith(KNOWN_BAD_MBPP[t]) for t in failed), failed
    assert sum(r["passed"] for r in wrong) == 0
    assert summary["pass@1"] == pytest.approx(478 / 974)
    assert summary["pass@2"] == pytest.approx(478 / 487)
    assert summary["counts"] == {"passed": 478, "failed": 496, "timed out": 0, "sandbox_errors": 0}
    assert summary["timeout_s"] == 15.0 and summary["n_workers"] == 4
    on_disk = json.loads((tmp_path / "mbxp_solutions_summary.json").read_text())
    assert on_disk["pass@1"] == summary["pass@1"] and on_disk["sandbox"]["mode"] == summary["sandbox"]["mode"]


@pytest.mark.parametrize("mode", ["input", "output"])
def test_cruxeval_ground_truth_scores_100_and_wrong_answers_0(tmp_path, data_paths, mode):
    require_real_data(data_paths)
    records = load_task_split(f"cruxeval_{mode}_prediction", "test", data_paths["cruxeval"])
    right = {r["id"]: f"f({r['input']})" if mode == "input" else r["output"] for r in records}
    # Wrong: no argument at all (input mode), a literal no output equals (output mode).
    wrong = {r["id"]: "f()" if mode == "input" else repr(f"wrong answer to {r['id']}") for r in records}
    path = tmp_path / "output.json"
    path.write_text(json.dumps({rid: [right[rid], wrong[rid]] for rid in right}))
    summary = evaluate_file(f"cruxeval_{mode}_prediction", path, data_path=data_paths["cruxeval"], **FAST)
    results = read_jsonl(tmp_path / "output_results.jsonl")
    assert sum(r["passed"] for r in results if r["sample_index"] == 0) == 400
    assert sum(r["passed"] for r in results if r["sample_index"] == 1) == 0
    assert summary["pass@1"] == pytest.approx(0.5) and summary["timeout_s"] == 10.0
    assert "pass@5" not in summary  # n = 2 < 5


def test_a_partial_or_mixed_cruxeval_file_is_refused_unless_asked_for(tmp_path, data_paths):
    """A 10-id file scored "100% of 10 tasks" with tasks_without_samples 0, and a train id beside the test ids was
    scored with them; MBPP refused the same without --allow_missing."""
    test = load_task_split("cruxeval_output_prediction", "test", data_paths["cruxeval"])
    train = load_task_split("cruxeval_output_prediction", "train", data_paths["cruxeval"])
    path = tmp_path / "output.json"

    def score(predictions, **kwargs):
        path.write_text(json.dumps({r["id"]: [r["output"]] for r in predictions}))
        return evaluate_file("cruxeval_output_prediction", path, data_path=data_paths["cruxeval"], **FAST, **kwargs)

    with pytest.raises(UserError, match=rf"no predictions for {len(test) - 2} of the test split's {len(test)} ids "
                                        rf"\(first: {test[2]['id']}\); pass --allow_missing"):
        score(test[:2])
    summary = score(test[:2], allow_missing=True)
    assert (summary["pass@1"], summary["tasks_without_samples"]) == (1.0, len(test) - 2)
    with pytest.raises(UserError, match=rf"1 ids from outside the test split \(first: '{train[0]['id']}'\) beside 2 "
                                        rf"test ids; score one split at a time"):
        score(test[:2] + train[:1], allow_missing=True)
    assert score(train[:3])["tasks_without_samples"] == 0  # the train split, scored on purpose
    (tmp_path / "generate_preds_config.json").write_text(json.dumps({"task_name": "cruxeval_output_prediction",
                                                                     "limit": 2}))
    assert score(test[:2])["tasks_without_samples"] == len(test) - 2  # a --limit generation's file
    with pytest.raises(UserError, match="pass --allow_missing"):  # but not one cut short of its limit
        score(test[:1])


def test_malformed_cruxeval_predictions_count_as_failures(tmp_path, data_paths):
    records = load_task_split("cruxeval_input_prediction", "test", data_paths["cruxeval"])[:2]
    r0, r1 = records
    path = tmp_path / "output.json"
    path.write_text(json.dumps({r0["id"]: [r0["input"], f"f({r0['input']})"], r1["id"]: ""}))
    summary = evaluate_file("cruxeval_input_prediction", path, data_path=data_paths["cruxeval"], k=(1, 2),
                            allow_missing=True, **FAST)
    results = read_jsonl(tmp_path / "output_results.jsonl")
    assert [(r["task_id"], r["status"]) for r in results] == [(r0["id"], "failed"), (r0["id"], "passed"),
                                                              (r1["id"], "failed")]
    assert results[0]["reason"].startswith("malformed input prediction")
    # n stays the number of generations: task 0 has n=2, c=1; task 1 n=1, c=0.
    assert summary["pass@1"] == pytest.approx((0.5 + 0.0) / 2)
    assert "pass@2" not in summary


def test_evaluate_cli_prints_pass_at_1_and_writes_files(tmp_path, data_paths, capsys):
    problems = load_task_split("mbpp", "test", data_paths["mbpp"])[:3]
    problem_file = _write_jsonl(tmp_path / "problems.jsonl", problems)
    rows = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in problems]
    rows[1]["completion"] = "    return 'wrong'"
    path = _write_jsonl(tmp_path / "preds.jsonl", rows)
    summary = evaluate_preds.main(["--task_name", "mbpp", "--path", path, "--problem_file", problem_file,
                                   "--n_workers", "2", "--timeout", "5", "--no_progress"])
    out = capsys.readouterr().out
    assert f"pass@1 = {100 * 2 / 3:.2f}%" in out and "sandbox mode:" in out
    assert "pass@5, pass@10: not reported (needs at least k samples per task; the fewest here: 1)" in out
    assert summary["pass@1"] == pytest.approx(2 / 3) and summary["timeout_s"] == 5.0
    assert len(read_jsonl(tmp_path / "preds_results.jsonl")) == 3
    assert (tmp_path / "preds_summary.json").is_file()


def test_evaluate_rejects_bad_input_with_a_one_line_error(tmp_path, data_paths, capsys):
    problems = load_task_split("mbpp", "test", data_paths["mbpp"])[:2]
    problem_file = _write_jsonl(tmp_path / "problems.jsonl", problems)
    path = _write_jsonl(tmp_path / "preds.jsonl", [{"task_id": problems[0]["task_id"], "completion": "    pass"}])
    with pytest.raises(UserError, match="no samples for 1 of 2 problems"):
        evaluate_file("mbpp", path, problem_file=problem_file, progress=False)
    assert evaluate_file("mbpp", path, problem_file=problem_file, allow_missing=True,
                         progress=False)["tasks_without_samples"] == 1
    (tmp_path / "generate_preds_config.json").write_text(json.dumps({"task_name": "mbpp", "limit": 1}))
    assert evaluate_file("mbpp", path, problem_file=problem_file, progress=False)["tasks_without_samples"] == 1
    (tmp_path / "generate_preds_config.json").unlink()  # a --limit generation's file needs no flag
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"task_id": "MBPP/99999", "completion": ""}])
    with pytest.raises(UserError, match="not in the problem set"):
        evaluate_file("mbpp", bad, problem_file=problem_file, progress=False)
    crux = tmp_path / "output.json"
    crux.write_text(json.dumps({"sample_400": [1, 2]}))
    with pytest.raises(UserError, match="must be a list of strings"):
        evaluate_file("cruxeval_output_prediction", crux, data_path=data_paths["cruxeval"], progress=False)
    crux.write_text(json.dumps({"sample_400": [], "sample_401": ["1"]}))  # scoring dropped the id, raising the score
    with pytest.raises(UserError, match="'sample_400' has no predictions .an empty list."):
        evaluate_file("cruxeval_output_prediction", crux, data_path=data_paths["cruxeval"], progress=False)
    with pytest.raises(UserError, match="output.json:1: record is missing field .task_id.; MBPP predictions are JSONL"):
        evaluate_file("mbpp", crux, problem_file=problem_file, progress=False)  # one task's file, another's name
    with pytest.raises(UserError, match="preds.jsonl: 2 ids are not in the CRUXEval data .*'sample_412'"):
        evaluate_file("cruxeval_output_prediction", path, data_path=data_paths["cruxeval"], progress=False)
    two = _write_jsonl(tmp_path / "two.jsonl", [{"task_id": p["task_id"], "completion": ""} for p in problems])
    with pytest.raises(UserError, match="two.jsonl: not valid JSON .*CRUXEval predictions are one JSON object"):
        evaluate_file("cruxeval_output_prediction", two, data_path=data_paths["cruxeval"], progress=False)
    for argv in (["--k", "1,x"], ["--n_workers", "0"], ["--timeout", "-1"], ["--timeout", "nan"], ["--timeout", "inf"]):
        with pytest.raises(SystemExit) as exc:
            evaluate_preds.main(["--task_name", "mbpp", "--path", path] + argv)
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 5 and err.count("--timeout must be a positive finite number") == 3


def test_the_other_tasks_data_file_is_named_as_such_with_the_file_to_pass(tmp_path, data_paths, capsys):
    """The CRUXEval tools given the MBPP file (as --data_path or --problem_file) said only "record is missing field
    'id'"; the MBPP tools given the CRUXEval file as --problem_file, only "... missing field 'task_id'"."""
    crux = tmp_path / "output.json"
    crux.write_text(json.dumps({"sample_400": ["1"]}))
    mbpp = _write_jsonl(tmp_path / "mbxp_solutions.jsonl", [{"task_id": "MBPP/488", "completion": "    pass"}])
    score_crux = ["evaluate_preds.py", "--task_name", "cruxeval_output_prediction", "--path", str(crux)]
    for argv, flag in ((score_crux, "--data_path"), (score_crux, "--problem_file"),
                       (["postprocess_cruxeval_preds.py", "--path", str(crux), "--mode", "output"], "--data_path")):
        err = _cli_error(argv + [flag, data_paths["mbpp"]], capsys)
        assert err == (f"error: {data_paths['mbpp']}:1: record is missing field 'id'; it looks like MBPP data (its "
                       f"records have MBPP's field 'task_id'); the task cruxeval_output_prediction needs the "
                       f"CRUXEval JSONL, one record per line with fields id, code, input, output; pass that file as "
                       f"--data_path\n")
    for script in ("evaluate_preds.py", "postprocess_mbpp_preds.py"):
        task = ["--task_name", "mbpp"] if script == "evaluate_preds.py" else []
        err = _cli_error([script, *task, "--path", mbpp, "--problem_file", data_paths["cruxeval"]], capsys)
        assert err == (f"error: {data_paths['cruxeval']}:1: record is missing field 'task_id'; it looks like CRUXEval "
                       f"data (its records have CRUXEval's fields 'id' and 'code'); MBPP problems are JSONL with "
                       f"fields task_id, prompt, entry_point, test (generate_preds.py writes mbpp_test_problems.jsonl "
                       f"beside the predictions): pass that as --problem_file, or the MBXP-format MBPP JSONL "
                       f"(mbpp_release_v1.jsonl) as --data_path\n")


def _cli_error(argv, capsys) -> str:
    """A script's stderr for ``[script, *args]``, which must exit with status 2."""
    import importlib

    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(argv[0].removesuffix(".py")).main(argv[1:])
    assert exit_.value.code == 2
    return capsys.readouterr().err


def test_an_unwritable_output_directory_fails_before_any_sample_runs(tmp_path, data_paths, monkeypatch):
    from utils import evaluation, fileio
    from utils.postprocess import postprocess_mbpp_file

    problems = load_task_split("mbpp", "test", data_paths["mbpp"])[:1]
    problem_file = _write_jsonl(tmp_path / "problems.jsonl", problems)
    path = _write_jsonl(tmp_path / "preds.jsonl", [{"task_id": problems[0]["task_id"], "completion": "    pass"}])
    monkeypatch.setattr(fileio.os, "access", lambda *a: False)  # a read-only mount: root's chmod cannot show it
    monkeypatch.setattr(evaluation, "run_samples", lambda *a, **k: pytest.fail("samples ran"))
    with pytest.raises(UserError, match=r"--path .*: cannot write in .* \(read-only or no permission\)"):
        evaluate_file("mbpp", path, problem_file=problem_file, progress=False)
    with pytest.raises(UserError, match="cannot write in"):
        postprocess_mbpp_file(path, problem_file)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.jsonl", "problems.jsonl"]


def test_ctrl_c_drops_the_queued_samples_instead_of_running_them_all():
    import os
    import signal
    import time

    from utils.scoring import Sample, run_samples

    class Interrupted:  # Ctrl-C arrives once every sample is queued and two have finished
        calls = 0

        def run(self, program):
            Interrupted.calls += 1
            if Interrupted.calls == 3:
                os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            return SimpleNamespace(status="passed", reason="", seconds=0.05)

        def cancel(self):
            pass

    # Python's own handler even where the suite was started in the background (SIGINT ignored there)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    kept = []
    try:
        with pytest.raises(KeyboardInterrupt):
            run_samples([Sample(f"t{i}", 0, "print(1)") for i in range(40)], Interrupted(), n_workers=2,
                        progress=False, on_result=lambda i, result: kept.append(i))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert Interrupted.calls <= 4  # the running ones finish; without the fix all 40 ran before Ctrl-C took effect
    assert sorted(kept) == list(range(Interrupted.calls))  # each that ran is kept; the dropped ones are not asked


def test_sandbox_config_rejects_nonsense():
    for kwargs in ({"mode": "docker"}, {"start": "spawn"}, {"timeout": 0}):
        with pytest.raises(ValueError):
            SandboxConfig(**kwargs)


def test_bench_evaluate_smoke_writes_the_shared_schema(tmp_path, data_paths):
    from benchmarks import bench_evaluate
    out = tmp_path / "results.jsonl"
    bench_evaluate.main(["--smoke", "--results", str(out), "--methods", "sandbox:forkserver,classic:manager",
                         "--mbpp_data", data_paths["mbpp"], "--cruxeval_data", data_paths["cruxeval"]])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 6  # 3 tasks x 2 methods
    keys = {"bench", "model", "method", "task", "batch_size", "device", "versions", "date", "run_id",
            "samples_per_s", "seconds", "n_samples"}
    for line in lines:
        assert keys <= set(line) and line["bench"] == "evaluate" and line["model"] is None
        assert line["method"] in ("sandbox", "classic") and line["versions"]["python"]
        assert line["passed"] == line["n_samples"] > 0 and line["samples_per_s"] > 0
    assert {line["task"] for line in lines} == {"mbpp", "cruxeval_input_prediction", "cruxeval_output_prediction"}


def test_non_utf8_predictions_and_a_mistyped_problem_field_are_one_line(tmp_path):
    """Both were tracebacks: a UnicodeDecodeError reading the JSON, a TypeError building the program."""
    preds = tmp_path / "output.json"
    preds.write_bytes(b'{"sample_450": ["\xff"]}')
    with pytest.raises(UserError, match=r"output\.json: not UTF-8 text \(byte 0xff at offset 17\); save it as UTF-8"):
        evaluate_file("cruxeval_output_prediction", preds, sandbox_config=SandboxConfig(mode="none"))
    problems = tmp_path / "problems.jsonl"
    problems.write_text(json.dumps({"task_id": "MBPP/1", "prompt": None, "entry_point": "f", "test": ""}) + "\n")
    solutions = tmp_path / "sol.jsonl"
    solutions.write_text(json.dumps({"task_id": "MBPP/1", "completion": "  return 1\n"}) + "\n")
    with pytest.raises(UserError, match=r"problems\.jsonl:1: field 'prompt' must be a string, got NoneType"):
        evaluate_file("mbpp", solutions, problem_file=problems, sandbox_config=SandboxConfig(mode="none"))


def test_the_default_data_files_directory_is_hidden_from_the_programs(tmp_path, data_paths):
    """Without --data_path the CRUXEval rows come from ../shared/data, and a program could read each answer
    there (eval of the matching row's output passed every sample)."""
    from utils.data import default_data_path

    default = default_data_path("cruxeval_output_prediction")
    if default is None:
        pytest.skip("no ../shared/data: the data would come from the hub cache, under the (hidden) home")
    records = load_task_split("cruxeval_output_prediction", "test", default)[:2]
    path = tmp_path / "output.json"
    path.write_text(json.dumps({r["id"]: [r["output"]] for r in records}))
    summary = evaluate_file("cruxeval_output_prediction", path, allow_missing=True, **FAST)
    if summary["sandbox"]["mount_namespace"]:
        assert str(pathlib.Path(default).resolve().parent) in summary["sandbox"]["hidden_dirs"]


def test_an_output_prediction_that_calls_f_on_the_input_anywhere_is_rejected():
    """As the official CRUXEval script: ``f(<input>)`` anywhere in the prediction (not only as all of it) would let
    the program compute its own answer."""
    record = {"code": "def f(x):\n    return x", "input": "'a'", "output": "'a'"}
    for cheat in ("f('a') + ''", "(f('a'))", "[f('a')][0]"):
        program, reason = cruxeval_program(record, cheat, "output")
        assert program is None and reason.startswith("malformed output prediction"), cheat


def test_summary_counts_sandbox_errors_and_the_largest_n():
    results = [SampleResult("a", 0, "passed", "", 0.0, ""),
               SampleResult("b", 0, "failed", "sandbox error: OSError: no fork", 0.0, ""),
               SampleResult("b", 1, "failed", "AssertionError", 0.0, "")]
    s = summarize(results, ks=(1, 2))
    assert s["counts"] == {"passed": 1, "failed": 2, "timed out": 0, "sandbox_errors": 1}
    assert s["samples_per_task"] == {"min": 1, "max": 2} and "pass@2" not in s
    assert s["pass@1"] == pytest.approx((1.0 + 0.0) / 2)


def test_a_sandbox_failure_is_a_failed_sample_counted_as_a_sandbox_error(tmp_path, monkeypatch):
    """One sample whose sandbox broke (not its program) fails, the others are scored, and the summary counts it."""
    from utils import sandbox as sandbox_module

    problems = [{"task_id": f"T/{i}", "prompt": "def inc(a):\n", "entry_point": "inc",
                 "test": "def check(candidate):\n    assert candidate(1) == 2\n"} for i in range(2)]
    problem_file = _write_jsonl(tmp_path / "problems.jsonl", problems)
    path = _write_jsonl(tmp_path / "sols.jsonl", [{"task_id": p["task_id"], "completion": f"    return a + 1  # {i}"}
                                                  for i, p in enumerate(problems)])
    real = sandbox_module.interpret

    def broken_for_sample_1(paths, *args):
        with open(paths["program"]) as fh:
            if "return a + 1  # 1" in fh.read():
                raise OSError("status file vanished")
        return real(paths, *args)

    monkeypatch.setattr(sandbox_module, "interpret", broken_for_sample_1)
    summary = evaluate_file("mbpp", path, problem_file=problem_file, timeout=5, n_workers=1, progress=False)
    results = {r["task_id"]: r for r in read_jsonl(summary["results_path"])}
    assert results["T/0"]["status"] == "passed"
    assert results["T/1"]["status"] == "failed"
    assert results["T/1"]["reason"] == "sandbox error: OSError: status file vanished"
    assert summary["counts"]["sandbox_errors"] == 1 and summary["pass@1"] == 0.5


def test_a_timed_out_sample_scores_as_a_failure(tmp_path):
    problems = [{"task_id": f"T/{i}", "prompt": "def inc(a):\n", "entry_point": "inc",
                 "test": "def check(candidate):\n    assert candidate(1) == 2\n"} for i in range(2)]
    problem_file = _write_jsonl(tmp_path / "problems.jsonl", problems)
    path = _write_jsonl(tmp_path / "sols.jsonl", [{"task_id": "T/0", "completion": "    return a + 1"},
                                                  {"task_id": "T/1", "completion": "    while True:\n        pass"}])
    summary = evaluate_file("mbpp", path, problem_file=problem_file, timeout=3.0, n_workers=2, progress=False)
    rows = {r["task_id"]: r for r in read_jsonl(summary["results_path"])}
    assert (rows["T/1"]["status"], rows["T/1"]["passed"]) == ("timed out", False)
    assert summary["pass@1"] == 0.5 and summary["counts"]["timed out"] == 1 and summary["counts"]["passed"] == 1


def test_an_empty_mbpp_file_is_refused_even_with_allow_missing(tmp_path):
    """docs/EVALUATION.md: evaluate_preds.py refuses a file without predictions, as CRUXEval's `{}` is; an empty
    MBPP JSONL with --allow_missing (which the missing-tasks error suggests) scored 0 samples of 0 tasks."""
    empty = tmp_path / "mbxp_solutions_stage1.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="no predictions"):
        evaluate_file("mbpp", empty, allow_missing=True, progress=False)


# -- resuming an interrupted scoring ------------------------------------------------------------------------
RESUME_COMPLETIONS = {"T/0": ["    return a + 1", "    return a  # wrong"], "T/1": ["    return a + 1", "    # slow"],
                      "T/2": ["    return a  # wrong", "    return 1 + a"]}


@pytest.fixture
def fake_sandbox(monkeypatch):
    """utils.evaluation's Sandbox replaced by a stand-in that counts its runs: a program fails when it holds
    "# wrong", times out with "# slow", hits a sandbox error with a marker of ``broken``, else passes. After
    ``interrupt_after`` runs, Ctrl-C (KeyboardInterrupt) arrives."""
    from utils import evaluation

    state = SimpleNamespace(runs=[], interrupt_after=None, broken=set())

    class FakeSandbox:
        features = {"mode": "namespaces", "start": "fake", "network_namespace": True, "unprivileged_uid": True}

        def __init__(self, config):
            self.config = config

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def cancel(self):
            pass

        def run(self, program):
            if state.interrupt_after is not None and len(state.runs) >= state.interrupt_after:
                raise KeyboardInterrupt
            state.runs.append(program)
            if any(marker in program for marker in state.broken):
                return SimpleNamespace(status="failed", reason="sandbox error: OSError: no fork", seconds=0.0)
            if "# wrong" in program:
                return SimpleNamespace(status="failed", reason="AssertionError", seconds=0.125)
            if "# slow" in program:
                return SimpleNamespace(status="timed out", reason="timed out after 5 s", seconds=5.0)
            return SimpleNamespace(status="passed", reason="", seconds=0.0625)

    monkeypatch.setattr(evaluation, "Sandbox", FakeSandbox)
    return state


def _resume_files(tmp_path):
    problems = [{"task_id": tid, "prompt": "def inc(a):\n", "entry_point": "inc",
                 "test": "def check(candidate):\n    assert candidate(1) == 2\n"} for tid in RESUME_COMPLETIONS]
    problem_file = _write_jsonl(tmp_path / "problems.jsonl", problems)
    path = _write_jsonl(tmp_path / "sols.jsonl", [{"task_id": tid, "completion": c}
                                                  for tid, cs in RESUME_COMPLETIONS.items() for c in cs])
    return path, problem_file


def _score(path, problem_file, fake, interrupt_after=None, timeout=5.0, **kwargs):
    """evaluate_file on one worker (samples run in input order): its summary, or None when Ctrl-C stopped it."""
    fake.runs.clear()
    fake.interrupt_after = interrupt_after
    try:
        return evaluate_file("mbpp", path, problem_file=problem_file, timeout=timeout, n_workers=1, progress=False,
                             k=(1, 2), **kwargs)
    except KeyboardInterrupt:
        return None


TIMING = ("seconds", "samples_per_s", "reused_samples")


def test_an_interrupted_scoring_keeps_its_samples_and_a_rerun_scores_only_the_rest(tmp_path, fake_sandbox, capsys,
                                                                                    monkeypatch):
    import sys

    path, problem_file = _resume_files(tmp_path)
    results_path, summary_path = tmp_path / "sols_results.jsonl", tmp_path / "sols_summary.json"
    partial = tmp_path / "sols_results.partial.jsonl"
    clean = _score(path, problem_file, fake_sandbox)
    assert len(fake_sandbox.runs) == 6 and not partial.exists()  # nothing is left beside the outputs
    clean_results, clean_summary = results_path.read_text(), json.loads(summary_path.read_text())
    results_path.unlink(), summary_path.unlink()

    argv = ["--task_name", "mbpp", "--path", path, "--problem_file", problem_file, "--n_workers", "1",
            "--timeout", "5", "--k", "1,2", "--no_progress"]
    fake_sandbox.runs.clear()
    fake_sandbox.interrupt_after = 4
    monkeypatch.setattr(sys, "excepthook", lambda *exc: print("Traceback ...", file=sys.stderr))
    with pytest.raises(KeyboardInterrupt) as info:
        evaluate_preds.main(argv)
    sys.excepthook(KeyboardInterrupt, info.value, None)
    assert capsys.readouterr().err == (f"Traceback ...\ninterrupted: 4 of 6 samples are kept in {partial}; rerun "
                                       f"the same command to go on from there\n")
    assert not results_path.exists() and len(partial.read_text().splitlines()) == 1 + 4  # the header, 4 results

    fake_sandbox.runs.clear()
    fake_sandbox.interrupt_after = None
    summary = evaluate_preds.main(argv)
    out = capsys.readouterr().out
    assert f"resuming: 4 of 6 samples already scored in {partial}; delete it to score from scratch\n" in out
    assert fake_sandbox.runs == [mbpp_program({"prompt": "def inc(a):\n", "entry_point": "inc", "test": "def check("
                                               "candidate):\n    assert candidate(1) == 2\n"}, c)
                                 for c in RESUME_COMPLETIONS["T/2"]]  # only the last two samples ran
    assert "(2 run here, 4 reused from an earlier run; " in out
    assert results_path.read_text() == clean_results and not partial.exists()
    written = json.loads(summary_path.read_text())
    assert written["reused_samples"] == 4 and clean_summary["reused_samples"] == 0
    assert {k: v for k, v in written.items() if k not in TIMING} == {
        k: v for k, v in clean_summary.items() if k not in TIMING}
    assert summary["pass@2"] == clean_summary["pass@2"] == 1.0 and summary["counts"]["timed out"] == 1


def test_a_changed_timeout_or_predictions_file_scores_from_scratch_and_says_why(tmp_path, fake_sandbox, capsys):
    path, problem_file = _resume_files(tmp_path)
    partial = tmp_path / "sols_results.partial.jsonl"
    assert _score(path, problem_file, fake_sandbox, interrupt_after=3) is None
    assert _score(path, problem_file, fake_sandbox, interrupt_after=4, timeout=6.0) is None
    assert len(fake_sandbox.runs) == 4  # none reused
    assert (f"scoring from scratch: {partial} is another run's (its timeout was 5.0 s, this run's is 6.0 s); it is "
            f"replaced\n") in capsys.readouterr().out
    with open(path, "a", encoding="utf-8") as fh:  # one more sample: another file
        fh.write(json.dumps({"task_id": "T/2", "completion": "    return a + 1"}) + "\n")
    assert _score(path, problem_file, fake_sandbox, timeout=6.0)["n_samples"] == 7
    assert len(fake_sandbox.runs) == 7
    assert (f"scoring from scratch: {partial} is another run's (the predictions file has changed); it is "
            f"replaced\n") in capsys.readouterr().out


def test_a_torn_last_line_of_the_kept_samples_is_ignored(tmp_path, fake_sandbox, capsys):
    """A kill (or a full disk) mid-write leaves a line cut short: it is dropped, and the rerun's appends start on a
    line of their own (a second interruption loses nothing)."""
    path, problem_file = _resume_files(tmp_path)
    partial = tmp_path / "sols_results.partial.jsonl"
    assert _score(path, problem_file, fake_sandbox, interrupt_after=3) is None
    with open(partial, "a", encoding="utf-8") as fh:
        fh.write('{"task_id": "T/1", "sample_index": 1, "sta')
    assert _score(path, problem_file, fake_sandbox, interrupt_after=1) is None
    assert _score(path, problem_file, fake_sandbox)["counts"] == {"passed": 3, "failed": 2, "timed out": 1,
                                                                  "sandbox_errors": 0}
    assert len(fake_sandbox.runs) == 2 and not partial.exists()
    assert "resuming: 4 of 6 samples already scored" in capsys.readouterr().out


def test_samples_the_sandbox_failed_are_run_again(tmp_path, fake_sandbox, capsys):
    """A sandbox error says nothing about the program (the next run's sandbox may work): it is not kept."""
    path, problem_file = _resume_files(tmp_path)
    from utils import errors

    fake_sandbox.broken = {"return a  # wrong"}  # T/0's second sample and T/2's first
    assert _score(path, problem_file, fake_sandbox, interrupt_after=5) is None
    assert errors._INTERRUPT_HINT[0]().startswith("3 of 6 samples are kept")  # what the rerun will reuse
    fake_sandbox.broken = set()
    summary = _score(path, problem_file, fake_sandbox)
    assert [run.count("# wrong") for run in fake_sandbox.runs] == [1, 1, 0]  # the two sandbox errors, the last one
    assert "resuming: 3 of 6 samples already scored" in capsys.readouterr().out
    assert summary["counts"]["sandbox_errors"] == 0 and summary["counts"]["failed"] == 2


def test_a_file_being_scored_cannot_be_scored_again_until_the_first_ends(tmp_path, fake_sandbox):
    """A second scoring of the same predictions file would replace the first one's progress file (each losing the
    other's kept samples): it is refused while the first holds its lock; another file is scored meanwhile."""
    import fcntl

    path, problem_file = _resume_files(tmp_path)
    with open(path, "rb") as held:  # as the first scoring holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(UserError, match=f"{path}: another evaluate_preds.py is scoring this file; wait for it"):
            _score(path, problem_file, fake_sandbox)
        assert fake_sandbox.runs == [] and not (tmp_path / "sols_results.partial.jsonl").exists()
        other = tmp_path / "other" / "sols.jsonl"
        other.parent.mkdir()
        other.write_bytes(pathlib.Path(path).read_bytes())
        assert _score(other, problem_file, fake_sandbox)["n_samples"] == 6
    assert _score(path, problem_file, fake_sandbox)["n_samples"] == 6  # once it ends


def test_samples_scored_under_another_sandbox_mode_are_scored_again(tmp_path, fake_sandbox, capsys, monkeypatch):
    """The header records the mode the sandbox ran in (auto's choice), not the one asked for: a rerun whose auto
    falls back to a weaker mode (say, without root) does not mix its samples with the stronger mode's."""
    from utils import evaluation

    path, problem_file = _resume_files(tmp_path)
    assert _score(path, problem_file, fake_sandbox, interrupt_after=3) is None
    monkeypatch.setattr(evaluation.Sandbox, "features", {**evaluation.Sandbox.features, "mode": "uid"})
    assert _score(path, problem_file, fake_sandbox)["n_samples"] == 6 and len(fake_sandbox.runs) == 6
    assert "(its --sandbox_mode was namespaces, this run's is uid)" in capsys.readouterr().out


def test_a_full_disk_while_keeping_samples_names_the_file_and_what_is_kept(tmp_path, fake_sandbox, monkeypatch):
    """The third sample's line does not fit: one error naming the progress file and the two samples kept in it; the
    rerun (space freed) goes on from those two."""
    import errno

    path, problem_file = _resume_files(tmp_path)
    partial = tmp_path / "sols_results.partial.jsonl"
    real_open, appends = pathlib.Path.open, []

    def open_(self, mode="r", *args, **kwargs):
        fh = real_open(self, mode, *args, **kwargs)
        if self == partial and mode == "a":
            appends.append(1)
            if len(appends) == 3:
                fh.close()
                raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return fh

    monkeypatch.setattr(pathlib.Path, "open", open_)
    with pytest.raises(UserError) as exc:
        _score(path, problem_file, fake_sandbox)
    assert str(exc.value).startswith(f"{partial}: no space left on device; the 2 samples scored before are kept in "
                                     f"it; free space there, then rerun the same command"), exc.value
    monkeypatch.setattr(pathlib.Path, "open", real_open)  # space freed
    assert _score(path, problem_file, fake_sandbox)["n_samples"] == 6 and len(fake_sandbox.runs) == 4


def test_ctrl_c_stops_the_running_samples_and_keeps_every_one_that_finished():
    """Ctrl-C arrives while one sample runs on and another ends by itself: the running one is stopped
    (``Sandbox.cancel``: before, the run waited for it, up to --timeout) and dropped, and the one that finished is
    kept although the interrupt came before its result was collected (before, it was lost)."""
    import os
    import signal
    import threading

    from utils.scoring import Sample, run_samples
    from utils.sandbox import SampleCancelled

    collected, cancelled, kept = threading.Event(), threading.Event(), []

    class Stoppable:
        def run(self, program):
            if program == "finishing":  # Ctrl-C once the quick sample is collected; it ends as the run stops
                collected.wait(10)
                os.kill(os.getpid(), signal.SIGINT)
                cancelled.wait(10)
                return SimpleNamespace(status="passed", reason="", seconds=0.0)
            if program == "running":  # runs until it is stopped
                cancelled.wait(10)
                raise SampleCancelled
            return SimpleNamespace(status="failed", reason="AssertionError", seconds=0.0)

        def cancel(self):
            cancelled.set()

    def on_result(index, result):
        kept.append((index, result.status))
        collected.set()

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in the test above
    try:
        with pytest.raises(KeyboardInterrupt):
            run_samples([Sample("t0", 0, "quick"), Sample("t1", 0, "running"), Sample("t2", 0, "finishing")],
                        Stoppable(), n_workers=3, progress=False, on_result=on_result)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert sorted(kept) == [(0, "failed"), (2, "passed")]
    assert cancelled.is_set()


def test_the_scoring_lock_is_held_until_the_outputs_are_written_and_the_progress_file_is_gone(tmp_path,
                                                                                              fake_sandbox,
                                                                                              monkeypatch):
    """A second scorer let in before then would have its new progress file deleted under it, or the first one's
    outputs written over its work: each step after the samples ran tries to take the lock, and must be refused."""
    from utils import evaluation, scoring_progress

    path, problem_file = _resume_files(tmp_path)
    held = {}

    def refused() -> bool:
        try:
            with scoring_progress.scoring_lock(path):
                return False
        except UserError:
            return True

    write, remove = evaluation.atomic_write_text, scoring_progress.Progress.remove

    def checked_write(target, text, *args):
        held[pathlib.Path(target).name] = refused()
        return write(target, text, *args)

    def checked_remove(self):
        held["remove"] = refused()
        return remove(self)

    monkeypatch.setattr(evaluation, "atomic_write_text", checked_write)  # the results and the summary
    monkeypatch.setattr(scoring_progress, "atomic_write_text", checked_write)  # the progress file
    monkeypatch.setattr(scoring_progress.Progress, "remove", checked_remove)
    assert _score(path, problem_file, fake_sandbox)["n_samples"] == 6
    assert held == {"sols_results.partial.jsonl": True, "sols_results.jsonl": True, "sols_summary.json": True,
                    "remove": True}
    assert not refused()  # and dropped after


def test_a_finished_scoring_is_reused_when_asked_for_and_its_fingerprint_is_this_runs(tmp_path, fake_sandbox,
                                                                                      capsys):
    """run_experiment redoing a cell passes reuse_finished (--reuse_finished): a finished scoring whose summary
    records this run's predictions, programs and settings is not run again (before: every sample ran again), and
    its results and pass@k are the fresh ones. Without the flag, or with other settings, the file is scored."""
    path, problem_file = _resume_files(tmp_path)
    results_path, summary_path = tmp_path / "sols_results.jsonl", tmp_path / "sols_summary.json"
    fresh = _score(path, problem_file, fake_sandbox)
    fresh_results = results_path.read_text()
    assert fresh["fingerprint"]["timeout_s"] == 5.0 and json.loads(summary_path.read_text()) == {
        k: v for k, v in fresh.items() if not k.endswith("_path")}

    assert _score(path, problem_file, fake_sandbox)["reused_samples"] == 0 and len(fake_sandbox.runs) == 6
    capsys.readouterr()
    reused = _score(path, problem_file, fake_sandbox, reuse_finished=True)
    assert fake_sandbox.runs == [] and reused["reused_samples"] == 6
    assert (f"reusing: 6 of 6 samples already scored with these predictions, programs and settings in "
            f"{results_path}; delete it to score again\n") in capsys.readouterr().out
    assert results_path.read_text() == fresh_results
    assert {k: v for k, v in reused.items() if k not in TIMING} == {k: v for k, v in fresh.items() if k not in TIMING}
    assert not (tmp_path / "sols_results.partial.jsonl").exists()

    # another timeout: scored again, saying why (and the next reuse needs that timeout)
    assert _score(path, problem_file, fake_sandbox, timeout=6.0, reuse_finished=True)["reused_samples"] == 0
    assert len(fake_sandbox.runs) == 6
    assert (f"scoring again: {results_path} is of another scoring (its timeout was 5.0 s, this run's is 6.0 s)\n"
            in capsys.readouterr().out)
    argv = ["--task_name", "mbpp", "--path", path, "--problem_file", problem_file, "--n_workers", "1",
            "--timeout", "6", "--k", "1,2", "--no_progress", "--reuse_finished"]
    fake_sandbox.runs.clear()
    assert evaluate_preds.main(argv)["reused_samples"] == 6 and fake_sandbox.runs == []
    assert "(0 run here, 6 reused from an earlier run)" in capsys.readouterr().out

    # samples the sandbox failed are run again, as from a progress file
    fake_sandbox.broken = {"return a  # wrong"}
    assert _score(path, problem_file, fake_sandbox)["counts"]["sandbox_errors"] == 2
    fake_sandbox.broken = set()
    again = _score(path, problem_file, fake_sandbox, reuse_finished=True)
    assert [run.count("# wrong") for run in fake_sandbox.runs] == [1, 1] and again["reused_samples"] == 4
    assert results_path.read_text() == fresh_results


def test_a_finished_scoring_is_reused_before_the_kept_samples_of_a_later_interrupted_scoring(tmp_path, fake_sandbox,
                                                                                           capsys):
    """A finished file scored again without reuse_finished and interrupted after 2 samples: its progress file holds
    2 of them, the finished scoring all 6 (its summary still records this run's fingerprint). Reuse takes all 6."""
    path, problem_file = _resume_files(tmp_path)
    fresh = _score(path, problem_file, fake_sandbox)
    assert _score(path, problem_file, fake_sandbox, interrupt_after=2) is None
    assert len((tmp_path / "sols_results.partial.jsonl").read_text().splitlines()) == 1 + 2
    capsys.readouterr()
    reused = _score(path, problem_file, fake_sandbox, reuse_finished=True)
    assert fake_sandbox.runs == [] and reused["reused_samples"] == 6 and reused["counts"] == fresh["counts"]
    assert capsys.readouterr().out.startswith("reusing: 6 of 6 samples already scored")


def test_a_finished_scoring_whose_results_are_not_its_samples_is_scored_again_saying_why(tmp_path, fake_sandbox,
                                                                                        capsys):
    """The summary records this run's fingerprint but its results file lost a line, or holds another prediction
    for a sample: not reused (every sample runs), and the line says why (a file never scored: no line)."""
    path, problem_file = _resume_files(tmp_path)
    results_path = tmp_path / "sols_results.jsonl"
    assert _score(path, problem_file, fake_sandbox, reuse_finished=True)["reused_samples"] == 0
    assert capsys.readouterr().out == ""  # nothing scored before: nothing to explain
    lines = results_path.read_text().splitlines(keepends=True)
    results_path.write_text("".join(lines[:-1]))
    capsys.readouterr()
    assert _score(path, problem_file, fake_sandbox, reuse_finished=True)["reused_samples"] == 0
    assert len(fake_sandbox.runs) == 6
    assert capsys.readouterr().out == (f"scoring again: {results_path} is of another scoring (5 results for 6 "
                                       f"samples)\n")
    first = json.loads(results_path.read_text().splitlines()[0])
    lines = results_path.read_text().splitlines(keepends=True)
    results_path.write_text(json.dumps({**first, "prediction": "    return a + 2"}) + "\n" + "".join(lines[1:]))
    assert _score(path, problem_file, fake_sandbox, reuse_finished=True)["reused_samples"] == 0
    assert len(fake_sandbox.runs) == 6
    assert capsys.readouterr().out == (f"scoring again: {results_path} is of another scoring (its results differ "
                                       f"from the samples at {first['task_id']})\n")


def test_a_scoring_stopped_before_its_summary_is_written_leaves_no_summary_of_the_earlier_one(tmp_path, fake_sandbox,
                                                                                             monkeypatch):
    """A rescoring under another timeout, stopped between writing its results and its summary: the earlier summary,
    whose fingerprint would vouch for the new results as the earlier settings', is gone."""
    from utils import evaluation

    path, problem_file = _resume_files(tmp_path)
    summary_path = tmp_path / "sols_summary.json"
    _score(path, problem_file, fake_sandbox)
    assert json.loads(summary_path.read_text())["fingerprint"]["timeout_s"] == 5.0
    write = evaluation.atomic_write_text

    def stopped_at_the_summary(target, text, *args):
        if pathlib.Path(target) == summary_path:
            raise KeyboardInterrupt
        return write(target, text, *args)

    monkeypatch.setattr(evaluation, "atomic_write_text", stopped_at_the_summary)
    assert _score(path, problem_file, fake_sandbox, timeout=6.0) is None
    assert (tmp_path / "sols_results.jsonl").is_file() and not summary_path.exists()


def test_a_second_scoring_started_while_the_first_runs_its_samples_is_refused(tmp_path, fake_sandbox, monkeypatch):
    """The lock is exclusive and held while the samples run: a second scoring of the file started then (here from
    inside the first one's sandbox) is refused, and the first goes on to score every sample."""
    from utils import evaluation

    path, problem_file = _resume_files(tmp_path)
    run, refusals = evaluation.Sandbox.run, []

    def run_and_score_again(self, program):
        if not refusals:
            refusals.append(None)  # once: a scoring that is not refused runs its own samples through here
            try:
                evaluate_file("mbpp", path, problem_file=problem_file, timeout=5.0, n_workers=1, progress=False)
            except UserError as exc:
                refusals[0] = str(exc)
        return run(self, program)

    monkeypatch.setattr(evaluation.Sandbox, "run", run_and_score_again)
    summary = _score(path, problem_file, fake_sandbox)
    assert refusals == [f"{path}: another evaluate_preds.py is scoring this file; wait for it to finish (or stop it: "
                        f"a rerun goes on from the samples it kept)"]
    assert summary["n_samples"] == 6 and len(fake_sandbox.runs) == 6


def test_samples_scored_under_another_memory_limit_are_scored_again(tmp_path, fake_sandbox, capsys):
    """A sample's outcome depends on the memory it may take (a MemoryError fails it): a rerun with another --memory_mb
    reuses none of the kept samples and says why."""
    path, problem_file = _resume_files(tmp_path)
    assert _score(path, problem_file, fake_sandbox, interrupt_after=3) is None
    fake_sandbox.runs.clear()
    fake_sandbox.interrupt_after = None
    summary = evaluate_file("mbpp", path, problem_file=problem_file, timeout=5.0, n_workers=1, progress=False,
                            k=(1, 2), sandbox_config=SandboxConfig(memory_mb=SandboxConfig.memory_mb * 2))
    assert summary["reused_samples"] == 0 and len(fake_sandbox.runs) == 6
    assert (f"(its --memory_mb was {SandboxConfig.memory_mb}, this run's is {SandboxConfig.memory_mb * 2})"
            in capsys.readouterr().out)
