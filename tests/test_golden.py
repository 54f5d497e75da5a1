"""Golden numbers: a few real optimizer steps of every method, compared with stored values.

Each case trains a tiny model on the project's own fixture records (the same on every machine, with or without
../shared/data) and compares the per-step loss and gradient norm in metrics.jsonl with ``tests/golden.json``.
A change anywhere on the training path (data encoding, masks, the prompt modules, dropout, the loss, the
optimizer, the schedule) moves these numbers. When a change is meant to move them, regenerate the file and say
why in the commit:

    python -m tests.test_golden --update

The numbers belong to the library versions they were recorded with (requirements.txt pins them): another
transformers may initialise a tiny model differently (seen: tiny-codegen's attention weights under 5.17, with
the same forward), so on another stack the test skips and says so.
"""
from __future__ import annotations

import json
import pathlib
import sys
import tempfile

import pytest

GOLDEN = pathlib.Path(__file__).with_name("golden.json")
# method -> (task, model type, extra flags); large learning rates so that every step moves the loss visibly
CASES = {
    "pt": ("mbpp", "tiny-llama", ["--peft_method", "pt", "--lr", "0.3"]),
    "lopa": ("mbpp", "tiny-phi-2", ["--peft_method", "lopa", "--lr", "0.3"]),
    "lopa-cruxeval": ("cruxeval_output_prediction", "tiny-llama", ["--peft_method", "lopa", "--lr", "0.3"]),
    "idpg": ("mbpp", "tiny-codegen", ["--peft_method", "idpg", "--lr", "0.01"]),
    "lora": ("mbpp", "tiny-llama", ["--peft_method", "lora", "--lr", "0.03"]),
    "fft": ("cruxeval_input_prediction", "tiny-llama", ["--lr", "3e-3"]),
}
LIBRARIES = ("torch", "transformers", "peft", "accelerate")
REL = 1e-4  # summation order (thread count, library version) moves fp32 losses by ~1e-6 relative, a real change far more


def run_case(name: str, directory: pathlib.Path) -> dict:
    from tests.test_training_runs import run_inprocess
    from utils import fixtures
    from utils.registry import METHOD_FLAGS
    from utils.train_logging import read_metrics

    task, model_type, extra = CASES[name]
    data = fixtures.write_fixture_data(directory / "data")["mbpp" if task == "mbpp" else "cruxeval"]
    log_dir = directory / name
    method = extra[1] if extra[0] == "--peft_method" else "fft"
    argv = ["--task_name", task, "--model_type", model_type, "--data_path", data, "--limit_train_examples", "6",
            "--per_gpu_train_batch_size", "2", "--num_epochs", "2", "--max_length", "96", "--log_dir", str(log_dir)]
    for flag, value in (("enc_model_type", "tiny-roberta"), ("num_virtual_tokens", "4")):
        if method in METHOD_FLAGS[flag]:  # the trainers refuse another method's flags
            argv += [f"--{flag}", value]
    run_inprocess("fft" if name == "fft" else "peft", argv + extra)
    records = read_metrics(log_dir / "metrics.jsonl")
    return {"loss": [r["loss"] for r in records], "grad_norm": [r["grad_norm"] for r in records]}


def versions() -> dict:
    import importlib.metadata

    return {lib: importlib.metadata.version(lib) for lib in LIBRARIES}


@pytest.mark.parametrize("name", list(CASES))
def test_training_numbers_match_the_stored_ones(tmp_path, name):
    stored = json.loads(GOLDEN.read_text())
    if stored["versions"] != versions():
        pytest.skip(f"tests/golden.json was recorded with {stored['versions']}, this is {versions()}: rerun "
                    f"`python -m tests.test_golden --update` on this stack to compare")
    golden = stored["cases"][name]
    got = run_case(name, tmp_path)
    assert len(got["loss"]) == len(golden["loss"]) == 6
    assert got["loss"] == pytest.approx(golden["loss"], rel=REL), (name, got["loss"])
    assert got["grad_norm"] == pytest.approx(golden["grad_norm"], rel=REL), (name, got["grad_norm"])
    assert got["loss"][-1] < got["loss"][0]  # the stored numbers are a run that learns


def main() -> None:
    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python -m tests.test_golden --update   (rewrites tests/golden.json)")
    import tests.conftest  # noqa: F401  (offline settings)

    with tempfile.TemporaryDirectory() as tmp:
        values = {name: run_case(name, pathlib.Path(tmp)) for name in CASES}
    GOLDEN.write_text(json.dumps({"versions": versions(), "cases": values}, indent=1) + "\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    main()
