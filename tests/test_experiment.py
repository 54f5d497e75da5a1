"""run_experiment.py --preset smoke: all 18 cells through the real scripts, caching, provenance."""
import json
import re

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
    assert [r[0] for r in rows] == ["None", "FFT", "LoRA", "PT", "IDPG", "LOPA"]
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
