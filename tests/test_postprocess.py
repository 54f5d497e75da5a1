"""Post-processing: stop strings, MBPP stage 1/2 (spec §6.5), CRUXEval answer extraction (§6.3-6.4), the CLIs."""
import json
import pathlib

import pytest

import postprocess_cruxeval_preds
import postprocess_mbpp_preds
from tests.conftest import require_real_data
from utils.data import load_task_split, read_jsonl
from utils.scoring import mbpp_samples, run_samples
from utils.postprocess import (DEEPSEEK_BOS, MBPP_STAGE1_STOPS, cut_at_stop, extract_cruxeval_answer,
                               first_expression, mbpp_stage1, mbpp_stage2, strip_prompt)
from utils.sandbox import Sandbox
from utils.tasks import CRUXEVAL_STOP_SEQUENCES, MBPP_STOP_SEQUENCES, cruxeval_prompt, cruxeval_target

# Canonical solutions that use a helper defined after the function: the spec's "\ndef" stop removes it.
HELPER_AFTER_BODY = {"MBPP/717", "MBPP/940"}
# Its 3-space code under a 1-space prompt: stage 2 re-indents it (unit from the code, not its 2-space comment).
REINDENTED_BY_STAGE2 = {"MBPP/966"}


def test_cut_at_stop_takes_the_earliest_stop_string():
    text = "    a = 1\n    return a\nprint(a)\ndef g():\n"
    assert cut_at_stop(text, ("\ndef", "\nprint")) == "    a = 1\n    return a"
    assert cut_at_stop(text, ("\nclass",)) == text
    assert cut_at_stop("x [/ANSWER] y [/ANSWER]", CRUXEVAL_STOP_SEQUENCES) == "x "
    assert cut_at_stop("abc", ("", "c")) == "ab"


def test_stage1_stops_include_the_generation_stops_and_drop_bos_eos():
    assert set(MBPP_STOP_SEQUENCES) <= set(MBPP_STAGE1_STOPS)
    assert "\n<|/" in MBPP_STAGE1_STOPS
    raw = f"{DEEPSEEK_BOS}    return x + 1\n\nif __name__ == '__main__':\n    print(1)"
    assert mbpp_stage1(raw) == "    return x + 1\n"
    assert mbpp_stage1("<s>    y = 2\n    return y</s>garbage") == "    y = 2\n    return y"
    assert mbpp_stage1("    return 1<|endoftext|>\ndef more(): pass") == "    return 1"
    assert mbpp_stage1('    return s\n"""doc') == "    return s"
    assert mbpp_stage1("    return '<s>'") == "    return '<s>'"  # a BOS string inside the code stays


@pytest.mark.parametrize("text, expected", [
    ("a + b) junk", "a + b"),
    ("x if c else y  # note", "x if c else y"),
    ("'abc' foo bar", "'abc'"),
    ("f(1, 2), 3", "f(1, 2), 3"),
    ("[i for i in xs] ]]", "[i for i in xs]"),
    ("(a,", None),
])
def test_first_expression_is_the_longest_parsing_prefix(text, expected):
    assert first_expression(text) == expected


def test_stage2_keeps_the_body_and_trims_returns():
    text = ("    x = 1\n    if x:\n        return x + 1 ]]\n    return (x +\n            2) trailing\n"
            "  junk\nmore")
    assert mbpp_stage2(text) == "    x = 1\n    if x:\n        return x + 1\n    return (x + 2)"
    # A body-level return ends the body; deeper lines after it are joined, a backslash dropped.
    assert mbpp_stage2("    return a\\\n        + b\n    unreachable()") == "    return a + b"
    # A dedent ends the body, but a continuation line inside brackets does not.
    assert mbpp_stage2("    y = [1,\n2]\n    z = 3\nw = 4") == "    y = [1,\n2]\n    z = 3"
    # No return: the body lines are kept as they are.
    assert mbpp_stage2("    print(1)\n    x = 2\n") == "    print(1)\n    x = 2"
    assert mbpp_stage2("   \n\n") == "   \n\n"
    assert mbpp_stage2("    return") == "    return"


def test_stage2_reindents_to_the_prompt_indent_unit():
    prompt = '\n\ndef f(a):\n\t"""\n\tAdd the first two naturals to a.\n\t"""\n'
    completion = "    y = a\n    for i in range(2):\n        y += i\n    return y"
    with pytest.raises(IndentationError):  # spaces after a tab-indented docstring do not compile
        compile(prompt + completion, "p", "exec")
    fixed = mbpp_stage2(completion, prompt)
    assert fixed == "\ty = a\n\tfor i in range(2):\n\t\ty += i\n\treturn y"
    namespace = {}
    exec(prompt + fixed, namespace)
    assert namespace["f"](5) == 6
    same = '\n\ndef f(a):\n    """doc"""\n'
    assert mbpp_stage2(completion, same) == completion
    # The unit is the code's, not a leading comment's: a comment at 2 spaces made 4-space code 8 (IndentationError)
    commented = "  # add two\n    y = a + 2\n    return y"
    assert mbpp_stage2(commented, same) == commented
    assert mbpp_stage2(commented, prompt) == "  # add two\n\ty = a + 2\n\treturn y"


def test_postprocessing_keeps_canonical_solutions_passing(data_paths):
    """Stage 1 then 2 on the 487 test-split canonical solutions: only the tasks that already fail (but MBPP/966, which
    the re-indentation repairs), and two whose helper function follows the body (cut by the spec's "\\ndef" stop),
    fail."""
    require_real_data(data_paths)
    problems = {p["task_id"]: p for p in load_task_split("mbpp", "test", data_paths["mbpp"])}
    solutions = [{"task_id": t, "completion": mbpp_stage2(mbpp_stage1(p["canonical_solution"]), p["prompt"])}
                 for t, p in problems.items()]
    from tests.test_evaluation import KNOWN_BAD_MBPP
    with Sandbox() as sandbox:
        results = run_samples(mbpp_samples(solutions, problems), sandbox, n_workers=4, progress=False)
    failed = {r.task_id for r in results if not r.passed}
    assert failed == (set(KNOWN_BAD_MBPP) - REINDENTED_BY_STAGE2) | HELPER_AFTER_BODY
    assert sum(r.passed for r in results) == 487 - 10


def test_extract_cruxeval_answer_follows_the_spec():
    assert extract_cruxeval_answer("\nassert f(17) == 17\n[/ANSWER]", "output") == "17"
    assert extract_cruxeval_answer("\nassert f(1) == 'a == b'\n[/ANSWER]", "output") == "'a == b'"
    assert extract_cruxeval_answer(" 'x'\n[/ANSWER]", "output") == "'x'"  # no "==": up to [/ANSWER]
    assert extract_cruxeval_answer("\nassert f([1, 2], 'a') == 3\n[/ANSWER]", "input") == "f([1, 2], 'a')"
    assert extract_cruxeval_answer("f(3)\n[/ANSWER]", "input") == "f(3)"
    assert extract_cruxeval_answer("", "output") == ""
    with pytest.raises(ValueError):
        extract_cruxeval_answer("x", "both")



@pytest.mark.parametrize("completion, mode, expected", [
    # "==" inside a string or brackets is not the assertion's: the original's first-"==" split broke these
    ("\nassert f('a==b') == 2\n[/ANSWER]", "input", "f('a==b')"),
    ("\nassert f('a==b') == 2\n[/ANSWER]", "output", "2"),
    ("\nassert f(3 if x == 1 else 0) == 3\n[/ANSWER]", "input", "f(3 if x == 1 else 0)"),
    ("\nassert f(*[1, 2]) == 3  # two args\n[/ANSWER]", "input", "f(*[1, 2])"),
    ("\nassert f(1) == {3, 2, 1}  # a set\n[/ANSWER]", "output", "{3, 2, 1}  # a set"),
    ("\x0bjunk\u2028\nassert f('=') == 'é'\n[/ANSWER]", "input", "f('=')"),  # odd line breaks
    ("\nassert f('a) == 2\n[/ANSWER]", "output", "2"),  # does not tokenize: the first "==", as before
    ("\nassert f('a==b')\n[/ANSWER]", "input", "f('a==b')"),  # no top-level "==": nothing is cut
    ("\nassert f(x == 1)\n[/ANSWER]", "input", "f(x == 1)"),
    # a line starting with a lone \r is a blank line to tokenize: its "==" was missed and nothing was cut
    ("\rassert f(1) == 2\r[/ANSWER]", "input", "f(1)"),
    ("\n\rassert f('a==b') == 2\n[/ANSWER]", "output", "2"),
])
def test_extract_cruxeval_answer_splits_at_the_assertions_eq(completion, mode, expected):
    assert extract_cruxeval_answer(completion, mode) == expected


def test_extract_cruxeval_answer_removes_a_prompt_still_in_the_text():
    record = {"code": "def f(x):\n    return x * 2", "input": "3", "output": "6", "id": "sample_400"}
    for mode, expected in (("output", "6"), ("input", "f(3)")):
        prompt = cruxeval_prompt(record, mode)
        raw = prompt + "\nassert f(3) == 6\n[/ANSWER]"
        assert extract_cruxeval_answer(raw, mode, prompt) == expected
        assert extract_cruxeval_answer(raw, mode) == expected  # without the prompt: after the last [ANSWER]
        # The tokenizer rendered the prompt's end differently: cut the prompt at the first mismatch.
        rendered = prompt[:-1] + " ]\nassert f(3) == 6\n[/ANSWER]"
        assert strip_prompt(rendered, prompt) == " ]\nassert f(3) == 6\n[/ANSWER]"
        assert extract_cruxeval_answer(rendered, mode, prompt) == expected
        # A bare completion is kept whole (even one that starts like the prompt); a cut-off prompt gives "".
        assert extract_cruxeval_answer("\nassert f(3) == 6\n[/ANSWER]", mode, prompt) == expected
        assert strip_prompt(prompt[:5] + "xyz == 6", prompt) == prompt[:5] + "xyz == 6"
        assert extract_cruxeval_answer(prompt[:-20], mode, prompt) == ""


def test_ground_truth_round_trips_through_extraction(data_paths):
    require_real_data(data_paths)
    records = load_task_split("cruxeval_output_prediction", "test", data_paths["cruxeval"])
    for mode in ("input", "output"):
        prompts = [cruxeval_prompt(r, mode) for r in records]
        answers = [extract_cruxeval_answer(p + cruxeval_target(r), mode, p) for p, r in zip(prompts, records)]
        expected = [f"f({r['input']})" if mode == "input" else r["output"] for r in records]
        assert sum(a == e for a, e in zip(answers, expected)) == 400


def test_postprocess_mbpp_cli_writes_both_stages(tmp_path, data_paths, capsys):
    problems = load_task_split("mbpp", "test", data_paths["mbpp"])[:3]
    (tmp_path / "mbpp_test_problems.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    raw = [{"task_id": p["task_id"], "language": "python",
            "completion": p["canonical_solution"] + " junk junk\nprint('trailing')"} for p in problems]
    raw.append(dict(raw[0], completion=DEEPSEEK_BOS + raw[0]["completion"]))  # a second sample of task 0
    path = tmp_path / "mbxp_solutions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in raw))
    stage1, stage2 = postprocess_mbpp_preds.main(["--path", str(path)])
    assert stage1.endswith("mbxp_solutions_stage1.jsonl") and stage2.endswith("mbxp_solutions_stage2.jsonl")
    one, two = read_jsonl(stage1), read_jsonl(stage2)
    assert [r["task_id"] for r in one] == [r["task_id"] for r in raw] and len(two) == 4
    assert all("print('trailing')" not in r["completion"] and DEEPSEEK_BOS not in r["completion"] for r in one)
    assert one[0]["completion"] == one[3]["completion"] and one[0]["language"] == "python"
    assert "stage 2:" in capsys.readouterr().out


def test_postprocess_mbpp_cli_reindents_stage2_to_each_tasks_prompt(tmp_path):
    """The CLI hands stage 2 the task's prompt from mbpp_test_problems.jsonl: a tab-indented prompt gets a
    tab-indented body (spaces after its tab-indented docstring would not compile)."""
    prompt = '\n\ndef f(a):\n\t"""\n\tAdd the first two naturals to a.\n\t"""\n'
    (tmp_path / "mbpp_test_problems.jsonl").write_text(json.dumps(
        {"task_id": "MBPP/1", "prompt": prompt, "entry_point": "f", "test": ""}) + "\n")
    path = tmp_path / "mbxp_solutions.jsonl"
    path.write_text(json.dumps({"task_id": "MBPP/1", "completion": "    y = a\n    for i in range(2):\n"
                                                                   "        y += i\n    return y\nprint(f(1))"}) + "\n")
    _, stage2 = postprocess_mbpp_preds.main(["--path", str(path)])
    assert read_jsonl(stage2)[0]["completion"] == "\ty = a\n\tfor i in range(2):\n\t\ty += i\n\treturn y"


def test_postprocess_mbpp_stage_files_carry_the_field_mxeval_dispatches_on(tmp_path, data_paths):
    # mxeval reads sample["language"] for every line (a KeyError without it); ours accepts files without it
    problems = load_task_split("mbpp", "test", data_paths["mbpp"])[:2]
    (tmp_path / "mbpp_test_problems.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    path = tmp_path / "preds.jsonl"
    path.write_text("".join(json.dumps({"task_id": p["task_id"], "completion": p["canonical_solution"]}) + "\n"
                            for p in problems))
    for stage in postprocess_mbpp_preds.main(["--path", str(path)]):
        rows = read_jsonl(stage)
        assert [(r["task_id"], r["language"]) for r in rows] == [(p["task_id"], "python") for p in problems]


def test_postprocess_mbpp_cli_names_the_missing_prompt(tmp_path):
    path = tmp_path / "preds.jsonl"
    path.write_text(json.dumps({"task_id": "MBPP/9999", "completion": "    return 1"}) + "\n")
    (tmp_path / "mbpp_test_problems.jsonl").write_text(json.dumps(
        {"task_id": "MBPP/1", "prompt": "def f():\n", "entry_point": "f", "test": ""}) + "\n")
    with pytest.raises(SystemExit) as exc:
        postprocess_mbpp_preds.main(["--path", str(path)])
    assert exc.value.code == 2


def test_postprocess_cruxeval_cli_writes_output_json(tmp_path, data_paths, capsys):
    records = load_task_split("cruxeval_output_prediction", "test", data_paths["cruxeval"])[:3]
    raw = {r["id"]: [cruxeval_prompt(r, "output") + cruxeval_target(r), "\nassert f(x) == 'nope'\n[/ANSWER]"]
           for r in records}
    path = tmp_path / "output_raw.json"
    path.write_text(json.dumps(raw))
    out = postprocess_cruxeval_preds.main(["--path", str(path), "--mode", "output",
                                           "--data_path", data_paths["cruxeval"]])
    assert out == str(tmp_path / "output.json")
    answers = json.loads((tmp_path / "output.json").read_text())
    assert answers == {r["id"]: [r["output"], "'nope'"] for r in records}
    for bad_out, message in ((tmp_path, "is a directory; pass a file path"),
                             (tmp_path / "no" / "o.json", "does not exist; create it or pass another path")):
        with pytest.raises(SystemExit) as exc:
            postprocess_cruxeval_preds.main(["--path", str(path), "--mode", "output", "--data_path",
                                             data_paths["cruxeval"], "--out", str(bad_out)])
        assert exc.value.code == 2 and message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["output.json", "output_raw.json"]  # no temporary left


@pytest.mark.parametrize("mode", ["input", "output"])
def test_generation_and_postprocessing_extract_the_same_cruxeval_answers(tmp_path, data_paths, mode):
    """output.json from generate_preds (bare completions) equals postprocess_cruxeval_preds.py's: an "[ANSWER]" in
    the model's answer is not a prompt to cut after (generation cut "f('[ANSWER]')" to "')")."""
    from utils.prediction_files import write_predictions
    from utils.tasks import get_task

    task = get_task(f"cruxeval_{mode}_prediction")
    records = load_task_split(task.name, "test", data_paths["cruxeval"])[:2]
    raw = {r["id"]: ["\nassert f('[ANSWER]') == '[ANSWER]'\n[/ANSWER]", "\nassert f(1) == 2\n[/ANSWER]"]
           for r in records}
    write_predictions(tmp_path, task, records, raw, CRUXEVAL_STOP_SEQUENCES)
    generated = json.loads((tmp_path / "output.json").read_text())
    expected = ["f('[ANSWER]')", "f(1)"] if mode == "input" else ["'[ANSWER]'", "2"]
    assert generated == {r["id"]: expected for r in records}
    out = postprocess_cruxeval_preds.main(["--path", str(tmp_path / "output_raw.json"), "--mode", mode,
                                           "--data_path", data_paths["cruxeval"], "--out", str(tmp_path / "pp.json")])
    assert json.loads(pathlib.Path(out).read_text()) == generated
@pytest.mark.parametrize("task_name", ["mbpp", "cruxeval_output_prediction"])
def test_a_fresh_generation_deletes_what_was_derived_from_the_predictions_it_replaces(task_name, tmp_path,
                                                                                        data_paths, capsys):
    """Stage files and scores of an earlier run's predictions must not sit beside new ones (after a crash, or a run
    the user forgot to score again); derived_files names exactly what post-processing and evaluation write."""
    import evaluate_preds
    import generate_preds
    from utils.scoring_progress import progress_path
    from utils.prediction_files import derived_files, output_files
    from utils.tasks import get_task

    data = data_paths["mbpp" if task_name == "mbpp" else "cruxeval"]
    generate = ["--task_name", task_name, "--model_type", "tiny-phi-2", "--data_path", data, "--limit", "2",
                "--max_new_tokens", "4", "--no_progress", "--log_dir", str(tmp_path)]
    assert generate_preds.main(generate) == 0
    generated = {p.name for p in tmp_path.iterdir()}
    if task_name == "mbpp":
        postprocess_mbpp_preds.main(["--path", str(tmp_path / "mbxp_solutions.jsonl")])
        scored, subset = ["mbxp_solutions.jsonl", "mbxp_solutions_stage1.jsonl", "mbxp_solutions_stage2.jsonl"], \
            ["--allow_missing"]
    else:
        scored, subset = ["output.json"], []
    for name in scored:
        evaluate_preds.main(["--task_name", task_name, "--path", str(tmp_path / name), "--data_path", data,
                             "--n_workers", "1", "--no_progress", *subset])
    derived = {p.name for p in tmp_path.iterdir()} - generated
    if task_name == "mbpp":  # what mxeval's evaluate_functional_correctness writes beside each scored file
        mxeval = {f"{name}{suffix}" for name in scored for suffix in ("_results.jsonl", "_passatk.json")}
        for name in mxeval:
            (tmp_path / name).write_text("{}\n")
        derived |= mxeval
    partial = {progress_path(name).name for name in scored}  # what an interrupted scoring leaves
    for name in partial:
        (tmp_path / name).write_text("{}\n")
    derived |= partial
    assert derived == set(derived_files(get_task(task_name))) and len(derived) == 3 * len(scored) + len(scored) - 1 \
        + (2 * len(scored) if task_name == "mbpp" else 0)
    # rerunning the command (after a crash, say) is refused: it would delete them; --overwrite says it is meant
    kept = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(SystemExit) as exc:
        generate_preds.main(generate)
    assert exc.value.code == 2 and "holds an earlier run's work (2 finished tasks in generation_progress.jsonl); " \
        "pass --resume to continue it (same settings), --overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == kept
    assert generate_preds.main([*generate, "--overwrite"]) == 0
    assert {p.name for p in tmp_path.iterdir()} == generated
    # a fresh run for the other task family is refused: this one's files would look current beside its config,
    # and deleting them could lose hours of predictions
    other = "cruxeval_output_prediction" if task_name == "mbpp" else "mbpp"
    other_data = data_paths["mbpp" if other == "mbpp" else "cruxeval"]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(SystemExit) as exc:
        generate_preds.main(["--task_name", other, "--model_type", "tiny-phi-2", "--data_path", other_data,
                             *generate[6:]])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"--log_dir {tmp_path} holds another task's predictions or scores (" in err
    assert output_files(get_task(task_name))[0] in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_postprocess_cruxeval_cli_writes_the_file_the_official_script_reads(tmp_path, data_paths, capsys):
    """facebookresearch/cruxeval's evaluate_generations.py needs every id of its data and reads the mode from the
    path ('input' in it); --official_out writes that file, padded, and refuses a path that names the wrong mode."""
    records = load_task_split("cruxeval_output_prediction", "test", data_paths["cruxeval"])[:3]
    raw = {r["id"]: [cruxeval_prompt(r, "output") + cruxeval_target(r), "\nassert f(x) == 'nope'\n[/ANSWER]"]
           for r in records}
    path = tmp_path / "output_raw.json"
    path.write_text(json.dumps(raw))
    base = ["--path", str(path), "--data_path", data_paths["cruxeval"]]
    official = tmp_path / "cruxeval_output_generations.json"
    postprocess_cruxeval_preds.main([*base, "--mode", "output", "--official_out", str(official)])
    padded = json.loads(official.read_text())
    every_id = [r["id"] for r in read_jsonl(data_paths["cruxeval"])]
    assert list(padded) == sorted(every_id, key=lambda rid: int(rid.split("_")[1]))
    assert {rid: padded[rid] for rid in raw} == {r["id"]: [r["output"], "'nope'"] for r in records}
    assert all(padded[rid] == ["", ""] for rid in set(every_id) - set(raw))
    assert f"for the official script: {official}" in capsys.readouterr().out
    for mode, name, need in (("output", "cruxeval_input_generations.json", "must not contain 'input' for output"),
                             ("input", "generations.json", "must contain 'input' for input")):
        (tmp_path / "output.json").unlink(missing_ok=True)
        with pytest.raises(SystemExit) as exc:
            postprocess_cruxeval_preds.main([*base, "--mode", mode, "--official_out", str(tmp_path / name)])
        assert exc.value.code == 2 and need in capsys.readouterr().err
        assert not (tmp_path / "output.json").exists() and not (tmp_path / name).exists()  # refused before writing


def test_the_other_cruxeval_mode_a_raw_file_or_no_predictions_are_refused(tmp_path, data_paths, capsys):
    """Input-prediction answers scored as output prediction (or extracted in the other mode, overwriting the good
    output.json) scored 0 with exit 0; so did the raw file and an empty one. generate_preds_config.json beside the
    file names the task it was generated for."""
    import evaluate_preds
    import generate_preds

    assert generate_preds.main(["--task_name", "cruxeval_input_prediction", "--model_type", "tiny-phi-2",
                                "--data_path", data_paths["cruxeval"], "--limit", "2", "--max_new_tokens", "4",
                                "--no_progress", "--log_dir", str(tmp_path)]) == 0
    answers = (tmp_path / "output.json").read_text()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "empty.json").write_text("{}")
    score = ["--data_path", data_paths["cruxeval"], "--n_workers", "1", "--no_progress"]
    cases = [(postprocess_cruxeval_preds.main, ["--path", str(tmp_path / "output_raw.json"), "--mode", "output",
                                                "--data_path", data_paths["cruxeval"]],
              "generated for cruxeval_input_prediction (" + str(tmp_path / "generate_preds_config.json") +
              "), not cruxeval_output_prediction; pass --mode input"),
             (evaluate_preds.main, ["--task_name", "cruxeval_output_prediction", "--path",
                                    str(tmp_path / "output.json"), *score],
              "not cruxeval_output_prediction; score it with --task_name cruxeval_input_prediction"),
             (evaluate_preds.main, ["--task_name", "cruxeval_input_prediction", "--path",
                                    str(tmp_path / "output_raw.json"), *score],
              "output_raw.json: raw completions, not answers; extract them first (python postprocess_cruxeval_preds.py"
              " --path " + str(tmp_path / "output_raw.json") + " --mode input)"),
             (evaluate_preds.main, ["--task_name", "cruxeval_input_prediction", "--path",
                                    str(tmp_path / "elsewhere" / "empty.json"), *score], "empty.json: no predictions")]
    for main, argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err, message
    assert (tmp_path / "output.json").read_text() == answers  # not overwritten by the refused extraction
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file() and "result" in p.name) == []
    evaluate_preds.main(["--task_name", "cruxeval_input_prediction", "--path", str(tmp_path / "output.json"), *score])
    assert "2 samples of 2 tasks" in capsys.readouterr().out


def test_cut_at_stop_takes_the_earliest_stop_whatever_the_list_order():
    """Several stops in the text (the later-listed one first), and overlapping stops."""
    from utils.postprocess import cut_at_stop, mbpp_stage1
    assert cut_at_stop("x\ndef f\nclass C", ("\ndef", "\nclass")) == "x"
    assert cut_at_stop("x\nclass C\ndef f", ("\ndef", "\nclass")) == "x"
    assert mbpp_stage1("    return 1\nprint(2)\ndef g(): pass") == "    return 1"
    # a stop that starts before the cut so far but ends after it (overlapping stops)
    assert cut_at_stop("ab\n\nx", ("\nx", "\n\n")) == "ab"
    assert cut_at_stop("ab[/ANSWER]", ("ANSWER]", "[/ANSWER]")) == "ab"


@pytest.mark.parametrize("eos", ["<｜end▁of▁sentence｜>", "<|endoftext|>", "</s>", "<|end_of_text|>", "<|eot_id|>",
                                 "<|end|>"])
def test_stage1_cuts_at_every_supported_tokenizers_eos_string(eos):
    """An EOS string the decoder left in the text ends the completion (what follows it is not the model's answer)."""
    assert mbpp_stage1(f"    return 1{eos}    return 2") == "    return 1"


def test_stage1_removes_the_deepseek_bos_string_anywhere():
    # as in the original: DeepSeek's BOS is removed everywhere, not only where it leads the text
    assert mbpp_stage1(f"    x = 1\n{DEEPSEEK_BOS}    return x") == "    x = 1\n    return x"


def test_stage2_keeps_leading_blank_lines_and_reindents_tab_against_one_space():
    assert mbpp_stage2("\n    return 1") == "\n    return 1"
    # a 1-space prompt and tab-indented code: same width, different unit (mixing them is a TabError)
    one_space = '\n\ndef f(a):\n """doc"""\n'
    fixed = mbpp_stage2("\ty = a\n\treturn y", one_space)
    assert fixed == " y = a\n return y"
    namespace = {}
    exec(one_space + fixed, namespace)
    assert namespace["f"](3) == 3


def test_strip_prompt_keeps_a_text_that_shares_less_than_half_the_prompt():
    prompt = "x" * 40 + "[ANSWER]"
    assert strip_prompt(prompt[:24] + "junk", prompt) == "junk"  # 24 of 48: half, so the prompt is cut
    assert strip_prompt(prompt[:20] + "junk", prompt) == prompt[:20] + "junk"  # 20 of 48: a bare completion


def test_an_output_answer_is_not_taken_from_an_assertion_past_the_answers_end():
    """Text that ran on past [/ANSWER] (a raw file from another generator): its == is not the answer's."""
    assert extract_cruxeval_answer(" 2\n[/ANSWER]\n[PYTHON]\nassert g(1) == 3", "output") == "2"
    assert extract_cruxeval_answer("assert f(1) == 2\n[/ANSWER]\nassert g(1) == 3", "output") == "2"
    assert extract_cruxeval_answer("f(1)\n[/ANSWER]\nassert g(1) == 3", "input") == "f(1)"


def test_an_empty_mbpp_file_is_refused_not_post_processed_into_empty_stages(tmp_path):
    from utils.errors import UserError
    from utils.postprocess import postprocess_mbpp_file

    empty = tmp_path / "mbxp_solutions.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="no predictions"):
        postprocess_mbpp_file(empty)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mbxp_solutions.jsonl"]


@pytest.mark.parametrize("completion, expected, returns", [
    # commented-out code at column 0 inside a loop: it ended the body there, leaving a `for` without a block
    ("    res = []\n    for i in range(n):\n#        print(i)\n        res.append(i)\n    return res\n",
     "    res = []\n    for i in range(n):\n#        print(i)\n        res.append(i)\n    return res", [0, 1, 2]),
    # a first comment deeper than the code: its indent was the body's, so the code ended the body at once
    ("        # the squares\n    return [i * i for i in range(n)]\nf(",
     "        # the squares\n    return [i * i for i in range(n)]", [0, 1, 4]),
    # a first comment at column 0: every line passed for the body, so the return did not end it
    ("# the squares\n    return [i * i for i in range(n)]\nf(", "# the squares\n    return [i * i for i in range(n)]",
     [0, 1, 4]),
    # no return: a comment inside the body is kept, one less indented that follows it goes with what follows
    ("    res = []\n    for i in range(n):\n#        print(i)\n        res.append(i)\n# driver code\nf(",
     "    res = []\n    for i in range(n):\n#        print(i)\n        res.append(i)", None)])
def test_stage2_comments_neither_set_the_body_indent_nor_end_the_body(completion, expected, returns):
    """Python ignores a comment's indent, and so does stage 2: a completion Python runs keeps its body."""
    prompt = '\n\ndef f(n):\n    """doc"""\n'
    fixed = mbpp_stage2(mbpp_stage1(completion), prompt)
    assert fixed == expected
    assert mbpp_stage2(fixed, prompt) == fixed  # post-processing its own output changes nothing
    namespace = {}
    exec(prompt + fixed, namespace)
    assert namespace["f"](3) == returns


def test_stage2_of_a_reindented_body_under_a_shallower_comment_is_unchanged():
    """MBPP/966's shape: a 2-space comment, then 3-space code under a 1-space prompt. Stage 2 re-indents the code to
    1 space and leaves the comment at 2; run again (a stage-2 file post-processed), the comment's indent was taken
    for the body's and the 1-space code after it was dropped."""
    prompt = '\n\ndef f(t):\n """doc"""\n'
    once = mbpp_stage2("  # keep the truthy ones\n   t = [x for x in t if x]\n   return t", prompt)
    assert once == "  # keep the truthy ones\n t = [x for x in t if x]\n return t"
    assert mbpp_stage2(once, prompt) == once


def test_stage2_keeps_a_string_whose_last_line_ends_the_text_and_starts_with_a_hash():
    """tokenize ends no statement after a last line that starts with '#' (it takes it for a comment), so that line,
    the end of a multi-line string, was not seen as inside it, and stage 2 cut the string open."""
    prompt = '\n\ndef f():\n    """doc"""\n'
    completion = '    s = """a\n# b"""'
    assert mbpp_stage2(completion, prompt) == completion
    namespace = {}
    exec(prompt + completion + "\n    return s", namespace)
    assert namespace["f"]() == "a\n# b"
