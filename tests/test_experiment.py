"""run_experiment.py --preset smoke: all 18 cells through the real scripts, caching, provenance."""
import hashlib
import json
import pathlib
import re
import shutil

import pytest

import run_experiment

EXPECTED_TASKS = 4  # the smoke preset's --limit (the fixture files used without ../shared/data hold 10 per split)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    first = run_experiment.main(["--preset", "smoke", "--out", str(out)])
    return out, first


def test_smoke_fills_all_18_cells_with_evaluator_results(smoke_run):
    out, first = smoke_run
    assert len(first["ran"]) == 18
    text = (out / "results.md").read_text()
    rows = re.findall(r"^\| (None|FFT|LoRA|PT|IDPG|LOPA) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", text, re.M)
    assert [r[0] for r in rows] == ["None", "FFT", "LoRA", "PT", "IDPG", "LOPA"] * 2  # the main and MBPP tables
    for key, result in first["results"].items():
        assert 0.0 <= result["pass@1"] <= 1.0 and result["n_tasks"] == EXPECTED_TASKS
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?|unknown", result["git_commit"])
        assert result["seed"] == 9876
        # the score comes from the evaluator's own per-sample results file
        results_file = out / "cells" / key / "gen" / result["scored_file"]
        samples = [json.loads(line) for line in results_file.read_text().splitlines()]
        assert len(samples) == EXPECTED_TASKS
        assert result["pass@1"] == pytest.approx(sum(s["status"] == "passed" for s in samples) / EXPECTED_TASKS)
        scripts = [c.split()[1] for c in result["commands"]]
        method = key.split("/")[-1]
        assert ("tune_fft_baseline.py" in scripts) == (method == "fft")
        assert ("tune_foundation_model.py" in scripts) == (method not in ("none", "fft"))
        assert "generate_preds.py" in scripts and "evaluate_preds.py" in scripts
    assert (out / "results.png").stat().st_size > 0 and (out / "loss_curves.png").stat().st_size > 0


def test_each_trained_cell_records_what_its_training_cost_and_results_md_shows_it(smoke_run):
    """trainable parameters (config.json's runtime), training time (metrics.jsonl's last elapsed), no GPU peak on
    the CPU; the untuned cells record none. results.md sets them in a table of their own per model."""
    out, first = smoke_run
    for key, result in first["results"].items():
        train = out / "cells" / key / "train"
        if key.endswith("/none"):
            assert "trainable_params" not in result and not train.exists()
            continue
        runtime = json.loads((train / "config.json").read_text())["runtime"]
        last = (train / "metrics.jsonl").read_text().splitlines()[-1]
        assert result["trainable_params"] == runtime["trainable_params"] > 0
        assert result["train_seconds"] == json.loads(last)["elapsed"] > 0 and result["train_gpu_peak_gib"] is None
    params = {k.split("/")[-1]: r["trainable_params"] for k, r in first["results"].items() if "/mbpp/" in k
              and "trainable_params" in r}
    assert params["pt"] < params["lora"] < params["fft"] and params["pt"] < params["lopa"]
    text = (out / "results.md").read_text()
    cost = text.split("Training cost: trainable parameters;")[1].split("\n\n")[1]
    rows = re.findall(r"^\| (None|FFT|LoRA|PT|IDPG|LOPA) \| (.+) \| (.+) \| (.+) \|$", cost, re.M)
    assert [r[0] for r in rows] == ["FFT", "LoRA", "PT", "IDPG", "LOPA"]
    mbpp = first["results"]["tiny-phi-2/mbpp/lopa"]
    assert re.fullmatch(rf"{mbpp['trainable_params']:,}; [\d.]+ (s|min)", rows[-1][3]), rows  # under 1 M: in full


def test_training_cost_cells_read_as_the_paper_counts_and_as_a_clock_does():
    from utils.experiment_report import _cost

    assert _cost({"trainable_params": 4_230_000, "train_seconds": 9000, "train_gpu_peak_gib": 9.123}) == \
        "4.23 M; 2.5 h; 9.1 GiB"
    assert _cost({"trainable_params": 4_230_000, "train_seconds": 125}) == "4.23 M; 2.1 min"
    assert _cost({"trainable_params": 25_600, "train_seconds": 12.3}) == "25,600; 12 s"
    assert _cost({"trainable_params": 25_600, "train_seconds": 0.34}) == "25,600; 0.3 s"
    assert _cost({"trainable_params": 25_600}) == "25,600" and _cost({}) == "—"  # no time kept; a cell before them


def test_training_cost_takes_the_gpu_peak_of_every_attempt_of_a_resumed_training(tmp_path):
    """The trainer resets the peak when an attempt starts: a resumed run's last line holds its last attempt's peak
    only, so the cost is the largest peak its lines record."""
    from utils.experiment import training_cost

    (tmp_path / "config.json").write_text(json.dumps({"script": "x", "runtime": {"trainable_params": 10}}))
    lines = [{"step": 1, "elapsed": 5.0, "gpu_peak_mem_gib": 9.5},  # the first attempt
             {"step": 2, "elapsed": 9.0, "gpu_peak_mem_gib": 7.0},
             {"step": 3, "elapsed": 12.0, "gpu_peak_mem_gib": 7.25}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert training_cost(tmp_path) == {"trainable_params": 10, "train_seconds": 12.0, "train_gpu_peak_gib": 9.5}


def test_the_training_cost_table_keeps_each_cell_in_its_column_and_shows_only_trained_rows():
    """Each task's cost under its own column (the main table's order), a dash for a cell recorded before the costs
    were (or whose config.json lacked the count), a row for every method with one cell that records a cost; no table
    where none does."""
    from utils.experiment_report import _training_cost

    results = {"m/cruxeval_input_prediction/pt": {"trainable_params": 256_000, "train_seconds": 5},
               "m/cruxeval_output_prediction/pt": {"pass@1": 0.5},  # from before the costs were recorded
               "m/mbpp/pt": {"trainable_params": 4_230_000, "train_seconds": 125, "train_gpu_peak_gib": 9.123},
               "m/mbpp/none": {"pass@1": 0.1}, "m/mbpp/lora": {"trainable_params": None, "train_seconds": 7}}
    assert _training_cost("m", TASK_ORDER, ["none", "lora", "pt"], results)[-4:] == [
        "| Tuning method | CruxEval-I | CruxEval-O | MBPP |", "|---|---|---|---|", "| LoRA | — | — | — |",
        "| PT | 256,000; 5.0 s | — | 4.23 M; 2.1 min; 9.1 GiB |"]
    assert _training_cost("m", TASK_ORDER, ["none"], results) == []


def test_a_cells_training_cost_is_read_from_its_metrics_and_a_damaged_file_costs_only_the_columns(tmp_path):
    """A GPU run's metrics lines carry gpu_peak_mem_gib beside gpu_mem_gib (this machine writes neither): the last
    line's elapsed and (one attempt: a running peak) its peak are the cost. No metrics.jsonl leaves the time out;
    one damaged mid-file (not just a torn last line) leaves the whole cost out instead of failing a cell whose
    scoring finished."""
    from utils.experiment import training_cost

    (tmp_path / "config.json").write_text(json.dumps({"runtime": {"trainable_params": 25_600}}))
    assert training_cost(tmp_path) == {"trainable_params": 25_600, "train_seconds": None, "train_gpu_peak_gib": None}
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(record) + "\n" for record in (
        {"step": 1, "elapsed": 1.5, "gpu_mem_gib": 1.0, "gpu_peak_mem_gib": 2.0},
        {"step": 2, "elapsed": 3.25, "gpu_mem_gib": 1.25, "gpu_peak_mem_gib": 2.5})))
    assert training_cost(tmp_path) == {"trainable_params": 25_600, "train_seconds": 3.25, "train_gpu_peak_gib": 2.5}
    metrics.write_text("{not json\n" + metrics.read_text())
    assert training_cost(tmp_path) == {}


def test_rerun_redoes_nothing_and_a_changed_hyperparameter_redoes_only_its_cells(smoke_run):
    out, first = smoke_run
    again = run_experiment.main(["--preset", "smoke", "--out", str(out)])
    assert again["ran"] == []
    assert {k: v["pass@1"] for k, v in again["results"].items()} == {k: v["pass@1"] for k, v in first["results"].items()}
    changed = run_experiment.main(["--preset", "smoke", "--out", str(out), "--set", "lopa.lp_rank=2"])
    assert sorted(changed["ran"]) == sorted(k for k in first["results"] if k.endswith("/lopa"))
    lopa = json.loads((out / "cells/tiny-phi-2/mbpp/lopa/train/final/adapter_config.json").read_text())
    assert lopa["lp_rank"] == 2


def test_bad_override_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_experiment.main(["--preset", "smoke", "--out", str(tmp_path), "--set", "bogus.flag=1"])
    assert exc.value.code == 2
    assert "unknown section 'bogus'" in capsys.readouterr().err


def test_an_empty_model_selection_is_a_one_line_error(tmp_path, capsys):
    """--models "," (a stray comma, an empty shell variable) ended in a TypeError traceback: a single preset takes any
    model name, so there was no list of choices to print."""
    with pytest.raises(SystemExit) as exc:
        run_experiment.main(["--preset", "smoke", "--out", str(tmp_path), "--models", ",", "--plan"])
    assert exc.value.code == 2
    assert capsys.readouterr().err == "error: --models ',': name at least one model type\n"


# ---------------------------------------------------------------------- the pipeline around fake stages (fast)
TASK_ORDER = ["cruxeval_input_prediction", "cruxeval_output_prediction", "mbpp"]  # the paper's column order
ROW_ORDER = ["none", "fft", "lora", "pt", "idpg", "lopa"]


def _score(task, method, stage="stage1"):
    """A distinct pass@1 per cell, so a transposed or shifted table shows."""
    value = (10 * TASK_ORDER.index(task) + ROW_ORDER.index(method) + 1) / 100
    return value / 2 if stage == "stage2" else value


DRY_RUN = ["enc_model_type=tiny-roberta", "num_epochs=2", "limit_train_examples=8", "gen.limit=4",
           "gen.max_new_tokens=16", "fft.num_epochs=2"]
"""--set flags of the README's dry run of paper-phi-2 with --models tiny-phi-2."""


def _fake_stages(monkeypatch, fail=None):
    """Every stage a no-op except evaluate (returns _score); ``fail``: (cell key, script, exception)."""
    import gc

    from utils import experiment

    # No-op stages leave nothing to free, and the full collections the runner makes after each stage that builds a
    # model cost ~0.1-0.3 s each with torch loaded.
    monkeypatch.setattr(gc, "collect", lambda *args: 0)

    def make(script):
        def main(argv):
            path = argv[argv.index("--log_dir") + 1] if "--log_dir" in argv else argv[argv.index("--path") + 1]
            model, task, method = path.split("/cells/")[1].split("/")[:3]
            if fail and fail[0] == f"{model}/{task}/{method}" and fail[1] == script:
                print(f"{script} starting")
                raise fail[2]
            if script == "evaluate_preds.py":
                stage = "stage2" if "stage2" in path else "stage1"
                return {"pass@1": _score(task, method, stage), "n_tasks": 4, "results_path": path + ".results",
                        "samples_per_task": {"min": 1, "max": 1}}
        return main

    monkeypatch.setattr(experiment, "_script_main", make)


def _table(text):
    """The first model's main table (its MBPP stages table follows it)."""
    main = text.split("| Tuning method | MBPP stage 1 |")[0]
    rows = re.findall(r"^\| (None|FFT|LoRA|PT|IDPG|LOPA) \| (\S+) \| (\S+) \| (\S+) \|$", main, re.M)
    return {name: cols for name, *cols in rows}


def test_results_md_places_every_number_in_its_row_and_column(tmp_path, monkeypatch):
    _fake_stages(monkeypatch)
    run_experiment.main(["--preset", "smoke", "--out", str(tmp_path)])
    text = (tmp_path / "results.md").read_text()
    assert "| Tuning method | CruxEval-I | CruxEval-O | MBPP |" in text
    table = _table(text)
    names = ["None", "FFT", "LoRA", "PT", "IDPG", "LOPA"]
    assert list(table) == names
    for name, method in zip(names, ROW_ORDER):
        assert table[name] == [f"{100 * _score(t, method):.2f}" for t in TASK_ORDER]
        stages = text.split("| MBPP stage 1 |")[1]
        stage_row = re.search(rf"^\| {name} \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", stages, re.M).groups()
        one, two = _score("mbpp", method), _score("mbpp", method, "stage2")
        assert stage_row == (f"{100 * one:.2f}", f"{100 * two:.2f}", f"{100 * (one + two) / 2:.2f}")
    assert table["LoRA"] == ["3.00", "13.00", "23.00"]
    assert f"- `tiny-phi-2/mbpp/pt`: pass@1 {100 * _score('mbpp', 'pt'):.2f} on 4 tasks (1 sample each); seed " in text


def test_provenance_says_how_many_samples_each_pass_at_1_averages_and_refuses_a_damaged_count():
    """A sampled run's pass@1 is the mean over each task's samples: results.md says how many (a range where the
    tasks differ), nothing for a result from before the count was recorded; a hand-edited count is no result."""
    from utils.experiment import _result_problem
    from utils.experiment_report import _samples_each

    assert _samples_each({"samples_per_task": {"min": 10, "max": 10}}) == " (10 samples each)"
    assert _samples_each({"samples_per_task": {"min": 1, "max": 3}}) == " (1 to 3 samples each)"
    assert _samples_each({"samples_per_task": None}) == _samples_each({}) == ""
    result = {"pass@1": 0.5, "n_tasks": 4, "seed": 1, "git_commit": "abc", "finished": "now", "commands": [],
              "seconds": 1.0}
    assert _result_problem(result) is None and _result_problem({**result, "samples_per_task": None}) is None
    assert _result_problem({**result, "samples_per_task": {"min": 1, "max": 1}}) is None
    assert _result_problem({**result, "samples_per_task": 5}) == ('samples_per_task is 5, not the fewest and most '
                                                                  'samples of a task: {"min": n, "max": n}')


def test_a_model_outside_the_preset_is_run_and_shown(tmp_path, monkeypatch):
    """--models may name a model the preset does not list (a tiny stand-in for a dry run of paper-phi-2): its
    cells are in results.md and the plots (the report used to have no model at all and crashed in matplotlib)."""
    _fake_stages(monkeypatch)
    result = run_experiment.main(["--preset", "smoke", "--out", str(tmp_path), "--models", "tiny-llama",
                                  "--tasks", "mbpp", "--methods", "pt"])
    assert result["ran"] == ["tiny-llama/mbpp/pt"] and result["failed"] == {}
    text = (tmp_path / "results.md").read_text()
    assert "## tiny-llama" in text
    assert re.search(r"^\| PT \| ([\d.]+) \|$", text, re.M).group(1) == f"{100 * _score('mbpp', 'pt'):.2f}"
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_paper_preset_dry_run_with_a_tiny_stand_in_runs_every_stage(tmp_path, data_paths):
    """The README's dry run: paper-phi-2's real flags (bf16, 2 x 4 accumulation, per-epoch checkpoints, the
    paper's sampling) through the real stages, on a tiny model, before any GPU hour is spent. ``none`` first: its
    generation's Accelerator() used to fix mixed precision "no" for the process, and every bf16 training after it
    failed ("AcceleratorState has already been initialized")."""
    argv = ["--preset", "paper-phi-2", "--out", str(tmp_path), "--models", "tiny-phi-2", "--tasks", "mbpp",
            "--methods", "none,fft,lopa", "--mbpp_data", data_paths["mbpp"]] + [
        x for flag in DRY_RUN for x in ("--set", flag)]
    result = run_experiment.main(argv)
    assert result["failed"] == {} and result["ran"] == [f"tiny-phi-2/mbpp/{m}" for m in ("none", "fft", "lopa")]
    text = (tmp_path / "results.md").read_text()  # the paper's decoding samples once per task
    assert all(f"- `tiny-phi-2/mbpp/{m}`: pass@1 " in text for m in ("none", "fft", "lopa"))
    assert text.count(" tasks (1 sample each); seed ") == 3
    for method in ("fft", "lopa"):
        cell = tmp_path / "cells/tiny-phi-2/mbpp" / method
        config = json.loads((cell / "train/config.json").read_text())
        assert config["train"]["gradient_accumulation_steps"] == 4 and config["runtime"]["mixed_precision"] == "bf16"
        assert config["output"]["save_every"] == "1epochs" and config["output"]["keep_checkpoints"] is False
        assert "INFO checkpoint " in (cell / "train/train.log").read_text()  # the first epoch's
        assert not (cell / "train/checkpoints").exists()  # removed once final/ exists (phi-2 FFT's: ~33 GB)
        gen = json.loads((cell / "gen/generate_preds_config.json").read_text())
        assert gen["generation"]["do_sample"] is True and gen["generation"]["temperature"] == 0.6
        assert json.loads((cell / "result.json").read_text())["pass@1"] is not None


def test_a_failed_cell_is_reported_the_others_run_and_the_next_run_redoes_only_it(tmp_path, monkeypatch, capsys):
    from utils import experiment_report

    key = "tiny-phi-2/mbpp/lora"
    _fake_stages(monkeypatch, fail=(key, "generate_preds.py", RuntimeError("CUDA out of memory")))
    save, figures = experiment_report._save, {}

    def keep(fig, path, dpi):
        figures[path.name] = [t.get_text() for ax in fig.axes for t in ax.texts]
        save(fig, path, dpi)

    monkeypatch.setattr(experiment_report, "_save", keep)
    first = run_experiment.main(["--preset", "smoke", "--out", str(tmp_path)])
    assert figures["results.png"] == ["n/a"]  # the failed cell's bar, which looked like a score of 0
    assert list(first["failed"]) == [key] and len(first["ran"]) == 17
    failure = first["failed"][key]
    assert failure["script"] == "generate_preds.py" and failure["reason"] == "RuntimeError: CUDA out of memory"
    assert failure["command"].startswith("python generate_preds.py --task_name mbpp")
    err = capsys.readouterr().err
    assert f"{key}: FAILED in generate_preds.py: RuntimeError: CUDA out of memory" in err
    assert f"command: {failure['command']}" in err
    log = (tmp_path / "cells" / key / "cell.log").read_text()
    assert "$ python generate_preds.py" in log and "generate_preds.py starting" in log
    assert "Traceback" in log and "CUDA out of memory" in log
    assert not (tmp_path / "cells" / key / "result.json").exists()
    text = (tmp_path / "results.md").read_text()
    assert _table(text)["LoRA"] == ["3.00", "13.00", "failed"]
    assert f"`{key}`: **failed** in generate_preds.py" in text

    # the stage now works: only the failed cell is redone; a kept cell from another commit is flagged
    result_path = tmp_path / "cells/tiny-phi-2/mbpp/pt/result.json"
    stored = json.loads(result_path.read_text())
    result_path.write_text(json.dumps({**stored, "git_commit": "0" * 40}))
    _fake_stages(monkeypatch)
    second = run_experiment.main(["--preset", "smoke", "--out", str(tmp_path)])
    assert second["ran"] == [key] and second["failed"] == {}
    assert f"from commit {'0' * 12}, the code is now" in capsys.readouterr().out
    text = (tmp_path / "results.md").read_text()
    assert _table(text)["LoRA"] == ["3.00", "13.00", "23.00"]
    assert "**The cells come from 2 different commits**" in text


def test_a_failed_cells_model_is_freed_before_the_next_cell_and_only_model_stages_collect(tmp_path, monkeypatch):
    """A full collection costs ~0.3 s with torch loaded, so the runner makes one after each stage that builds a
    model, and one after a failed cell: its stage's frames, which held the model (here in a reference cycle, as
    compiled layers are), outlive that stage's own release until the failure is handled. Post-processing and
    evaluation collect nothing."""
    import gc
    import weakref

    from utils import experiment

    collect = gc.collect
    _fake_stages(monkeypatch)
    collections = []
    monkeypatch.setattr(gc, "collect", lambda *args: collections.append(1) or collect(*args))
    models, seen = [], []

    class Model:
        def __init__(self):
            self.me = self  # freed only by a collection

    def make(script):
        def main(argv):
            path = argv[argv.index("--log_dir") + 1] if "--log_dir" in argv else argv[argv.index("--path") + 1]
            method = path.split("/cells/")[1].split("/")[2]
            seen.append((method, script, [ref() is None for ref in models]))
            if method == "lora":
                model = Model()
                models.append(weakref.ref(model))
                raise RuntimeError("CUDA out of memory")
            if script == "evaluate_preds.py":
                return {"pass@1": 0.5, "n_tasks": 4, "results_path": path + ".results"}
        return main

    monkeypatch.setattr(experiment, "_script_main", make)
    run = run_experiment.main(["--preset", "smoke", "--out", str(tmp_path), "--tasks", "mbpp", "--methods", "lora,pt"])
    assert list(run["failed"]) == ["tiny-phi-2/mbpp/lora"] and run["ran"] == ["tiny-phi-2/mbpp/pt"]
    assert seen[0][:2] == ("lora", "tune_foundation_model.py") and seen[1][:2] == ("pt", "tune_foundation_model.py")
    assert seen[1][2] == [True]  # freed before the next cell's first stage
    assert [s for _, s, _ in seen[1:]] == ["tune_foundation_model.py", "generate_preds.py", "postprocess_mbpp_preds.py",
                                           "evaluate_preds.py", "evaluate_preds.py"]
    assert len(collections) == 4  # lora's training and its failure; pt's training and generation


def test_a_stage_that_exits_with_an_error_line_fails_its_cell_with_that_line(tmp_path, monkeypatch):
    """The usual run-time failure of a real stage: a UserError that ``cli_entry`` turns into one line and exit 2."""
    from utils import experiment
    from utils.errors import UserError, cli_entry

    key, message = "tiny-phi-2/mbpp/lora", "model 'microsoft/phi-2' is unavailable: not in the local cache"
    _fake_stages(monkeypatch, fail=(key, "tune_foundation_model.py", UserError(message)))
    fake = experiment._script_main
    monkeypatch.setattr(experiment, "_script_main", lambda script: cli_entry(fake(script)))
    run = run_experiment.main(["--preset", "smoke", "--out", str(tmp_path), "--tasks", "mbpp", "--methods", "lora,pt"])
    assert run["failed"][key]["reason"] == f"exit status 2: error: {message}"
    assert run["ran"] == ["tiny-phi-2/mbpp/pt"] and not (tmp_path / "cells" / key / "result.json").exists()
    assert f"error: {message}" in (tmp_path / "cells" / key / "cell.log").read_text()


def test_an_interrupted_cell_counts_as_not_done(tmp_path, monkeypatch):
    key = "tiny-phi-2/mbpp/pt"
    _fake_stages(monkeypatch, fail=(key, "evaluate_preds.py", KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        run_experiment.main(["--preset", "smoke", "--out", str(tmp_path), "--tasks", "mbpp"])
    done = sorted(p.parent.name for p in (tmp_path / "cells/tiny-phi-2/mbpp").glob("*/result.json"))
    assert done == ["fft", "lora", "none"]
    _fake_stages(monkeypatch)
    again = run_experiment.main(["--preset", "smoke", "--out", str(tmp_path), "--tasks", "mbpp"])
    assert again["ran"] == [f"tiny-phi-2/mbpp/{m}" for m in ("pt", "idpg", "lopa")]


def test_an_interrupted_run_still_reports_the_cells_it_finished(tmp_path, monkeypatch, capsys):
    """Ctrl-C in the second cell left no results.md or results.png at all, for the first cell's finished result."""
    _fake_stages(monkeypatch, fail=("tiny-phi-2/mbpp/fft", "tune_fft_baseline.py", KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):  # still raised: the script exits non-zero
        run_experiment.main(["--preset", "smoke", "--out", str(tmp_path), "--tasks", "mbpp"])
    text = (tmp_path / "results.md").read_text()
    main_table = text.split("| MBPP stage 1 |")[0]
    rows = dict(re.findall(r"^\| (None|FFT|LoRA|PT|IDPG|LOPA) \| (\S+) \|$", main_table, re.M))
    assert rows == {"None": f"{100 * _score('mbpp', 'none'):.2f}", "FFT": "—", "LoRA": "—", "PT": "—", "IDPG": "—",
                    "LOPA": "—"}
    assert "- `tiny-phi-2/mbpp/fft`: no result" in text
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert f"stopped; the cells finished so far -> {tmp_path / 'results.md'}" in capsys.readouterr().err


def test_ctrl_c_while_the_report_is_written_says_the_cells_are_done(tmp_path, monkeypatch, capsys):
    """Stopped after every cell finished, while results.md or the plots were being written: the closing hint does
    not speak of an interrupted cell, and the rerun writes the report without running any cell."""
    import sys

    from utils import experiment_report

    _fake_stages(monkeypatch)
    argv = ["--preset", "smoke", "--out", str(tmp_path), "--tasks", "mbpp", "--methods", "none"]

    def stopped(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment_report, "plot_loss_curves", stopped)
    monkeypatch.setattr(sys, "excepthook", lambda *exc: None)
    with pytest.raises(KeyboardInterrupt) as info:
        run_experiment.main(argv)
    sys.excepthook(KeyboardInterrupt, info.value, None)
    assert capsys.readouterr().err.endswith("interrupted: every selected cell finished; rerun the same command to "
                                            "write results.md and the plots (it keeps every cell)\n")
    monkeypatch.undo()
    _fake_stages(monkeypatch)
    again = run_experiment.main(argv)
    assert again["ran"] == [] and (tmp_path / "results.md").is_file()


def test_runs_sharing_an_out_leave_each_other_the_cells_they_hold(tmp_path, monkeypatch, capsys):
    """Several runs may share --out (one per GPU): each cell runs under its own lock, so a cell another run holds is
    skipped, and one another run finished after this run started is kept, even under --force."""
    import os
    import time

    from utils import experiment
    from utils.fileio import try_lock

    _fake_stages(monkeypatch)
    argv = ["--preset", "smoke", "--out", str(tmp_path), "--tasks", "mbpp", "--methods", "none,pt"]
    held_dir = tmp_path / "cells/tiny-phi-2/mbpp/pt"
    held_dir.mkdir(parents=True)
    held, _ = try_lock(held_dir)  # another run is running pt
    try:
        first = run_experiment.main(argv)
    finally:
        held.close()
    assert first["ran"] == ["tiny-phi-2/mbpp/none"] and first["busy"] == ["tiny-phi-2/mbpp/pt"]
    assert f"tiny-phi-2/mbpp/pt: another run (pid {os.getpid()}) is running it" in capsys.readouterr().out
    assert run_experiment.main(argv)["ran"] == ["tiny-phi-2/mbpp/pt"]  # released: the next run does it
    # --force redoes both, unless another run finishes pt meanwhile (here: while this run does none)
    fake = experiment._script_main

    def finishing_pt_elsewhere(script):
        if script == "generate_preds.py":
            time.sleep(0.01)
            (held_dir / "result.json").touch()
        return fake(script)

    monkeypatch.setattr(experiment, "_script_main", finishing_pt_elsewhere)
    forced = run_experiment.main(argv + ["--force"])
    assert forced["ran"] == ["tiny-phi-2/mbpp/none"] and "tiny-phi-2/mbpp/pt" in forced["results"]


def test_a_bad_stage_argument_fails_before_any_cell_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_experiment.main(["--preset", "smoke", "--out", str(tmp_path), "--set", "gen.bogus=1"])
    assert exc.value.code == 2
    assert "generate_preds.py rejects its arguments (unrecognized arguments: --bogus 1)" in capsys.readouterr().err
    assert not (tmp_path / "cells").exists()


def test_sigterm_writes_the_report_of_the_finished_cells_as_ctrl_c_does_and_exits_143(tmp_path, monkeypatch, capsys):
    """SIGTERM (a scheduler's time limit) in the second cell's training: results.md and results.png still show the
    first cell, the line below the traceback says how to go on, and the next run redoes only the cells left."""
    import os
    import signal

    from utils import experiment

    _fake_stages(monkeypatch)
    fake = experiment._script_main

    def terminated_in_fft(script):
        def main(argv):
            if script == "tune_fft_baseline.py":
                os.kill(os.getpid(), signal.SIGTERM)
            return fake(script)(argv)
        return main

    monkeypatch.setattr(experiment, "_script_main", terminated_in_fft)
    argv = ["--preset", "smoke", "--out", str(tmp_path), "--tasks", "mbpp"]
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as in a shell: the runner takes it over
    try:
        with pytest.raises(SystemExit) as exit_status:
            run_experiment.main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert exit_status.value.code == 143
    assert "- `tiny-phi-2/mbpp/fft`: no result" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"
    err = capsys.readouterr().err
    assert f"stopped; the cells finished so far -> {tmp_path / 'results.md'}" in err
    assert "utils.errors.Terminated" in err
    assert err.endswith("\nterminated (SIGTERM): rerun the same command: stored cells are kept, and the interrupted "
                        "one goes on from its training's last checkpoint (or its finished training), its finished "
                        "generation batches and its scored samples\n")
    _fake_stages(monkeypatch)
    assert run_experiment.main(argv)["ran"] == [f"tiny-phi-2/mbpp/{m}" for m in ("fft", "lora", "pt", "idpg", "lopa")]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed interrupt itself
@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_ctrl_c_swallowed_inside_a_finalizer_still_stops_the_run(tmp_path, monkeypatch, signum):
    """Python drops a KeyboardInterrupt raised in ``__del__`` ("Exception ignored in ..."): seen mid-training. So it
    does the Terminated of a SIGTERM."""
    import os
    import signal

    from utils import experiment

    class SendsCtrlC:
        def __del__(self):
            os.kill(os.getpid(), getattr(signal, signum))

    _fake_stages(monkeypatch)
    fake = experiment._script_main

    def with_ctrl_c(script):
        if script == "generate_preds.py":
            SendsCtrlC()  # collected at once: the interrupt fires inside __del__ and Python ignores it
        return fake(script)

    monkeypatch.setattr(experiment, "_script_main", with_ctrl_c)
    # a suite started in the background inherits an ignored SIGINT, which the runner rightly leaves alone
    previous = signal.signal(signal.SIGINT, signal.default_int_handler), signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with pytest.raises(KeyboardInterrupt if signum == "SIGINT" else SystemExit) as stopped:
            run_experiment.main(["--preset", "smoke", "--out", str(tmp_path), "--tasks", "mbpp"])
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])
    assert signum == "SIGINT" or stopped.value.code == 143
    assert [p.parent.name for p in (tmp_path / "cells/tiny-phi-2/mbpp").glob("*/result.json")] == ["none"]


def test_outside_a_checkout_the_commit_comes_from_the_image(tmp_path, monkeypatch):
    from utils import experiment

    monkeypatch.setattr(experiment, "PROJECT_ROOT", tmp_path)  # no .git here, as in the Docker image
    monkeypatch.setenv("LOPA_GIT_COMMIT", "a" * 40)
    assert experiment.git_commit() == "a" * 40
    monkeypatch.delenv("LOPA_GIT_COMMIT")
    assert experiment.git_commit() == "unknown"


def test_a_cells_finished_training_is_reused_and_an_interrupted_one_resumes(tmp_path, monkeypatch):
    """A cell redone after a crash keeps what its training did (same configuration); --force starts afresh. A
    reused training keeps the commit that trained it, and results.md shows it."""
    from safetensors.torch import load_file

    from utils import experiment

    monkeypatch.setattr(experiment, "git_commit", lambda: "a" * 7)

    key = "tiny-phi-2/mbpp/pt"
    argv = ["--preset", "smoke", "--out", str(tmp_path), "--methods", "pt", "--tasks", "mbpp",
            "--set", "save_every=1steps"]
    cell = tmp_path / "cells" / key
    adapter = cell / "train" / "final" / "adapter_model.safetensors"

    def run(*extra):
        out = run_experiment.main(argv + list(extra))
        assert out["ran"] == [key]
        return out["results"][key]

    assert run()["training"] == "fresh"
    trained = load_file(adapter)
    assert (cell / "train" / "checkpoints" / "step_00000003").is_dir()

    (cell / "result.json").unlink()  # died after training (say, in generation)
    monkeypatch.setattr(experiment, "git_commit", lambda: "b" * 7)  # and the code changed before the rerun
    reused = run()
    assert (reused["training"], reused["training_commits"], reused["git_commit"]) == ("reused", ["a" * 7], "b" * 7)
    data = pathlib.Path(reused["data_file"])
    assert reused["data_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    report = (tmp_path / "results.md").read_text()
    assert "commit `bbbbbbb`; training reused from an earlier attempt (commits `aaaaaaa`)" in report
    assert "**The cells come from 2 different commits** (`aaaaaaa`, `bbbbbbb`)" in report
    assert "=== attempt started" in (cell / "cell.log").read_text() and "training: reused" in (
        cell / "cell.log").read_text()

    # died in generation: the same commands on the reused training go on from its finished batches
    predictions, progress = cell / "gen" / "mbxp_solutions.jsonl", cell / "gen" / "generation_progress.jsonl"
    generated, batches = predictions.read_bytes(), progress.read_text().splitlines(keepends=True)
    progress.write_text(batches[0])
    predictions.unlink()
    (cell / "result.json").unlink()
    assert run()["training"] == "reused"
    attempt_log = (cell / "cell.log").read_text().split("=== attempt started")[-1]
    generate = next(line for line in attempt_log.splitlines() if line.startswith("$ python generate_preds.py"))
    assert generate.endswith(" --resume") and predictions.read_bytes() == generated
    kept = len(json.loads(batches[0])["predictions"])
    assert re.search(rf"\b\d+ tasks \({kept} resumed, \d+ generated", attempt_log), attempt_log

    # new scoring settings alone: the stored predictions are kept (generation goes on from all its batches) and
    # scored again
    rescored = run("--set", "eval.timeout=6")
    attempt_log = (cell / "cell.log").read_text().split("=== attempt started")[-1]
    generate = next(line for line in attempt_log.splitlines() if line.startswith("$ python generate_preds.py"))
    assert generate.endswith(" --resume") and predictions.read_bytes() == generated
    tasks = len(generated.splitlines())
    assert f"{tasks} tasks ({tasks} resumed, 0 generated" in attempt_log, attempt_log
    assert rescored["training"] == "reused" and any("--timeout 6" in c for c in rescored["commands"])

    # killed once the cell was cleared, before its new attempt.json: the old one is kept, and with it the training
    def killed(path, text):
        raise KeyboardInterrupt
    monkeypatch.setattr(experiment, "atomic_write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        run_experiment.main(argv + ["--set", "gen.max_new_tokens=16"])
    monkeypatch.undo()
    monkeypatch.setattr(experiment, "git_commit", lambda: "b" * 7)
    assert (cell / "train" / "final").is_dir() and run()["training"] == "reused"

    (cell / "result.json").unlink()  # died after the last checkpoint, before final/
    shutil.rmtree(cell / "train" / "final")
    shutil.rmtree(cell / "gen")
    result = run()
    assert (result["training"], result["training_commits"]) == ("resumed", ["a" * 7, "b" * 7])  # steps from both
    assert "training resumed (commits `aaaaaaa`, `bbbbbbb`)" in (tmp_path / "results.md").read_text()
    assert f"--resume_from {cell / 'train'}" in (cell / "cell.log").read_text()
    assert result["commands"] == json.loads((cell / "result.json").read_text())["commands"]
    assert not any("--resume_from" in c for c in result["commands"])  # the cell's identity is unchanged
    for name, tensor in load_file(adapter).items():
        assert tensor.equal(trained[name]), name

    # new decoding settings redo generation and scoring, not the training
    assert run("--set", "gen.max_new_tokens=16")["training"] == "reused"
    assert run("--force")["training"] == "fresh"

    # records of the version before training_commits: attempt.json's single commit is kept, and so is result.json's
    attempt = cell / "attempt.json"
    attempt.write_text(json.dumps({"training_hash": json.loads(attempt.read_text())["training_hash"],
                                   "training_commit": "d" * 7}))
    (cell / "result.json").unlink()
    assert run()["training_commits"] == ["d" * 7]
    stored = json.loads((cell / "result.json").read_text())
    del stored["training_commits"]
    (cell / "result.json").write_text(json.dumps({**stored, "training_commit": "c" * 7}))
    assert run_experiment.main(argv)["ran"] == []  # kept: the report is written from the stored record
    report = (tmp_path / "results.md").read_text()
    assert "training reused from an earlier attempt (commits `ccccccc`)" in report
    assert "**The cells come from 2 different commits** (`bbbbbbb`, `ccccccc`)" in report


def test_only_the_stages_up_to_generation_make_a_cells_generation_hash(tmp_path):
    """attempt.json's generation hash decides whether a rerun keeps a cell's predictions: new scoring settings leave
    it as it is in every cell (CRUXEval scores right after generating, MBPP post-processes first), new decoding
    settings change it and leave the training's."""
    from utils.experiment_plan import plan_cells
    from utils.presets import PRESETS, apply_overrides

    def cells(*overrides):
        return {c.key: c for c in plan_cells(apply_overrides(PRESETS["smoke"](), list(overrides)), tmp_path)}

    base, rescored, decoded = cells(), cells("eval.timeout=6"), cells("gen.max_new_tokens=16")
    assert {c.task for c in base.values()} == set(TASK_ORDER)
    for key, cell in base.items():
        assert rescored[key].config_hash() != cell.config_hash(), key
        assert rescored[key].generation_hash() == cell.generation_hash(), key
        assert decoded[key].generation_hash() != cell.generation_hash(), key
        assert decoded[key].training_hash() == cell.training_hash(), key


def test_results_md_keeps_the_cells_outside_the_selection(tmp_path, monkeypatch):
    _fake_stages(monkeypatch)
    run_experiment.main(["--preset", "smoke", "--out", str(tmp_path)])
    again = run_experiment.main(["--preset", "smoke", "--out", str(tmp_path), "--methods", "lopa", "--force"])
    assert sorted(again["ran"]) == sorted(f"tiny-phi-2/{t}/lopa" for t in TASK_ORDER)
    table = _table((tmp_path / "results.md").read_text())
    assert list(table) == ["None", "FFT", "LoRA", "PT", "IDPG", "LOPA"]
    assert table["LoRA"] == ["3.00", "13.00", "23.00"] and table["LOPA"] == ["6.00", "16.00", "26.00"]
    # stored cells of another configuration are not shown: a new training lr changes every cell but the untuned
    # ones and FFT's (the smoke preset sets FFT's own lr)
    run_experiment.main(["--preset", "smoke", "--out", str(tmp_path), "--methods", "lopa", "--set", "train.lr=0.5"])
    assert list(_table((tmp_path / "results.md").read_text())) == ["None", "FFT", "LOPA"]


def test_results_md_sets_the_papers_numbers_beside_ours(tmp_path, monkeypatch):
    _fake_stages(monkeypatch)
    run_experiment.main(["--preset", "paper-phi-2", "--out", str(tmp_path), "--tasks", "mbpp,cruxeval_input_prediction",
                         "--methods", "pt,lopa"])
    text = (tmp_path / "results.md").read_text()
    assert "Against the paper (the README's table" in text
    for name, method, paper in (("PT", "pt", (35.0, 49.69)), ("LOPA", "lopa", (43.0, 52.15))):
        # MBPP: both stages' mean, as the paper scored the original's interleaved file
        ours = [100 * _score("cruxeval_input_prediction", method),
                50 * (_score("mbpp", method) + _score("mbpp", method, "stage2"))]
        row = f"| {name} | {paper[0]:.2f} / {ours[0] - paper[0]:+.2f} | {paper[1]:.2f} / {ours[1] - paper[1]:+.2f} |"
        assert row in text.splitlines()
    assert "| PT | 35.00 / -31.00 | 49.69 / -31.69 |" in text  # the same, written out once


def test_the_paper_group_runs_every_models_preset_into_one_table(tmp_path, monkeypatch, capsys):
    _fake_stages(monkeypatch)
    from utils.presets import PAPER_MODELS

    result = run_experiment.main(["--preset", "paper", "--out", str(tmp_path), "--tasks", "mbpp",
                                  "--methods", "pt,fft"])
    assert sorted(result["ran"]) == sorted([f"{m}/mbpp/pt" for m in PAPER_MODELS] + ["phi-2/mbpp/fft"])
    text = (tmp_path / "results.md").read_text()
    sections = text.split("## Provenance")[0].split("\n## ")[1:]
    assert [s.splitlines()[0] for s in sections] == list(PAPER_MODELS)
    for section in sections:  # a model's rows are its own methods: FFT only where the preset has it
        rows = re.findall(r"^\| (FFT|PT) \| ([\d.]+) \|$", section, re.M)
        assert rows == ([("FFT", "22.00")] if section.startswith("phi-2\n") else []) + [("PT", "24.00")]
        assert "Against the paper" in section
    # the group's cells are its members' own: the single-model preset finds them stored
    again = run_experiment.main(["--preset", "paper-phi-3", "--out", str(tmp_path), "--tasks", "mbpp",
                                 "--methods", "pt"])
    assert again["ran"] == [] and again["results"]["phi-3/mbpp/pt"]["pass@1"] == _score("mbpp", "pt")
    with pytest.raises(SystemExit) as exc:
        run_experiment.main(["--preset", "paper", "--out", str(tmp_path), "--models", "phi-3,tiny-phi-2"])
    assert exc.value.code == 2 and "--models 'phi-3,tiny-phi-2': choose from codegen-350M" in capsys.readouterr().err


def test_the_paper_group_narrowed_to_one_model_still_shows_the_others_stored_cells(tmp_path, monkeypatch):
    """--models selects what runs, not what is shown (README): a group narrowed to phi-3 keeps the other models."""
    _fake_stages(monkeypatch)
    from utils.presets import PAPER_MODELS

    common = ["--preset", "paper", "--out", str(tmp_path), "--tasks", "mbpp", "--methods", "pt"]
    run_experiment.main(common)
    result = run_experiment.main([*common, "--models", "phi-3", "--force"])
    assert result["ran"] == ["phi-3/mbpp/pt"] and len(result["results"]) == len(PAPER_MODELS)
    text = (tmp_path / "results.md").read_text()
    sections = text.split("## Provenance")[0].split("\n## ")[1:]
    assert [s.splitlines()[0] for s in sections] == list(PAPER_MODELS)
    assert all(re.search(r"^\| PT \| 24\.00 \|$", s, re.M) for s in sections)


def test_a_local_copy_of_one_groups_model_leaves_the_others_stored_cells_shown(tmp_path, monkeypatch):
    """The README's earlier Phi-3 (--set model_path=DIR) within the paper's table: DIR is phi-3's, so it is no
    setting of the other models' cells, whose stored results the table kept hiding (their hash took DIR too)."""
    _fake_stages(monkeypatch)
    from utils.presets import PAPER_MODELS

    common = ["--preset", "paper", "--out", str(tmp_path), "--tasks", "mbpp", "--methods", "pt"]
    run_experiment.main(common)
    local = tmp_path / "phi-3-april"
    local.mkdir()
    (local / "config.json").write_text('{"model_type": "phi3"}')
    result = run_experiment.main([*common, "--models", "phi-3", "--set", f"model_path={local}"])
    assert result["ran"] == ["phi-3/mbpp/pt"] and sorted(result["results"]) == sorted(
        f"{m}/mbpp/pt" for m in PAPER_MODELS)
    assert all(f"--model_path {local}" in c for c in result["results"]["phi-3/mbpp/pt"]["commands"][:2])
    text = (tmp_path / "results.md").read_text()
    assert [s.splitlines()[0] for s in text.split("## Provenance")[0].split("\n## ")[1:]] == list(PAPER_MODELS)


def test_a_group_selection_that_matches_no_cell_is_refused(tmp_path, monkeypatch, capsys):
    _fake_stages(monkeypatch)
    with pytest.raises(SystemExit) as exc:  # the paper has FFT for phi-2 only, so paper-phi-3 does not list it
        run_experiment.main(["--preset", "paper", "--out", str(tmp_path), "--methods", "fft", "--models", "phi-3"])
    assert exc.value.code == 2 and "no member preset has the selected" in capsys.readouterr().err
    assert not (tmp_path / "results.md").exists()


def test_plan_lists_stored_and_pending_cells_and_runs_nothing(tmp_path, monkeypatch, capsys):
    _fake_stages(monkeypatch)
    run_experiment.main(["--preset", "smoke", "--out", str(tmp_path), "--tasks", "mbpp", "--methods", "pt"])
    report = (tmp_path / "results.md").read_text()
    capsys.readouterr()
    plan = run_experiment.main(["--preset", "smoke", "--out", str(tmp_path), "--tasks", "mbpp",
                                "--methods", "pt,lopa", "--plan"])
    assert plan["stored"] == ["tiny-phi-2/mbpp/pt"] and plan["planned"] == ["tiny-phi-2/mbpp/pt", "tiny-phi-2/mbpp/lopa"]
    printed = capsys.readouterr().out
    assert "[1/2] tiny-phi-2/mbpp/pt: stored, kept" in printed and "[2/2] tiny-phi-2/mbpp/lopa: to run" in printed
    assert "python tune_foundation_model.py --peft_method lopa" in printed
    assert printed.rstrip().endswith("2 cells: 1 stored, 1 to run (1 with a training to run)")
    assert (tmp_path / "results.md").read_text() == report and not (tmp_path / "cells/tiny-phi-2/mbpp/lopa").exists()
    # other settings: the plan says what the run would throw away of the stored cell, and what it reuses
    (tmp_path / "cells/tiny-phi-2/mbpp/pt/train/final").mkdir(parents=True)
    score = f"pass@1 {100 * _score('mbpp', 'pt', 'stage1'):.2f}"
    for flag, status, count in (
            ("gen.max_new_tokens=20", f"to run; replaces its stored result of other settings, {score}; its training "
                                      f"is reused", "(0 with a training to run, 1 reusing a finished one)"),
            ("pt.lr=0.01", f"to run; replaces its stored result of other settings, {score}; its training (other "
                           f"settings) is deleted", "(1 with a training to run)")):
        run_experiment.main(["--preset", "smoke", "--out", str(tmp_path), "--tasks", "mbpp", "--methods", "pt",
                             "--set", flag, "--plan"])
        printed = capsys.readouterr().out
        assert f"[1/1] tiny-phi-2/mbpp/pt: {status}\n" in printed, printed
        assert f"1 cells: 0 stored, 1 to run {count}\n1 of them replace a stored result of other settings" in printed
    run_experiment.main(["--preset", "smoke", "--out", str(tmp_path), "--tasks", "mbpp", "--methods", "pt",
                         "--set", "pt.lr=0.01"])  # and the run says so as it starts the cell
    assert (f"[1/1] tiny-phi-2/mbpp/pt: running (replaces its stored result of other settings, {score}; its "
            f"training (other settings) is deleted)\n") in capsys.readouterr().out
    fresh = tmp_path / "never"
    assert run_experiment.main(["--preset", "paper", "--out", str(fresh), "--plan"])["stored"] == []
    assert not fresh.exists()


def test_plan_names_no_deleted_training_where_none_is_left_and_reads_an_odd_attempt_file_as_none(tmp_path, monkeypatch,
                                                                                                capsys):
    """A stored cell whose train/ is gone (removed to free disk, say) under other training settings: the plan says
    its result is replaced, not that a training is deleted. An attempt.json that holds no JSON object (edited by
    hand, or cut short) counts as no attempt: a fresh training, no crash."""
    _fake_stages(monkeypatch)
    args = ["--preset", "smoke", "--out", str(tmp_path), "--tasks", "mbpp", "--methods", "pt"]
    run_experiment.main(args)
    cell = tmp_path / "cells/tiny-phi-2/mbpp/pt"
    shutil.rmtree(cell / "train", ignore_errors=True)
    score = f"pass@1 {100 * _score('mbpp', 'pt', 'stage1'):.2f}"
    for attempt in (None, "[1, 2]\n", "null\n"):
        if attempt is not None:
            (cell / "attempt.json").write_text(attempt)
        capsys.readouterr()
        run_experiment.main(args + ["--set", "pt.lr=0.01", "--plan"])
        printed = capsys.readouterr().out
        assert f"[1/1] tiny-phi-2/mbpp/pt: to run; replaces its stored result of other settings, {score}\n" in printed
        assert "(1 with a training to run)" in printed, attempt


@pytest.mark.parametrize("damage", ["cut short", "pass@1 as text", "not an object"])
def test_a_damaged_or_hand_edited_result_json_is_redone_not_a_crash_of_every_run(tmp_path, monkeypatch, capsys,
                                                                                   damage):
    """A result.json that no longer holds a result the table can show (cut short by a copy, edited by hand) made
    every run of the --out, --plan and the report of an unselected cell stop with a traceback (JSONDecodeError,
    TypeError, AttributeError). It counts as no result, with a warning naming the file: the plan lists the cell to
    run, the report of another selection leaves it out, and a run redoes that cell alone."""
    _fake_stages(monkeypatch)
    args = ["--preset", "smoke", "--out", str(tmp_path), "--tasks", "mbpp", "--methods", "pt,lora"]
    run_experiment.main(args)
    path = tmp_path / "cells/tiny-phi-2/mbpp/pt/result.json"
    text = path.read_text()
    path.write_text({"cut short": text[:60], "pass@1 as text": text.replace('"pass@1": 0.24', '"pass@1": "24%"'),
                     "not an object": "[" + text + "]"}[damage])
    assert path.read_text() != text
    capsys.readouterr()
    assert run_experiment.main(args + ["--plan"])["stored"] == ["tiny-phi-2/mbpp/lora"]
    printed = capsys.readouterr()
    assert "[1/2] tiny-phi-2/mbpp/pt: to run" in printed.out
    assert f"warning: {path}: " in printed.err and "it counts as no result" in printed.err
    report = run_experiment.main(args[:-2] + ["--methods", "lora"])  # pt is outside the selection: not shown
    assert report["ran"] == [] and "`tiny-phi-2/mbpp/pt`" not in (tmp_path / "results.md").read_text()
    assert f"warning: {path}: " in capsys.readouterr().err
    again = run_experiment.main(args)
    assert again["ran"] == ["tiny-phi-2/mbpp/pt"] and again["failed"] == {}
    assert json.loads(path.read_text())["pass@1"] == _score("mbpp", "pt")
    shown = re.search(r"^\| PT \| (\S+) \|$", (tmp_path / "results.md").read_text(), re.M).group(1)
    assert shown == f"{100 * _score('mbpp', 'pt'):.2f}"


def test_every_in_process_stage_compiles_its_decoder_layers(monkeypatch):
    """Stages run in one process, and every transformers decoder layer shares one wrapper's code object, whose
    compiled entries torch caps (8 by default; 2 here, so that three cells show it): without a reset between
    stages, the later cells' layers ran eager (seen: the fifth of a real run_experiment sequence)."""
    import torch

    from custom_peft import build_model
    from tests.test_fast_paths import _batch
    from utils import experiment
    from utils.fast_paths import compile_layers

    compiled = []

    def counting_backend(gm, example_inputs):
        compiled[-1] += 1
        return gm.forward

    def stage(method, model_type):
        def main(argv):
            model, tok = build_model(method, model_type, num_virtual_tokens=2, seed=0)
            compile_layers(model.lm, backend=counting_backend)
            model(**_batch(tok)).loss.backward()
        return main

    cells = [("pt", "tiny-llama"), ("lora", "tiny-phi-2"), ("pt", "tiny-codegen")]
    with torch._dynamo.config.patch(recompile_limit=2):
        for method, model_type in cells:
            monkeypatch.setattr(experiment, "_script_main", lambda script: stage(method, model_type))
            compiled.append(0)
            experiment._run_stage("tune_foundation_model.py", [])
    assert min(compiled) >= 1, compiled  # without the reset: [1, 1, 0]


@pytest.mark.parametrize("setting, message", [
    ("gen.temperature=-1", "--temperature must be a finite number >= 0"),
    ("gen.max_new_tokens=0", "--max_new_tokens must be >= 1, got 0"),
    ("gen.top_k=-1", "--top_k must be >= 0 (0 turns it off), got -1"),
])
def test_a_bad_generation_value_fails_the_plan(tmp_path, capsys, setting, message):
    """These passed --plan (and the trainings of a real run) and failed only at each cell's generation."""
    with pytest.raises(SystemExit) as exc:
        run_experiment.main(["--preset", "smoke", "--out", str(tmp_path), "--plan", "--set", setting,
                             "--set", "gen.temperature=0.2"] if "top_k" in setting else
                            ["--preset", "smoke", "--out", str(tmp_path), "--plan", "--set", setting])
    assert exc.value.code == 2
    assert f"generate_preds.py rejects its arguments ({message}" in capsys.readouterr().err


def test_an_eval_k_without_1_fails_the_plan(tmp_path, capsys):
    """The table reports pass@1: without k = 1 the first cell crashed after its scoring (KeyError), and the run
    with it, before any results.md."""
    with pytest.raises(SystemExit) as exc:
        run_experiment.main(["--preset", "smoke", "--out", str(tmp_path), "--plan", "--set", "eval.k=2"])
    assert exc.value.code == 2
    assert "evaluate_preds.py rejects its arguments (--k 2: the results table reports pass@1, so k must include 1 " \
           "(--set eval.k=1,2))" in capsys.readouterr().err


def test_a_data_file_the_stages_cannot_read_fails_the_plan_once(tmp_path, capsys, data_paths):
    """A malformed line, or a file without the test split, failed every cell in turn, each after loading its model;
    the check before any cell reads each split the stages will read and names the file and line."""
    good = pathlib.Path(data_paths["mbpp"]).read_text().splitlines()
    cases = {"broken line": (good[:5] + ["{not json"] + good[5:], "bad.jsonl:6: not valid JSON"),
             "no test split": ([line for line in good if json.loads(line)["task_id"] not in
                                {f"MBPP/{n}" for n in range(488, 975)}],  # the paper's test ids
                               "the test split is empty")}
    for label, (lines, message) in cases.items():
        path = tmp_path / "bad.jsonl"
        path.write_text("\n".join(lines) + "\n")
        with pytest.raises(SystemExit) as exc:
            run_experiment.main(["--preset", "smoke", "--out", str(tmp_path / "out"), "--plan", "--tasks", "mbpp",
                                 "--mbpp_data", str(path)])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err and "cannot read its data" in err, (label, err)
        assert err.count("\n") == 1, err  # one line, not one per cell
    assert not (tmp_path / "out").exists()


def test_set_mbpp_split_keeps_the_stored_cruxeval_trainings(tmp_path, monkeypatch, capsys):
    """--set mbpp_split=standard changes no CRUXEval data or prompt, so a stored CRUXEval cell (and its training) is
    kept: CRUXEval's commands carry no --mbpp_split (which its scripts now refuse), so the cell's hash is unchanged."""
    _fake_stages(monkeypatch)
    args = ["--preset", "smoke", "--out", str(tmp_path), "--tasks", "cruxeval_output_prediction", "--methods", "pt"]
    run_experiment.main(args)
    capsys.readouterr()
    plan = run_experiment.main(args + ["--set", "mbpp_split=standard", "--plan"])
    printed = capsys.readouterr().out
    assert plan["stored"] == ["tiny-phi-2/cruxeval_output_prediction/pt"], printed


def test_a_cell_interrupted_in_its_stage_2_scoring_reuses_its_finished_stage_1_scoring(tmp_path, monkeypatch,
                                                                                        capsys):
    """Ctrl-C while MBPP's stage 2 is scored: the rerun keeps the generation (its batches) and reuses stage 1's
    finished scoring (same predictions, programs and settings: its summary's fingerprint) instead of running its
    samples again (before: all of them ran again, MBPP's 15 s timeout each at worst); only stage 2 is scored."""
    from utils import evaluation

    real, scorings, interrupted = evaluation.run_samples, [], []

    def stage_2_interrupted(samples, sandbox, *args, reused=None, **kwargs):
        scorings.append((len(samples), len(reused or {})))
        if len(scorings) == 2 and not interrupted:  # the first run's stage 2
            interrupted.append(True)
            raise KeyboardInterrupt
        return real(samples, sandbox, *args, reused=reused, **kwargs)

    monkeypatch.setattr(evaluation, "run_samples", stage_2_interrupted)
    argv = ["--preset", "smoke", "--out", str(tmp_path), "--methods", "none", "--tasks", "mbpp"]
    with pytest.raises(KeyboardInterrupt):
        run_experiment.main(argv)
    gen = tmp_path / "cells" / "tiny-phi-2" / "mbpp" / "none" / "gen"
    stage1 = (gen / "mbxp_solutions_stage1_results.jsonl").read_text()
    assert not (gen / "mbxp_solutions_stage2_results.jsonl").exists()

    scorings.clear()
    capsys.readouterr()
    assert run_experiment.main(argv)["ran"] == ["tiny-phi-2/mbpp/none"]
    assert scorings == [(EXPECTED_TASKS, EXPECTED_TASKS), (EXPECTED_TASKS, 0)]  # stage 1 reused, stage 2 scored
    assert (f"reusing: {EXPECTED_TASKS} of {EXPECTED_TASKS} samples already scored with these predictions, "
            f"programs and settings in {gen / 'mbxp_solutions_stage1_results.jsonl'}") in capsys.readouterr().out
    assert (gen / "mbxp_solutions_stage1_results.jsonl").read_text() == stage1
    attempt_log = (tmp_path / "cells/tiny-phi-2/mbpp/none/cell.log").read_text().split("=== attempt started")[-1]
    assert attempt_log.count("--reuse_finished") == 2  # on both scorings' command lines, not in the cell's commands
    result = json.loads((tmp_path / "cells/tiny-phi-2/mbpp/none/result.json").read_text())
    assert not any("--reuse_finished" in c for c in result["commands"])
