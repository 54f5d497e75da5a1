"""generate_preds.py and utils/generation.py: batch-size invariance for every method, per-row stopping,
two-process sharding, output formats, and resume after a crash."""
import json
import os
import pathlib
import random
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import generate_preds
from custom_peft import build_model, save_adapter
from tests.conftest import ROOT
from utils import tuned_models
from utils.data import load_task_split
from utils.errors import UserError
from utils.generation import GenConfig, generate_batch, generate_predictions, resolve_gen_config, shard_batches
from utils.batching import Collator, TaskDataset
from utils.models import load_tokenizer
from utils.postprocess import cut_at_stop
from utils.prediction_files import (CRUXEVAL_FILES, MBPP_FILES, PROGRESS_FILE, ProgressLog, check_resumable,
                                    validate_prediction_files, write_predictions)
from utils.stopping import StopOnText, window_tokens
from utils.tasks import CRUXEVAL_STOP_SEQUENCES, MBPP_STOP_SEQUENCES, get_task

PY = sys.executable
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
NEW_TOKENS = 12
# (method, foundation model, task): both tokenizer styles (phi: EOS=PAD=BOS; llama: BOS added, own PAD) and all tasks.
CASES = [("none", "tiny-llama", "mbpp"), ("fft", "tiny-phi-2", "cruxeval_output_prediction"),
         ("lora", "tiny-llama", "cruxeval_input_prediction"), ("pt", "tiny-phi-2", "mbpp"),
         ("idpg", "tiny-llama", "mbpp"), ("lopa", "tiny-phi-2", "cruxeval_output_prediction")]


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(data_paths, task_name):
    return data_paths["mbpp" if task_name == "mbpp" else "cruxeval"]


def _perturb(model, seed: int, scale: float) -> None:
    """Move the trainable weights away from their init, as training would (LoRA's B starts at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.trainable_named_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """method -> directory: adapters saved with custom_peft.save_adapter, and an FFT model directory."""
    out = tmp_path_factory.mktemp("saved")
    dirs = {}
    for method, model_type, _ in CASES:
        if method == "none":
            continue
        model, tok = build_model(method, model_type, num_virtual_tokens=4, enc_model_type="tiny-roberta", seed=5)
        _perturb(model, 11, 0.02 if method == "fft" else 0.3)
        dirs[method] = out / method
        if method == "fft":
            model.lm.save_pretrained(dirs[method])
            tok.save_pretrained(dirs[method])
        else:
            save_adapter(model, dirs[method])
    return dirs


def _load(method, model_type, task_name, saved_models, data_paths, extra=()):
    argv = ["--task_name", task_name, "--model_type", model_type, "--data_path", _data(data_paths, task_name)]
    if method in ("lora", "pt", "idpg", "lopa"):
        argv += ["--load_adapter_from", str(saved_models[method])]
    elif method == "fft":
        argv += ["--peft_method", "fft", "--load_base_from_path", str(saved_models["fft"])]
    args = generate_preds.build_parser().parse_args(argv + list(extra))
    resolved = tuned_models.resolve_method(args)
    assert resolved == method  # inferred from adapter_config.json / the checkpoint flags
    return tuned_models.load_model(args, resolved)


def test_a_run_tuned_on_another_task_is_named_in_a_warning(tmp_path, capsys):
    """A training run's final/ holds its resolved config (training_config.json); generating for another task is
    allowed (a transfer experiment) but warned about, for adapters and FFT models alike. Directories without the
    file, or with one that is not ours, say nothing."""
    adapter, fft, bare, odd = (tmp_path / name for name in ("adapter", "fft", "bare", "odd"))
    for directory in (adapter, fft, bare, odd):
        directory.mkdir()
    for directory in (adapter, fft):
        (directory / "training_config.json").write_text(json.dumps({"model": {"task_name": "mbpp"}}))
    (odd / "training_config.json").write_text("[1, 2]")

    def warning(task, *flags):
        args = generate_preds.build_parser().parse_args(["--task_name", task, "--model_type", "tiny-phi-2", *flags])
        return tuned_models.warn_if_tuned_for_another_task(args)

    message = warning("cruxeval_input_prediction", "--load_adapter_from", str(adapter))
    assert message == (f"warning: {adapter} was tuned on mbpp (training_config.json), and this run generates for "
                       f"cruxeval_input_prediction; if that is not meant, pass the run trained on "
                       f"cruxeval_input_prediction")
    assert message in capsys.readouterr().err
    assert "tuned on mbpp" in warning("cruxeval_output_prediction", "--peft_method", "fft", "--load_base_from_path",
                                      str(fft))
    capsys.readouterr()
    assert warning("mbpp", "--load_adapter_from", str(adapter)) is None
    assert warning("cruxeval_input_prediction", "--load_adapter_from", str(bare)) is None
    assert warning("cruxeval_input_prediction", "--load_adapter_from", str(odd)) is None
    assert warning("mbpp") is None and capsys.readouterr().err == ""  # the untuned model


def test_a_full_fine_tunings_final_dir_given_as_model_path_is_fft_not_the_untuned_model(tmp_path):
    """docs/TRAINING.md offers --model_path for an FFT final/: without --peft_method the run was recorded as the
    untuned model ("none"), and the wrong-task warning kept quiet."""
    fft, plain = tmp_path / "fft", tmp_path / "plain"
    for directory in (fft, plain):
        directory.mkdir()
    (fft / "training_config.json").write_text(json.dumps({"model": {"method": "fft", "task_name": "mbpp"}}))

    def method(directory, *flags):
        args = generate_preds.build_parser().parse_args(["--task_name", "cruxeval_input_prediction", "--model_type",
                                                         "tiny-phi-2", "--model_path", str(directory), *flags])
        return tuned_models.resolve_method(args)

    assert method(fft) == "fft" and method(plain) == "none" and method(fft, "--peft_method", "none") == "none"
    args = generate_preds.build_parser().parse_args(["--task_name", "cruxeval_input_prediction", "--model_type",
                                                     "tiny-phi-2", "--model_path", str(fft)])
    assert "was tuned on mbpp" in tuned_models.warn_if_tuned_for_another_task(args)


def test_predictions_from_a_run_tuned_on_the_other_mbpp_split_are_refused(tmp_path):
    """Each MBPP split's train tasks overlap the other's test tasks: scoring such a run counts tasks it was tuned
    on. A run recorded before the split was (no mbpp_split) trained on the paper split, the default."""
    standard, paper, older, crux = (tmp_path / name for name in ("standard", "paper", "older", "crux"))
    for directory, model in ((standard, {"task_name": "mbpp", "mbpp_split": "standard"}),
                             (paper, {"task_name": "mbpp", "mbpp_split": "paper"}), (older, {"task_name": "mbpp"}),
                             (crux, {"task_name": "cruxeval_input_prediction", "mbpp_split": "standard"})):
        directory.mkdir()
        (directory / "training_config.json").write_text(json.dumps({"model": model}))

    def check(directory, *flags, task="mbpp"):
        args = generate_preds.build_parser().parse_args(["--task_name", task, "--model_type", "tiny-phi-2",
                                                         "--load_adapter_from", str(directory), *flags])
        tuned_models.check_trained_on_this_mbpp_split(args)

    with pytest.raises(UserError, match=r"tuned on the standard MBPP split's train tasks \(601-974; "
                                        r"training_config.json\), 374 of which are in the paper split's test tasks "
                                        r"\(488-974\) this run would score; pass --mbpp_split standard"):
        check(standard)
    with pytest.raises(UserError, match=r"paper MBPP split's train tasks \(1-487; training_config.json\), 477 of "
                                        r"which are in the standard split's test tasks \(11-510\)"):
        check(older, "--mbpp_split", "standard")
    check(standard, "--mbpp_split", "standard")
    check(paper)
    check(older)
    check(crux, task="cruxeval_input_prediction")  # no MBPP split there
    check(standard, task="cruxeval_output_prediction")  # another task: warned about, not this check's


def test_generate_preds_refuses_a_run_tuned_on_the_other_mbpp_split_before_loading_it(tmp_path, data_paths,
                                                                                      capsys):
    """The command itself, not only the check: an FFT final/ (given as --model_path) trained on the standard split's
    train tasks, generating for the paper split's test tasks, is refused before any model loads or --log_dir is
    made."""
    final = tmp_path / "final"
    final.mkdir()
    (final / "config.json").write_text("{}")  # never read: the refusal comes first
    (final / "training_config.json").write_text(json.dumps({"model": {"method": "fft", "task_name": "mbpp",
                                                                      "mbpp_split": "standard"}}))
    with pytest.raises(SystemExit) as exit_:
        generate_preds.main(["--task_name", "mbpp", "--model_type", "tiny-phi-2", "--model_path", str(final),
                             "--data_path", data_paths["mbpp"], "--limit", "1", "--log_dir", str(tmp_path / "log")])
    assert exit_.value.code == 2 and not (tmp_path / "log").exists()
    assert "was tuned on the standard MBPP split's train tasks" in capsys.readouterr().err


def test_the_trainers_final_dir_names_its_task_for_that_warning(tmp_path, data_paths):
    """What the warning reads is what the trainer writes: final/training_config.json's model.task_name."""
    import tune_foundation_model

    log_dir = tmp_path / "run"
    tune_foundation_model.main(["--peft_method", "pt", "--num_virtual_tokens", "2", "--task_name", "mbpp",
                                "--model_type", "tiny-phi-2", "--data_path", data_paths["mbpp"],
                                "--limit_train_examples", "2", "--per_gpu_train_batch_size", "2", "--num_epochs", "1",
                                "--max_length", "32", "--log_dir", str(log_dir)])
    args = generate_preds.build_parser().parse_args(["--task_name", "cruxeval_output_prediction", "--model_type",
                                                     "tiny-phi-2", "--load_adapter_from", str(log_dir / "final")])
    assert "was tuned on mbpp" in tuned_models.warn_if_tuned_for_another_task(args)


# ------------------------------------------------------------------------------------ every method
@pytest.mark.parametrize("method, model_type, task_name", CASES)
def test_greedy_predictions_do_not_depend_on_batch_size_or_run(method, model_type, task_name, saved_models,
                                                               data_paths, tmp_path):
    model, tok, enc_tok = _load(method, model_type, task_name, saved_models, data_paths)
    assert model.method == method and (enc_tok is not None) == (method in ("idpg", "lopa"))
    task = get_task(task_name)
    records = load_task_split(task_name, "test", _data(data_paths, task_name), limit=8)
    cfg = resolve_gen_config(task, max_new_tokens=NEW_TOKENS)
    runs = {bs: generate_predictions(model, tok, enc_tok, task, records, batch_size=bs, gen_config=cfg,
                                     progress=False) for bs in (1, 3, 8)}
    again = generate_predictions(model, tok, enc_tok, task, records, batch_size=8, gen_config=cfg, progress=False)
    assert runs[1] == runs[3] == runs[8] == again
    assert set(runs[8]) == {task.record_id(r) for r in records}
    assert all(len(v) == 1 and isinstance(v[0], str) for v in runs[8].values())
    assert sum(len(v[0]) for v in runs[8].values()) > 8  # the model produced text
    if method != "none":  # the loaded weights matter: the untuned base computes other logits
        base, _ = build_model("none", model_type, seed=5)
        ds = TaskDataset(task, records[:2], tok, enc_tok, num_virtual_tokens=model.num_virtual_tokens, train=False)
        batch = Collator(tok.pad_token_id, getattr(enc_tok, "pad_token_id", None), padding_side="left")(list(ds))
        with torch.no_grad():
            tuned_logits, base_logits = model(**batch).logits[:, -1], base(**batch).logits[:, -1]
        assert (tuned_logits - base_logits).abs().max() > 1e-3
    # the evaluator's files for this task validate
    write_predictions(tmp_path, task, records, runs[8], cfg.stop_sequences)
    validate_prediction_files(tmp_path, task, [task.record_id(r) for r in records])


def test_sampling_is_reproducible_for_a_seed_and_returns_n_samples(saved_models, data_paths):
    model, tok, enc_tok = _load("lopa", "tiny-phi-2", "mbpp", saved_models, data_paths)
    task = get_task("mbpp")
    records = load_task_split("mbpp", "test", data_paths["mbpp"], limit=4)
    cfg = resolve_gen_config(task, temperature=1.5, num_return_sequences=3, max_new_tokens=6, seed=1)
    first = generate_predictions(model, tok, enc_tok, task, records, batch_size=2, gen_config=cfg, progress=False)
    second = generate_predictions(model, tok, enc_tok, task, records, batch_size=2, gen_config=cfg, progress=False)
    assert first == second and all(len(v) == 3 for v in first.values())
    assert any(len(set(v)) > 1 for v in first.values())  # the samples differ
    other = resolve_gen_config(task, temperature=1.5, num_return_sequences=3, max_new_tokens=6, seed=2)
    assert generate_predictions(model, tok, enc_tok, task, records, batch_size=2, gen_config=other,
                                progress=False) != first


def test_sampled_run_killed_after_two_batches_resumes_to_the_same_samples(data_paths, tmp_path):
    model, tok = build_model("none", "tiny-phi-2", seed=3)
    task = get_task("mbpp")
    records = load_task_split("mbpp", "test", data_paths["mbpp"], limit=7)
    cfg = resolve_gen_config(task, temperature=1.5, num_return_sequences=2, max_new_tokens=6, seed=4)
    whole = generate_predictions(model, tok, None, task, records, batch_size=2, gen_config=cfg, progress=False)
    log = ProgressLog(tmp_path)

    def die_after_two(fresh, _new_tokens):
        log.append(fresh)
        if len(log.path.read_text().splitlines()) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_predictions(model, tok, None, task, records, batch_size=2, gen_config=cfg, progress=False,
                             on_batch=die_after_two)
    done = log.read()
    todo = [r for r in records if r["task_id"] not in done]
    assert len(done) == 4 and len(todo) == 3
    rest = generate_predictions(model, tok, None, task, todo, batch_size=2, gen_config=cfg, progress=False)
    assert {**done, **rest} == whole


# ---------------------------------------------------------------------------------------- stopping
def _drive(criterion, rows: list[list[int]], prompt_len: int = 3) -> list[int | None]:
    """Feed ``rows`` (new tokens) one step at a time, as generate does; returns the step each row finished."""
    finished_at = [None] * len(rows)
    steps = max(len(r) for r in rows)
    padded = torch.tensor([[7] * prompt_len + r + [0] * (steps - len(r)) for r in rows])
    for k in range(1, steps + 1):
        done = criterion(padded[:, :prompt_len + k], None)
        for i, flag in enumerate(done.tolist()):
            if flag and finished_at[i] is None:
                finished_at[i] = k
        if all(done.tolist()):
            break
    return finished_at


def test_stop_criterion_stops_each_row_at_its_first_stop_string_eos_or_budget():
    tok = load_tokenizer("tiny-phi-2")
    texts = ["    return a + b\nassert f(1) == 2\n", "    x = 1\n    y = 2\n    return x\n",
             "    value = compute(1, 2)\nprint(3)"]
    rows = [tok(t)["input_ids"] for t in texts]
    rows[1] = rows[1][:6] + [tok.eos_token_id] + rows[1][6:]
    crit = StopOnText(tok, MBPP_STOP_SEQUENCES, budgets=[40, 40, 5], eos_token_ids=[tok.eos_token_id])
    finished = _drive(crit, rows)
    first_stop = next(k for k in range(1, len(rows[0]) + 1) if "\nassert" in tok.decode(rows[0][:k]))
    assert finished == [first_stop, 7, 5]
    assert crit.lengths == [first_stop, 6, 5]
    width = max(len(r) for r in rows)
    trimmed = crit.trim(torch.tensor([r + [0] * (width - len(r)) for r in rows]))
    assert cut_at_stop(tok.decode(trimmed[0]), MBPP_STOP_SEQUENCES) == "    return a + b"
    assert trimmed[1] == rows[1][:6] and trimmed[2] == rows[2][:5]


def test_windowed_stop_detection_matches_decoding_the_whole_text():
    """Over random texts built around stop strings, the criterion (which decodes only a short tail) finishes
    every row at exactly the first step whose full decoded text holds a stop string."""
    tok = load_tokenizer("tiny-llama")
    rng = random.Random(0)
    pieces = ["x", " = ", "1", "\n", "    ", "def", "if", "class", "assert", '"""', "print", "```", "é", "ü→",
              "[ANSWER]", "[/", "ANSWER]", "AN", "SWER", "\t", "f(", ")"]
    for stops in (MBPP_STOP_SEQUENCES, CRUXEVAL_STOP_SEQUENCES):
        rows = [tok("".join(rng.choice(pieces) for _ in range(30)), add_special_tokens=False)["input_ids"]
                for _ in range(60)]
        crit = StopOnText(tok, stops, budgets=[10_000] * len(rows))
        got = _drive(crit, rows, prompt_len=5)
        for row, step in zip(rows, got):
            want = next((k for k in range(1, len(row) + 1) if any(s in tok.decode(row[:k]) for s in stops)), None)
            assert step == want
    assert window_tokens(MBPP_STOP_SEQUENCES) == len("\nassert") + 2


def test_a_row_that_stops_early_leaves_the_other_rows_unchanged(data_paths):
    task = get_task("mbpp")
    model, tok = build_model("none", "tiny-phi-2", seed=3)
    records = load_task_split("mbpp", "test", data_paths["mbpp"], limit=3)
    free = resolve_gen_config(task, max_new_tokens=24, stop_sequences=())
    full = generate_predictions(model, tok, None, task, records, batch_size=3, gen_config=free, progress=False)
    ids = [task.record_id(r) for r in records]
    text0 = full[ids[0]][0]
    stop = next(text0[i:i + 3] for i in range(4, len(text0) // 2)
                if text0[i:i + 3].strip() and all(text0[i:i + 3] not in full[t][0] for t in ids[1:]))
    cut = resolve_gen_config(task, max_new_tokens=24, stop_sequences=(stop,))
    stopped = generate_predictions(model, tok, None, task, records, batch_size=3, gen_config=cut, progress=False)
    assert cut_at_stop(stopped[ids[0]][0], [stop]) == cut_at_stop(text0, [stop]) == text0[:text0.find(stop)]
    assert len(stopped[ids[0]][0]) < len(text0)  # row 0 finished early
    assert [stopped[t] for t in ids[1:]] == [full[t] for t in ids[1:]]  # the others ran to the end, unchanged
    alone = generate_predictions(model, tok, None, task, records[1:2], batch_size=1, gen_config=cut, progress=False)
    assert alone[ids[1]] == stopped[ids[1]]


@pytest.mark.parametrize("method", ["none", "pt"])
def test_cruxeval_rows_get_their_own_total_length_budget(data_paths, method, monkeypatch):
    """The total (prompt + new tokens) never counts pt's 4 virtual tokens, and with several samples per task each
    sample keeps its own task's budget (generate repeats each row's samples next to each other)."""
    task = get_task("cruxeval_output_prediction")
    model, tok = build_model(method, "tiny-phi-2", num_virtual_tokens=4, seed=3)
    records = load_task_split(task.name, "test", data_paths["cruxeval"], limit=6)
    ds = TaskDataset(task, records, tok, train=False, num_virtual_tokens=model.num_virtual_tokens)
    batch = Collator(tok.pad_token_id, padding_side="left")([ds[i] for i in range(len(records))])
    lengths = batch["attention_mask"].sum(1).tolist()
    cfg = GenConfig(max_new_tokens=None, max_total_tokens=max(lengths) + 2, stop_sequences=())
    texts, new_tokens = generate_batch(model, tok, batch, cfg, "cpu")
    budgets = [max(1, max(lengths) + 2 - n) for n in lengths]
    assert new_tokens == sum(budgets)  # every row stopped exactly at its own budget (no EOS in 2+ tokens here)
    assert len(texts) == len(records) and len(set(budgets)) > 1
    criteria, generate = [], model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **k: criteria.append(k["stopping_criteria"][0]) or
                        generate(*a, **k))
    sampled = GenConfig(do_sample=True, num_return_sequences=3, max_new_tokens=None,
                        max_total_tokens=max(lengths) + 2, stop_sequences=())
    texts, new_tokens = generate_batch(model, tok, batch, sampled, "cpu")
    assert len(texts) == 3 * len(records)
    assert criteria[0].lengths == [b for b in budgets for _ in range(3)] and new_tokens == 3 * sum(budgets)
    assert resolve_gen_config(task).budget(300) == 212 and resolve_gen_config(task, max_new_tokens=8).budget(300) == 8


def test_paper_decoding_and_defaults():
    mbpp, crux = get_task("mbpp"), get_task("cruxeval_input_prediction")
    greedy = resolve_gen_config(mbpp)
    assert (greedy.do_sample, greedy.max_new_tokens, greedy.num_return_sequences) == (False, 256, 1)
    paper = resolve_gen_config(mbpp, paper_decoding=True)
    assert (paper.do_sample, paper.temperature, paper.top_p, paper.top_k, paper.max_new_tokens) == (
        True, 0.6, 0.95, 50, 256)
    paper = resolve_gen_config(crux, paper_decoding=True)
    assert (paper.temperature, paper.top_p, paper.max_new_tokens, paper.max_total_tokens) == (0.2, 0.95, None, 512)
    assert paper.stop_sequences == ("[/ANSWER]",)
    assert resolve_gen_config(mbpp, paper_decoding=True, temperature=0).do_sample is False
    with pytest.raises(UserError, match="needs sampling"):
        resolve_gen_config(mbpp, num_return_sequences=5)


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -1.0}, "--temperature must be a finite number >= 0 (0 means greedy), got -1.0"),
    ({"temperature": float("nan")}, "--temperature must be a finite number >= 0"),
    ({"temperature": float("inf")}, "--temperature must be a finite number >= 0"),
    ({"top_p": 0.0}, "--top_p must be in (0, 1], got 0.0"),  # refused under greedy too, not ignored
    ({"top_p": float("nan"), "temperature": 1.0}, "--top_p must be in (0, 1]"),
    ({"do_sample": True, "temperature": 0.0}, "--do_sample True contradicts --temperature 0; drop one of them"),
    ({"do_sample": False, "temperature": 0.7}, "--do_sample False contradicts --temperature 0.7 (which samples)"),
    ({"top_p": 0.9}, "--top_p 0.9 only shape sampling, and this run decodes greedy; add --do_sample"),
    ({"top_k": 5, "paper_decoding": True, "do_sample": False}, "--top_k 5 only shape sampling"),
])
def test_temperatures_and_top_p_outside_their_range_are_refused_not_read_as_greedy(kwargs, message):
    with pytest.raises(UserError) as err:
        resolve_gen_config(get_task("mbpp"), **kwargs)
    assert message in str(err.value)


def test_shards_cover_every_task_once_longest_first():
    lengths = [5, 9, 1, 9, 3, 7, 2]
    plans = [shard_batches(lengths, 2, r, 2) for r in range(2)]
    assert {steps for _, steps in plans} == {2}
    flat = [i for batches, _ in plans for b in batches for i in b]
    assert sorted(flat) == list(range(7))
    assert plans[0][0] == [[1, 5], [4, 2]] and plans[1][0] == [[3, 0], [6]]


# ------------------------------------------------------------------------------------------ the CLI
def test_cli_rejects_contradictory_loading_flags(saved_models, data_paths, capsys, tmp_path):
    base = ["--task_name", "mbpp", "--model_type", "tiny-phi-2", "--data_path", data_paths["mbpp"]]
    cases = [(["--peft_method", "lora"], "--load_adapter_from"),
             (["--peft_method", "fft"], "needs the tuned model"),
             (["--peft_method", "none", "--load_base_from_path", str(saved_models["fft"])], "--peft_method fft"),
             (["--load_adapter_from", str(saved_models["lopa"]), "--model_type", "tiny-llama"], "base_model_type"),
             (["--num_beams", "4"], "--num_beams"),
             (["--load_adapter_from", str(saved_models["fft"])], "whole model directory"),
             (["--peft_method", "none", "--log_dir", str(tmp_path / "file")], "exists and is not a directory")]
    (tmp_path / "file").write_text("")
    for extra, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            generate_preds.main(base + ["--log_dir", str(tmp_path / "never")] + extra)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_cli_rejects_flags_the_method_does_not_read_and_directories_of_another_kind(saved_models, data_paths,
                                                                                      capsys, tmp_path):
    fft_dir = tmp_path / "fft_final"  # a full fine-tuning's final/, trained on tiny-phi-2
    shutil.copytree(saved_models["fft"], fft_dir)
    (fft_dir / "training_config.json").write_text(json.dumps({"model": {"model_type": "tiny-phi-2"}}))
    step = tmp_path / "run" / "checkpoints" / "step_00000002"  # a PEFT training checkpoint
    shutil.copytree(saved_models["lopa"], step / "adapter")
    (step / "trainer_state.json").write_text("{}")
    (step / "trainable.safetensors").write_bytes(b"")
    run = tmp_path / "run"  # the PEFT run's log_dir, stopped before final/
    (run / "checkpoints" / "step_00000001").mkdir()
    (run / "checkpoints" / "step_00000001" / "trainer_state.json").write_text("{}")
    fft_run = tmp_path / "fft_run"  # a finished full fine-tuning's log_dir
    shutil.copytree(fft_dir, fft_run / "final")
    peft_run = tmp_path / "peft_run"  # a finished PEFT run's
    shutil.copytree(saved_models["pt"], peft_run / "final")
    ds_run = tmp_path / "ds_run" / "checkpoints" / "step_00000004"  # an unfinished DeepSpeed FFT run's
    (ds_run / "deepspeed").mkdir(parents=True)
    (ds_run / "trainer_state.json").write_text("{}")
    (ds_run.parent / "latest").write_text("step_00000004\n")
    early = tmp_path / "early"  # killed in its first step: no metrics.jsonl yet
    for log_dir in (run, fft_run, peft_run, ds_run.parents[1], early):
        log_dir.mkdir(exist_ok=True)
        for name in ("config.json", "train.log", "metrics.jsonl")[:2 if log_dir == early else 3]:
            (log_dir / name).write_text('{"script": "peft", "runtime": {}}' if name == "config.json" else "")
    (fft_dir / "train.log").write_text("")  # a model directory a shell redirect wrote a log into: not a log_dir
    base = ["--task_name", "mbpp", "--data_path", data_paths["mbpp"], "--log_dir", str(tmp_path / "never")]
    cases = [(["--model_type", "tiny-phi-2", "--load_adapter_from", str(saved_models["pt"]), "--enc_model_type",
               "tiny-roberta"], "a pt adapter has no field 'enc_model_type', but --enc_model_type tiny-roberta"),
             (["--model_type", "tiny-llama", "--load_adapter_from", str(saved_models["lora"]), "--num_virtual_tokens",
               "4"], "a lora adapter has no field 'num_virtual_tokens'"),
             (["--model_type", "tiny-llama", "--peft_method", "none", "--lp_rank", "2"],
              "--lp_rank is for lopa adapters, not --peft_method none; drop it"),
             (["--model_type", "tiny-llama", "--load_base_from_path", str(fft_dir)],
              "training_config.json: field 'model.model_type' is 'tiny-phi-2' but --model_type is 'tiny-llama'"),
             (["--model_type", "tiny-phi-2", "--load_base_from_path", str(step / "trainable.safetensors")],
              f"a checkpoint of a PEFT run, not a fully fine-tuned model; pass --load_adapter_from {step / 'adapter'}"),
             (["--model_type", "tiny-phi-2", "--load_adapter_from", str(step)],
              f"this is a training checkpoint: pass {step / 'adapter'}"),
             (["--model_type", "tiny-phi-2", "--load_adapter_from", str(run)],  # its config.json is the run's
              f"this is a training log_dir without final/ (the run did not finish): resume it (--resume_from {run}), "
              f"or pass a checkpoint's adapter (the latest: --load_adapter_from {step / 'adapter'})"),
             (["--model_type", "tiny-phi-2", "--peft_method", "fft", "--load_base_from_path", str(run)],
              f"{run}: a training log_dir without final/ (the run did not finish): resume it (--resume_from {run}), or "
              f"pass a checkpoint's adapter (the latest: --load_adapter_from {step / 'adapter'})"),
             (["--model_type", "tiny-phi-2", "--load_base_from_path", str(fft_run)],
              f"a training log_dir; pass its model, --load_base_from_path {fft_run / 'final'}"),
             (["--model_type", "tiny-phi-2", "--peft_method", "fft", "--load_base_from_path", str(peft_run)],
              f"a training log_dir; pass its model, --load_adapter_from {peft_run / 'final'}"),
             (["--model_type", "tiny-phi-2", "--peft_method", "fft", "--load_base_from_path", str(ds_run.parents[1])],
              f"or pass the weights zero_to_fp32.py converts from the latest checkpoint (python "
              f"{ds_run}/zero_to_fp32.py {ds_run} OUT --tag deepspeed --safe_serialization; then "
              f"--sharded_checkpoint_dir OUT, or --load_base_from_path OUT/model.safetensors for a model under 5 GB)"),
             (["--model_type", "tiny-phi-2", "--load_adapter_from", str(early)],
              "this is a training log_dir whose run stopped before its first checkpoint and final/: it left no model"),
             (["--model_type", "tiny-phi-2", "--load_adapter_from", str(saved_models["pt"]), "--load_base_from_path",
               str(fft_dir)], "--load_base_from_path is for --peft_method fft: a pt adapter goes on the base model"),
             (["--model_type", "tiny-phi-2", "--load_adapter_from", str(saved_models["pt"]),
               "--sharded_checkpoint_dir", str(fft_dir)], "drop --sharded_checkpoint_dir")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            generate_preds.main(base + argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_seed_flags_resolve_to_the_adapter(saved_models, data_paths, capsys):
    parse = generate_preds.build_parser().parse_args
    base = ["--task_name", "mbpp", "--model_type", "tiny-phi-2"]
    args = parse(base + ["--clf_predictor_path", str(saved_models["lopa"])])  # the seed's heads flag alone
    assert tuned_models.resolve_method(args) == "lopa" and args.load_adapter_from == str(saved_models["lopa"])
    args = parse(base + ["--load_adapter_from", str(saved_models["lopa"]), "--clf_predictor_path", "clf.pt",
                         "--path_to_data", data_paths["mbpp"]])
    assert tuned_models.resolve_method(args) == "lopa" and args.data_path == data_paths["mbpp"]
    assert "--clf_predictor_path clf.pt is not used" in capsys.readouterr().err


def test_do_sample_alone_turns_sampling_on():
    parse = generate_preds.build_parser().parse_args
    base = ["--task_name", "mbpp", "--model_type", "tiny-phi-2"]
    assert [parse(base + extra).do_sample for extra in ([], ["--do_sample"], ["--do_sample", "False"],
                                                         ["--do_sample", "True"])] == [None, True, False, True]


def test_nothing_left_to_generate_returns_nothing(data_paths):
    model, tok = build_model("none", "tiny-phi-2", seed=3)
    task = get_task("mbpp")
    assert generate_predictions(model, tok, None, task, [], batch_size=4, gen_config=resolve_gen_config(task),
                                progress=False) == {}


def test_fft_checkpoints_load_from_state_dict_files_and_sharded_dirs(saved_models, data_paths, tmp_path):
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(saved_models["fft"])
    state = {f"module.{k}": v for k, v in trained.state_dict().items()}
    torch.save(state, tmp_path / "pytorch_model.bin")
    # a training checkpoint's names (trainable.safetensors; zero_to_fp32.py's output of a DeepSpeed one)
    save_file({f"backbone.{k}": v.contiguous() for k, v in trained.state_dict().items()},
              str(tmp_path / "trainable.safetensors"))
    trained.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    (tmp_path / "sharded" / "config.json").unlink()  # only the shards and their index, as the original expects
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    # zero_to_fp32.py's output (names under "backbone.") with a config.json copied in, whole and in two shards:
    # from_pretrained found none of its names and left every weight random, with a warning only
    wrapped = {f"backbone.{k}": v.contiguous() for k, v in trained.state_dict().items()}
    names = sorted(wrapped)
    for name, parts in (("wrapped", [names]), ("wrapped_bin", [names]), ("wrapped_shards", [names[:5], names[5:]])):
        (tmp_path / name).mkdir()
        shutil.copy(pathlib.Path(saved_models["fft"]) / "config.json", tmp_path / name)
        if name == "wrapped_bin":  # zero_to_fp32.py without --safe_serialization
            torch.save(wrapped, tmp_path / name / "pytorch_model.bin")
            continue
        if len(parts) == 1:
            save_file(wrapped, str(tmp_path / name / "model.safetensors"))
            continue
        files = [f"model-0000{i + 1}-of-00002.safetensors" for i in range(2)]
        for file, part in zip(files, parts):
            save_file({k: wrapped[k] for k in part}, str(tmp_path / name / file))
        (tmp_path / name / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {k: file for file, part in zip(files, parts) for k in part}}))
    for flag, path in (("--load_base_from_path", tmp_path / "pytorch_model.bin"),
                       ("--load_base_from_path", tmp_path / "trainable.safetensors"),
                       ("--sharded_checkpoint_dir", tmp_path / "sharded"),
                       ("--load_base_from_path", tmp_path / "wrapped"),
                       ("--load_base_from_path", tmp_path / "wrapped_bin"),
                       ("--sharded_checkpoint_dir", tmp_path / "wrapped_shards")):
        args = generate_preds.build_parser().parse_args(
            ["--task_name", "mbpp", "--model_type", "tiny-phi-2", flag, str(path)])
        assert tuned_models.resolve_method(args) == "fft"
        model, _, _ = tuned_models.load_model(args, "fft")
        for name, tensor in trained.state_dict().items():
            assert torch.equal(model.lm.state_dict()[name], tensor), name
    bad = generate_preds.build_parser().parse_args(
        ["--task_name", "mbpp", "--model_type", "tiny-llama", "--load_base_from_path",
         str(tmp_path / "pytorch_model.bin")])
    with pytest.raises(UserError, match="pytorch_model.bin.*does not fit"):
        tuned_models.load_model(bad, "fft")
    from utils.generation import load_fft_weights

    lost = sorted((tmp_path / "sharded").glob("*.safetensors"))[-1]
    lost.rename(tmp_path / "elsewhere.safetensors")
    with pytest.raises(UserError, match=f"lists 1 shard files that are not there, e.g. {lost.name}"):
        load_fft_weights(trained, sharded_dir=str(tmp_path / "sharded"))
    (tmp_path / "sharded" / "model.safetensors.index.json").unlink()
    with pytest.raises(UserError, match="no model.safetensors.index.json or pytorch_model.bin.index.json"):
        load_fft_weights(trained, sharded_dir=str(tmp_path / "sharded"))



def test_a_converted_deepspeed_checkpoint_with_a_config_builds_from_that_config_without_reading_the_base(
        saved_models, tmp_path, monkeypatch):
    """zero_to_fp32.py's output with a config.json copied in: the architecture comes from that copy (it used to
    come from --model_type's hub files or --model_path), and no base weights are read before the checkpoint's."""
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(saved_models["fft"])
    (tmp_path / "converted").mkdir()
    config = json.loads((pathlib.Path(saved_models["fft"]) / "config.json").read_text())
    (tmp_path / "converted" / "config.json").write_text(json.dumps({**config, "layer_norm_eps": 1e-3}))
    save_file({f"backbone.{k}": v.contiguous() for k, v in trained.state_dict().items()},
              str(tmp_path / "converted" / "model.safetensors"))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("a base was read"))
    args = generate_preds.build_parser().parse_args(
        ["--task_name", "mbpp", "--model_type", "tiny-phi-2", "--load_base_from_path", str(tmp_path / "converted")])
    model, _, _ = tuned_models.load_model(args, "fft")
    assert model.lm.config.layer_norm_eps == 1e-3
    assert all(torch.equal(model.lm.state_dict()[k], v) for k, v in trained.state_dict().items())
    (tmp_path / "converted" / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(UserError, match=r"converted: a 'llama' model \(config.json\), but --model_type tiny-phi-2"):
        tuned_models.load_model(args, "fft")

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(saved_models, data_paths, log_dir, *extra, launcher=(), env=None):
    cmd = [*launcher] if launcher else [PY]
    cmd += [str(ROOT / "generate_preds.py"), "--task_name", "mbpp", "--model_type", "tiny-phi-2",
            "--load_adapter_from", str(saved_models["lopa"]), "--data_path", data_paths["mbpp"],
            "--limit", "7", "--batch_size", "2", "--max_new_tokens", "8", "--log_dir", str(log_dir),
            "--no_progress", *extra]
    return subprocess.run(cmd, cwd=ROOT, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=300)


def _files(log_dir, names) -> dict[str, bytes]:
    return {n: (log_dir / n).read_bytes() for n in names}


@pytest.fixture(scope="module")
def cli_runs(saved_models, data_paths, tmp_path_factory):
    """The expected files (one process, in this one, batch 3, generate's loop), a two-process CLI run, and a CLI run
    killed after 2 batches then resumed."""
    root = tmp_path_factory.mktemp("cli")
    model, tok, enc_tok = _load("lopa", "tiny-phi-2", "mbpp", saved_models, data_paths)
    task, records = get_task("mbpp"), load_task_split("mbpp", "test", data_paths["mbpp"], limit=7)
    cfg = resolve_gen_config(task, max_new_tokens=8)
    raw = generate_predictions(model, tok, enc_tok, task, records, batch_size=3, gen_config=cfg, progress=False)
    (root / "expected").mkdir()
    write_predictions(root / "expected", task, records, raw, cfg.stop_sequences)
    runs = {}
    accelerate = [os.path.join(os.path.dirname(PY), "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", str(_free_port())]
    # the own decoding loop (the default on a GPU) in two processes and in a killed run; generate's loop resumes it
    runs["two"] = _cli(saved_models, data_paths, root / "two", "--decode_loop", "own", launcher=accelerate,
                       env={"ACCELERATE_USE_CPU": "1"})
    runs["killed"] = _cli(saved_models, data_paths, root / "resumed", "--decode_loop", "own",
                          env={generate_preds.EXIT_AFTER_BATCHES_ENV: "2"})
    runs["left_after_kill"] = sorted(p.name for p in (root / "resumed").iterdir())
    runs["lines_after_kill"] = len((root / "resumed" / PROGRESS_FILE).read_text().splitlines())
    with open(root / "resumed" / PROGRESS_FILE, "a") as fh:  # a torn write from the moment of the kill
        fh.write('{"predictions": {"MBPP/4')
    runs["resumed"] = _cli(saved_models, data_paths, root / "resumed", "--resume")
    return root, runs


def test_cli_writes_files_in_the_formats_the_evaluators_read(cli_runs, data_paths):
    root, runs = cli_runs
    assert runs["two"].returncode == 0, runs["two"].stderr[-3000:]
    ids = [r["task_id"] for r in load_task_split("mbpp", "test", data_paths["mbpp"], limit=7)]
    validate_prediction_files(root / "two", get_task("mbpp"), ids)
    solutions = [json.loads(line) for line in (root / "two" / "mbxp_solutions.jsonl").read_text().splitlines()]
    raw = [json.loads(line) for line in (root / "two" / "mbxp_raw.jsonl").read_text().splitlines()]
    assert [s["task_id"] for s in solutions] == ids and all(s["language"] == "python" for s in solutions)
    assert [s["completion"] for s in solutions] == [cut_at_stop(r["raw"], MBPP_STOP_SEQUENCES) for r in raw]
    problems = [json.loads(line) for line in (root / "two" / "mbpp_test_problems.jsonl").read_text().splitlines()]
    assert {"task_id", "prompt", "entry_point", "test", "language", "canonical_solution"} <= set(problems[0])
    assert all((root / "two" / name).read_bytes().isascii() for name in MBPP_FILES)  # any locale reads them
    config = json.loads((root / "two" / "generate_preds_config.json").read_text())
    assert (config["peft_method"], config["generation"]["do_sample"], config["generation"]["max_new_tokens"],
            config["num_processes"]) == ("lopa", False, 8, 2)


def test_two_processes_give_every_task_once_and_the_same_predictions(cli_runs):
    root, runs = cli_runs
    assert runs["two"].returncode == 0, runs["two"].stderr[-3000:]
    lines = (root / "two" / "mbxp_solutions.jsonl").read_text().splitlines()
    assert len(lines) == 7 and len({json.loads(line)["task_id"] for line in lines}) == 7
    assert _files(root / "two", MBPP_FILES) == _files(root / "expected", MBPP_FILES)
    assert "generated in" in runs["two"].stdout and "s by the own decoding loop) ->" in runs["two"].stdout
    config = json.loads((root / "two" / "generate_preds_config.json").read_text())
    assert config["decoded_by"] == ["the own decoding loop"]


def test_a_killed_and_resumed_run_writes_the_same_files(cli_runs):
    root, runs = cli_runs
    assert runs["killed"].returncode == 3, runs["killed"].stderr[-3000:]
    assert runs["left_after_kill"] == [".lock", "generate_preds_config.json", PROGRESS_FILE]  # no half-made results
    assert runs["lines_after_kill"] == 2  # one line per batch
    assert len((root / "resumed" / PROGRESS_FILE).read_text().splitlines()) == 4  # torn line dropped, 2 added
    assert len(ProgressLog(root / "resumed").read()) == 7  # readable whole: a second kill could resume again
    assert runs["resumed"].returncode == 0, runs["resumed"].stderr[-3000:]
    assert "7 tasks (4 resumed, 3 generated" in runs["resumed"].stdout and "s by generate) ->" in runs["resumed"].stdout
    config = json.loads((root / "resumed" / "generate_preds_config.json").read_text())
    assert config["decoded_by"] == ["the own decoding loop", "generate"]  # the killed run's loop, then the resumed
    assert _files(root / "resumed", MBPP_FILES) == _files(root / "expected", MBPP_FILES)


def test_decoded_by_lists_the_paths_that_made_a_resumed_runs_predictions(tmp_path):
    from utils.prediction_files import CONFIG_FILE, decoded_by

    def saved(**fields):
        (tmp_path / CONFIG_FILE).write_text(json.dumps({"task_name": "mbpp", **fields}))

    saved()  # written before the field existed: what made its batches is not known
    assert decoded_by(tmp_path, "generate") == ["unrecorded", "generate"]
    saved(decoded_by=["the own decoding loop"])
    assert decoded_by(tmp_path, "the own decoding loop") == ["the own decoding loop"]
    saved(decoded_by=["the own decoding loop", "generate"])
    assert decoded_by(tmp_path, "the own decoding loop") == ["the own decoding loop", "generate",
                                                             "the own decoding loop"]


def test_resume_refuses_other_settings(cli_runs):
    root, _ = cli_runs
    saved = json.loads((root / "two" / "generate_preds_config.json").read_text())
    check_resumable(root / "two", {**saved, "batch_size": 64, "num_processes": 1},
                    ignore=("batch_size", "num_processes"))
    # an FFT final/ given as --model_path was the untuned model ("none") before it was read as fft
    config_file = root / "two" / "generate_preds_config.json"
    on_disk = config_file.read_bytes()
    config_file.write_text(json.dumps({**saved, "peft_method": "none"}))
    try:
        with pytest.raises(UserError, match=r"'peft_method' is 'none' but this run has 'fft' \(--peft_method none "
                                            r"resumes it as it began\)"):
            check_resumable(root / "two", {**saved, "peft_method": "fft"})
    finally:
        config_file.write_bytes(on_disk)
    changed = {**saved, "generation": {**saved["generation"], "temperature": 0.5, "do_sample": True}}
    with pytest.raises(UserError, match="generate_preds_config.json: fields 'generation.do_sample' is False but "
                                        "this run has True; 'generation.temperature'"):
        check_resumable(root / "two", changed)
    # the arguments' part is compared before the model loads (it took a model load to learn of it), every field
    saved_files = {p.name: p.read_bytes() for p in (root / "two").iterdir() if p.is_file()}
    argv = ["--task_name", saved["task_name"], "--model_type", "tiny-llama", "--data_path", saved["data_path"],
            "--limit", str(saved["limit"]), "--max_new_tokens", "3", "--resume", "--log_dir", str(root / "two")]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(generate_preds, "load_model", lambda *a: pytest.fail("the model loaded first"))
        with pytest.raises(UserError, match=r"fields 'generation.max_new_tokens' is 8 but this run has 3; "
                                            r"'load_adapter_from' is .*; 'model_type' is 'tiny-phi-2' but this run "
                                            r"has 'tiny-llama'; 'peft_method' is 'lopa' but this run has 'none'; "
                                            r"rerun with the same settings"):
            generate_preds.main.__wrapped__(argv)  # unwrapped: the UserError itself
    assert {p.name: p.read_bytes() for p in (root / "two").iterdir() if p.is_file()} == saved_files


def test_cruxeval_files_hold_one_list_per_sample(tmp_path):
    task = get_task("cruxeval_input_prediction")
    records = [{"id": f"sample_{i}", "code": "", "input": "", "output": ""} for i in (400, 401)]
    raw = {"sample_400": ["\nassert f(1) == 2\n[/ANSWER]"], "sample_401": ["\nassert f('ä') == 'b'"]}
    write_predictions(tmp_path, task, records, raw, CRUXEVAL_STOP_SEQUENCES)
    validate_prediction_files(tmp_path, task, ["sample_400", "sample_401"])
    assert json.loads((tmp_path / "output.json").read_text()) == {"sample_400": ["f(1)"], "sample_401": ["f('ä')"]}
    assert json.loads((tmp_path / "output_raw.json").read_text()) == raw
    # the harnesses open these in the locale's encoding: non-ASCII travels as JSON escapes
    assert all((tmp_path / name).read_bytes().isascii() for name in CRUXEVAL_FILES)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(CRUXEVAL_FILES)


def test_mbpp_completions_are_cut_at_every_stop_of_the_specs_stage_1(tmp_path):
    """Spec §6.5 stage 1 cuts at `\\n<|/` too; generation must stop and cut there, or mbxp_solutions.jsonl keeps
    the marker line (a SyntaxError under mxeval) where the stage-1 file does not."""
    task = get_task("mbpp")
    raws = ["    return a + b\n<|/ file ext=.py |>\ndef g():\n    pass", "    return 1\nif x:\n<|/ a"]
    record = {"task_id": "MBPP/488", "prompt": "", "test": "", "entry_point": "f", "canonical_solution": ""}
    write_predictions(tmp_path, task, [record], {"MBPP/488": raws}, task.stop_sequences)
    lines = (tmp_path / "mbxp_solutions.jsonl").read_text().splitlines()
    assert [json.loads(line)["completion"] for line in lines] == ["    return a + b", "    return 1"]
    tok = load_tokenizer("tiny-phi-2")
    row = tok(raws[0])["input_ids"]
    crit = StopOnText(tok, task.stop_sequences, budgets=[len(row) + 5])
    stopped = _drive(crit, [row])[0]
    assert "\n<|/" in tok.decode(row[:stopped]) and "\n<|/" not in tok.decode(row[:stopped - 1])


def test_a_state_dict_loses_backbone_prefixes_only_when_every_name_has_one(tmp_path):
    from safetensors.torch import save_file

    from utils.generation import read_state_dict_file

    save_file({"backbone.a.weight": torch.zeros(2), "backbone.b.weight": torch.ones(2)},
              str(tmp_path / "wrapped.safetensors"))
    save_file({"backbone.a.weight": torch.zeros(2), "lm_head.weight": torch.ones(2)}, str(tmp_path / "own.safetensors"))
    assert sorted(read_state_dict_file(str(tmp_path / "wrapped.safetensors"))) == ["a.weight", "b.weight"]
    assert sorted(read_state_dict_file(str(tmp_path / "own.safetensors"))) == ["backbone.a.weight", "lm_head.weight"]

def test_a_state_dict_without_the_head_loads_only_into_a_model_that_ties_it(tmp_path):
    from utils.generation import load_fft_weights
    from utils.models import load_foundation_model

    trained, _ = load_foundation_model("tiny-llama", seed=1)
    path = tmp_path / "no_head.safetensors"
    save_file({k: v for k, v in trained.state_dict().items() if k != "lm_head.weight"}, str(path))
    untied, _ = load_foundation_model("tiny-llama", seed=2)  # its own lm_head: the file lacks a trained weight
    with pytest.raises(UserError, match=r"1 missing weights, e.g. \['lm_head.weight'\]"):
        load_fft_weights(untied, state_dict_file=str(path))
    tied, _ = load_foundation_model("tiny-llama", seed=2)
    tied.lm_head.weight = tied.model.embed_tokens.weight  # the head is the embedding, loaded under its other name
    load_fft_weights(tied, state_dict_file=str(path))
    assert torch.equal(tied.lm_head.weight, trained.model.embed_tokens.weight)
    # the bare architecture generate_preds builds for such a file ties its head as the config says, too
    trained.config.tie_word_embeddings = True
    trained.save_pretrained(tmp_path / "tied")
    bare, _ = load_foundation_model("tiny-llama", model_path=str(tmp_path / "tied"), empty_weights=True)
    load_fft_weights(bare, state_dict_file=str(path))
    assert bare.lm_head.weight is bare.model.embed_tokens.weight
    assert torch.equal(bare.lm_head.weight, trained.model.embed_tokens.weight)



def _refused_leaving_the_log_dir_as_it_was(log_dir, argv) -> int:
    """Run generate_preds on a --log_dir holding an earlier run's files; its exit code, once they are untouched."""
    earlier = {name: f"{name} of an earlier run\n" for name in (*MBPP_FILES, PROGRESS_FILE, "generate_preds_config.json")}
    for name, text in earlier.items():
        (log_dir / name).write_text(text)
    with pytest.raises(SystemExit) as exit_:
        generate_preds.main([*argv, "--log_dir", str(log_dir)])
    assert {name: (log_dir / name).read_text() for name in earlier if (log_dir / name).is_file()} == earlier
    return exit_.value.code


@pytest.mark.parametrize("flag", ["--batch_size", "--limit"])
def test_a_bad_count_is_refused_before_the_fresh_start_clears_the_log_dir(flag, data_paths, tmp_path, capsys):
    argv = ["--task_name", "mbpp", "--model_type", "tiny-phi-2", "--data_path", data_paths["mbpp"], flag, "0"]
    assert _refused_leaving_the_log_dir_as_it_was(tmp_path, argv) == 2
    assert f"argument {flag}: must be >= 1, got 0" in capsys.readouterr().err


def test_an_adapter_whose_m_leaves_mbpp_no_prompt_is_refused_before_the_fresh_start(data_paths, tmp_path, capsys):
    """m >= 325 cannot be trained on MBPP, but a CRUXEval adapter can have it: its MBPP generation used to clear
    --log_dir first and fail in the dataset after."""
    save_adapter(build_model("pt", "tiny-phi-2", num_virtual_tokens=330)[0], tmp_path / "adapter")
    (tmp_path / "log").mkdir()
    argv = ["--task_name", "mbpp", "--model_type", "tiny-phi-2", "--data_path", data_paths["mbpp"], "--limit", "2",
            "--peft_method", "pt", "--load_adapter_from", str(tmp_path / "adapter"), "--overwrite"]
    assert _refused_leaving_the_log_dir_as_it_was(tmp_path / "log", argv) == 2
    assert f"error: {tmp_path / 'adapter'}: --num_virtual_tokens 330: MBPP's prompt budget" in capsys.readouterr().err



def test_generations_beyond_the_models_context_are_refused_before_the_fresh_start(data_paths, tmp_path, capsys):
    """tiny-phi-2 has 1,024 positions. MBPP: a 325-token prompt budget (m included) + --max_new_tokens 700.
    CRUXEval: 512 tokens after an adapter's 600 virtual tokens. Both used to run on at positions the model never saw."""
    (tmp_path / "log").mkdir()
    mbpp = ["--task_name", "mbpp", "--model_type", "tiny-phi-2", "--data_path", data_paths["mbpp"], "--limit", "2",
            "--overwrite"]
    assert _refused_leaving_the_log_dir_as_it_was(tmp_path / "log", [*mbpp, "--max_new_tokens", "700"]) == 2
    assert ("error: prompts of up to 325 tokens and 700 new ones: 1025 tokens, more than the model's context of "
            "1024; lower --max_new_tokens") in capsys.readouterr().err
    save_adapter(build_model("pt", "tiny-phi-2", num_virtual_tokens=600)[0], tmp_path / "adapter")
    crux = ["--task_name", "cruxeval_output_prediction", "--model_type", "tiny-phi-2", "--data_path",
            data_paths["cruxeval"], "--limit", "2", "--peft_method", "pt", "--load_adapter_from",
            str(tmp_path / "adapter"), "--log_dir", str(tmp_path / "crux")]
    with pytest.raises(SystemExit) as exit_:
        generate_preds.main(crux)
    assert exit_.value.code == 2 and not (tmp_path / "crux").exists()
    assert ("error: 600 virtual tokens before prompts and generations of up to 512 tokens: 1112 tokens, more than "
            "the model's context of 1024; use an adapter with fewer virtual tokens"
            ) in capsys.readouterr().err

def test_a_second_run_on_the_same_log_dir_is_refused_and_the_lock_dies_with_the_run(saved_models, data_paths,
                                                                                      capsys, tmp_path):
    from utils.fileio import lock_directory

    log_dir = tmp_path / "gen"
    log_dir.mkdir()
    argv = ["--task_name", "mbpp", "--model_type", "tiny-phi-2", "--load_adapter_from", str(saved_models["pt"]),
            "--data_path", data_paths["mbpp"], "--limit", "2", "--max_new_tokens", "4", "--no_progress",
            "--log_dir", str(log_dir)]
    with lock_directory(log_dir, "--log_dir", "generate_preds.py"):  # a live run holds it
        with pytest.raises(SystemExit) as exit_info:
            generate_preds.main(argv)
    assert exit_info.value.code == 2
    assert f"--log_dir {log_dir}: another generate_preds.py (pid {os.getpid()}) is writing there" in \
        capsys.readouterr().err
    assert sorted(p.name for p in log_dir.iterdir()) == [".lock"]  # it wrote nothing
    assert generate_preds.main(argv) == 0  # the lock went with the run that held it
    assert generate_preds.main([*argv, "--overwrite"]) == 0  # and a finished run releases its own


def test_a_run_whose_default_log_dir_another_run_started_in_the_same_second_takes_the_next(saved_models, data_paths,
                                                                                           tmp_path, monkeypatch,
                                                                                           capsys):
    from utils import cli
    from utils.fileio import lock_directory

    monkeypatch.chdir(tmp_path)
    name = cli.default_log_dir()
    monkeypatch.setattr(generate_preds, "default_log_dir", lambda: name)  # picked before the other run made it
    os.makedirs(name)
    argv = ["--task_name", "mbpp", "--model_type", "tiny-phi-2", "--load_adapter_from", str(saved_models["pt"]),
            "--data_path", data_paths["mbpp"], "--limit", "2", "--max_new_tokens", "4", "--no_progress"]
    with lock_directory(name, "--log_dir", "generate_preds.py"):  # the other run, still loading its model
        assert generate_preds.main(argv) == 0
    assert f"-> {name}-2{os.sep}mbxp_solutions.jsonl" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / name).iterdir()) == [".lock"]


def test_empty_stop_string_is_ignored():
    """"" is in every text: kept, it would stop every row after one token."""
    import torch
    from utils.models import tiny_tokenizer
    from utils.stopping import StopOnText
    tok = tiny_tokenizer()
    crit = StopOnText(tok, ("", "\ndef"), budgets=[10], prompt_len=2)
    ids = torch.tensor([[5, 6] + tok("x = 1", add_special_tokens=False)["input_ids"][:1]])
    assert not bool(crit(ids)[0])


# ------------------------------------------------------------------ generation bookkeeping (mutation review)
def test_cruxeval_keeps_its_512_token_total_when_max_new_tokens_is_given():
    cfg = resolve_gen_config(get_task("cruxeval_output_prediction"), max_new_tokens=8)
    assert (cfg.max_new_tokens, cfg.max_total_tokens) == (8, 512)
    assert [cfg.budget(n) for n in (300, 504, 508, 511, 600)] == [8, 8, 4, 1, 1]  # at least 1, always


def test_the_sampling_flags_given_are_what_generate_gets():
    cfg = resolve_gen_config(get_task("mbpp"), temperature=0.7, top_p=0.5, top_k=7, num_return_sequences=3)
    assert cfg.hf_kwargs() == {"do_sample": True, "temperature": 0.7, "top_p": 0.5, "top_k": 7, "num_beams": 1,
                               "num_return_sequences": 3}
    assert resolve_gen_config(get_task("mbpp"), do_sample=True).hf_kwargs() == {
        "do_sample": True, "temperature": 0.6, "top_p": 1.0, "top_k": 50, "num_beams": 1, "num_return_sequences": 1}
    assert resolve_gen_config(get_task("mbpp"), stop_sequences=()).stop_sequences == ()  # none asked, none used


@pytest.mark.parametrize("n, batch_size, world, steps", [(5, 2, 2, 2), (5, 1, 2, 3), (3, 4, 2, 1), (9, 2, 4, 2)])
def test_every_process_runs_every_gather_when_shards_get_unequal_batch_counts(n, batch_size, world, steps):
    """A process with fewer batches must still join the last gathers (else the others wait forever), and the
    plans together hold every task once, in batches of at most batch_size."""
    plans = [shard_batches([7] * n, batch_size, rank, world) for rank in range(world)]
    assert {s for _, s in plans} == {steps} and max(len(batches) for batches, _ in plans) == steps
    assert sorted(i for batches, _ in plans for b in batches for i in b) == list(range(n))
    assert all(0 < len(b) <= batch_size for batches, _ in plans for b in batches)


def test_each_progress_record_holds_its_own_batch_longest_prompts_first(data_paths):
    task = get_task("mbpp")
    model, tok = build_model("none", "tiny-phi-2", seed=3)
    records = load_task_split("mbpp", "test", data_paths["mbpp"], limit=5)
    seen = []
    raw = generate_predictions(model, tok, None, task, records, batch_size=2, progress=False,
                               gen_config=resolve_gen_config(task, max_new_tokens=2),
                               on_batch=lambda fresh, _new: seen.append(dict(fresh)))
    lengths = TaskDataset(task, records, tok, None, train=False).lengths()
    by_length = [task.record_id(records[i]) for i in sorted(range(5), key=lambda i: (-lengths[i], i))]
    assert [list(batch) for batch in seen] == [by_length[:2], by_length[2:4], by_length[4:]]
    assert {k: v for batch in seen for k, v in batch.items()} == raw


def test_each_tasks_samples_come_from_its_own_row(data_paths):
    """With top-k 1 every sample is the greedy text: a batch's n samples per task must stay with their task."""
    task = get_task("mbpp")
    model, tok = build_model("none", "tiny-phi-2", seed=3)
    records = load_task_split("mbpp", "test", data_paths["mbpp"], limit=3)
    greedy = generate_predictions(model, tok, None, task, records, batch_size=3, progress=False,
                                  gen_config=resolve_gen_config(task, max_new_tokens=6))
    assert len({v[0] for v in greedy.values()}) == 3
    cfg = resolve_gen_config(task, temperature=1.0, top_k=1, num_return_sequences=2, max_new_tokens=6)
    sampled = generate_predictions(model, tok, None, task, records, batch_size=3, gen_config=cfg, progress=False)
    assert sampled == {tid: v * 2 for tid, v in greedy.items()}


def test_batches_of_one_run_draw_different_samples(data_paths):
    """Two tasks with the same prompt in different batches: a seed that ignored the batch gave them the same
    samples (every batch of a run drew the same random numbers)."""
    task = get_task("mbpp")
    model, tok = build_model("none", "tiny-phi-2", seed=3)
    record = load_task_split("mbpp", "test", data_paths["mbpp"], limit=1)[0]
    twins = [record, {**record, "task_id": "MBPP/974"}]
    cfg = resolve_gen_config(task, temperature=1.5, max_new_tokens=8, stop_sequences=())
    raw = generate_predictions(model, tok, None, task, twins, batch_size=1, gen_config=cfg, progress=False)
    assert raw[record["task_id"]] != raw["MBPP/974"]


def test_module_and_backbone_prefixes_are_removed_together(tmp_path):
    """DDP's state_dict of the training wrapper: every name is module.backbone.<name>."""
    from utils.generation import read_state_dict_file

    save_file({"module.backbone.a.weight": torch.zeros(2), "module.backbone.b.weight": torch.ones(2)},
              str(tmp_path / "ddp.safetensors"))
    assert sorted(read_state_dict_file(str(tmp_path / "ddp.safetensors"))) == ["a.weight", "b.weight"]


def test_a_checkpoint_with_a_stray_tensor_is_refused_in_any_shard(tmp_path):
    from safetensors.torch import load_file

    from utils.generation import load_fft_weights
    from utils.models import load_foundation_model

    trained, _ = load_foundation_model("tiny-llama", seed=1)
    trained.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    shards = sorted((tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 1
    first = load_file(str(shards[0]))
    save_file({**first, "value_head.weight": torch.zeros(2)}, str(shards[0]))
    index = tmp_path / "sharded" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["value_head.weight"] = shards[0].name
    index.write_text(json.dumps(data))
    model, _ = load_foundation_model("tiny-llama", seed=2)
    with pytest.raises(UserError, match=r"0 missing weights, e.g. \[\]; 1 unexpected, e.g. \['value_head.weight'\]"):
        load_fft_weights(model, sharded_dir=str(tmp_path / "sharded"))
    save_file({**trained.state_dict(), "value_head.weight": torch.zeros(2)}, str(tmp_path / "one.safetensors"))
    with pytest.raises(UserError, match=r"1 unexpected, e.g. \['value_head.weight'\]"):
        load_fft_weights(model, state_dict_file=str(tmp_path / "one.safetensors"))


def test_validation_refuses_files_out_of_task_order_or_with_another_sample_count(tmp_path):
    mbpp = get_task("mbpp")
    records = [{"task_id": f"MBPP/{i}", "prompt": "", "test": "", "entry_point": "f", "canonical_solution": ""}
               for i in (488, 489)]
    write_predictions(tmp_path, mbpp, records, {"MBPP/488": ["    return 1"], "MBPP/489": ["    return 2"]}, ())
    ids = ["MBPP/488", "MBPP/489"]
    validate_prediction_files(tmp_path, mbpp, ids)
    with pytest.raises(UserError, match="in task order"):
        validate_prediction_files(tmp_path, mbpp, ids[::-1])
    crux = get_task("cruxeval_output_prediction")
    records = [{"id": f"sample_{i}", "code": "", "input": "", "output": ""} for i in (400, 401)]
    write_predictions(tmp_path, crux, records, {"sample_400": ["1"], "sample_401": ["2"]}, ())
    validate_prediction_files(tmp_path, crux, ["sample_400", "sample_401"])
    with pytest.raises(UserError, match="keys must be exactly the test ids in order"):
        validate_prediction_files(tmp_path, crux, ["sample_401", "sample_400"])
    with pytest.raises(UserError, match="must be a list of 2 strings"):
        validate_prediction_files(tmp_path, crux, ["sample_400", "sample_401"], num_samples=2)


@pytest.mark.parametrize("flag, value, field", [
    ("--dtype", "bf16", "'dtype'"), ("--limit", "3", "'limit'"), ("--mbpp_split", "standard", "'mbpp_split'"),
    ("--data_path", "other.jsonl", "'data_path'"), ("--max_new_tokens", "9", "'generation.max_new_tokens'"),
    ("--model_type", "tiny-llama", "'model_type'"), ("--temperature", "0.5", "'generation.temperature'")])
def test_resume_refuses_any_setting_that_changes_the_predictions(flag, value, field, tmp_path, monkeypatch):
    from utils.prediction_files import write_config

    monkeypatch.chdir(tmp_path)
    for name in ("data.jsonl", "other.jsonl"):
        (tmp_path / name).write_text("")

    def config(*extra):
        args = generate_preds.build_parser().parse_args(
            ["--task_name", "mbpp", "--model_type", "tiny-phi-2", "--data_path", "data.jsonl", "--limit", "5",
             "--max_new_tokens", "8", *extra])
        return generate_preds.run_config(args, "none", generate_preds.check_args(args), 1, None)

    write_config(tmp_path, config())
    check_resumable(tmp_path, config("--batch_size", "4"), ignore=("batch_size", "num_processes"))
    with pytest.raises(UserError, match=f"{field} is "):
        check_resumable(tmp_path, config(flag, value), ignore=("batch_size", "num_processes"))


def test_a_sampled_run_resumes_only_with_its_batch_size_and_process_count(data_paths, tmp_path):
    """Sampling draws per batch: another batch size or process count regroups the rest and draws other samples."""
    from utils.prediction_files import CONFIG_FILE

    argv = ["--task_name", "mbpp", "--model_type", "tiny-phi-2", "--data_path", data_paths["mbpp"], "--limit", "3",
            "--max_new_tokens", "2", "--temperature", "1.0", "--batch_size", "2", "--no_progress",
            "--log_dir", str(tmp_path)]
    assert generate_preds.main(argv) == 0
    with pytest.raises(UserError, match="'batch_size' is 2 but this run has 1"):
        generate_preds.main.__wrapped__([*argv, "--batch_size", "1", "--resume"])
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**config, "num_processes": 2}))  # as accelerate launch wrote it
    with pytest.raises(UserError, match="'num_processes' is 2 but this run has 1"):
        generate_preds.main.__wrapped__([*argv, "--resume"])


def test_overwrite_starts_the_progress_file_afresh(data_paths, tmp_path):
    """A stale batch left in the progress file would come back into the files at the next --resume."""
    log = ProgressLog(tmp_path)
    log.append({"MBPP/490": ["an earlier run's"]})
    argv = ["--task_name", "mbpp", "--model_type", "tiny-phi-2", "--data_path", data_paths["mbpp"], "--limit", "3",
            "--max_new_tokens", "2", "--batch_size", "2", "--no_progress", "--log_dir", str(tmp_path)]
    assert generate_preds.main([*argv, "--overwrite"]) == 0
    assert "an earlier run's" not in log.path.read_text() and len(log.path.read_text().splitlines()) == 2


def test_a_fresh_start_refuses_a_log_dir_holding_only_a_killed_runs_progress(data_paths, tmp_path, capsys):
    """What a run killed mid-generation leaves (its config and progress, no final files) is kept."""
    ProgressLog(tmp_path).append({"MBPP/488": ["kept"]})
    argv = ["--task_name", "mbpp", "--model_type", "tiny-phi-2", "--data_path", data_paths["mbpp"], "--limit", "2",
            "--no_progress", "--log_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_:
        generate_preds.main(argv)
    assert exit_.value.code == 2 and "(1 finished tasks in generation_progress.jsonl)" in capsys.readouterr().err
    assert ProgressLog(tmp_path).read() == {"MBPP/488": ["kept"]}


def test_resume_and_overwrite_together_are_refused_before_anything_is_touched(data_paths, tmp_path, capsys):
    argv = ["--task_name", "mbpp", "--model_type", "tiny-phi-2", "--data_path", data_paths["mbpp"], "--limit", "2",
            "--resume", "--overwrite"]
    assert _refused_leaving_the_log_dir_as_it_was(tmp_path, argv) == 2
    err = capsys.readouterr().err
    assert "--resume keeps an earlier run's work and --overwrite deletes it: give one of them" in err


@pytest.mark.parametrize("loop", ["hf", "own"])
def test_a_row_ends_at_the_models_eos_in_either_decoding_loop(data_paths, loop):
    """The own loop has no EOS check of its own: it ends a row only through the stop criterion's EOS ids. Here a
    token the model makes mid-row is its generation config's EOS."""
    from utils.decode_loop import GreedyDecoder

    task = get_task("mbpp")
    model, tok = build_model("none", "tiny-phi-2", seed=3)
    records = load_task_split("mbpp", "test", data_paths["mbpp"], limit=2)
    batch = Collator(tok.pad_token_id, padding_side="left")(list(TaskDataset(task, records, tok, train=False)))
    cfg = resolve_gen_config(task, max_new_tokens=10, stop_sequences=())
    decoder = GreedyDecoder(check_every=4) if loop == "own" else None
    free = model.generate(batch["input_ids"], batch["attention_mask"], **cfg.hf_kwargs(), max_new_tokens=10,
                          pad_token_id=tok.pad_token_id, eos_token_id=[])[0].tolist()
    eos = next(t for t in free[3:] if t not in free[:3] and t not in tok.all_special_ids)
    model.lm.generation_config.eos_token_id = [tok.eos_token_id, eos]
    texts, new_tokens = generate_batch(model, tok, batch, cfg, "cpu", decoder=decoder)
    assert texts[0] == tok.decode(free[:free.index(eos)], skip_special_tokens=True)


def test_resume_without_the_runs_log_dir_is_refused_instead_of_starting_afresh(data_paths, tmp_path, monkeypatch,
                                                                              capsys):
    """Rerun "with --resume" but without the --log_dir the interrupted run named (or with a mistyped one): it used
    to start a new run in a new default directory and generate everything again, without a word."""
    monkeypatch.chdir(tmp_path)
    argv = ["--task_name", "mbpp", "--model_type", "tiny-phi-2", "--data_path", data_paths["mbpp"], "--limit", "1",
            "--max_new_tokens", "1", "--no_progress", "--resume"]
    for extra, message in (([], "--resume needs --log_dir: the directory of the run to go on with"),
                           (["--log_dir", "typo"], "--resume: typo holds no earlier generation (no "
                                                   "generate_preds_config.json or generation_progress.jsonl)")):
        with pytest.raises(SystemExit) as exit_:
            generate_preds.main([*argv, *extra])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("task_name", ["mbpp", "cruxeval_output_prediction"])
def test_a_fresh_start_refuses_a_log_dir_holding_only_scores_of_earlier_predictions(task_name, tmp_path):
    """Stage files and scores cost an evaluation (hours of sandboxed tests): a fresh run would delete them."""
    from utils.prediction_files import check_fresh_start, derived_files

    task = get_task(task_name)
    for name in derived_files(task):
        (tmp_path / name).write_text("{}\n")
        with pytest.raises(UserError, match=rf"holds an earlier run's work \({name}\); pass --resume"):
            check_fresh_start(tmp_path, task)
        (tmp_path / name).unlink()


def test_a_fresh_start_is_not_refused_for_empty_files_of_a_run_killed_before_its_first_batch(tmp_path):
    """A run killed between opening the progress file and writing its first batch leaves it empty: nothing to keep."""
    from utils.prediction_files import check_fresh_start

    task = get_task("mbpp")
    for name in (PROGRESS_FILE, *MBPP_FILES):
        (tmp_path / name).write_text("")
    check_fresh_start(tmp_path, task)
    (tmp_path / PROGRESS_FILE).write_text("\n")
    with pytest.raises(UserError, match=rf"holds an earlier run's work \({PROGRESS_FILE}\)"):
        check_fresh_start(tmp_path, task)


def test_a_fresh_start_into_a_log_dir_with_an_unreadable_progress_file_names_it_and_the_way_out(tmp_path):
    """Not the progress file's own error ("rerun without --resume"): this run has no --resume."""
    from utils.prediction_files import check_fresh_start

    ProgressLog(tmp_path).append({"MBPP/488": ["kept"]})
    with (tmp_path / PROGRESS_FILE).open("a") as fh:
        fh.write("not json\n" + json.dumps({"predictions": {"MBPP/489": ["x"]}}) + "\n")
    with pytest.raises(UserError, match=rf"holds an earlier run's work \({PROGRESS_FILE}\); pass --resume to "
                                        rf"continue it \(same settings\), --overwrite to delete it"):
        check_fresh_start(tmp_path, get_task("mbpp"))


@pytest.mark.parametrize("left", ["generate_preds_config.json", PROGRESS_FILE])
def test_resume_goes_on_with_a_run_that_left_only_its_config_or_only_its_progress(left, tmp_path):
    """A run killed before its first batch leaves its config alone; either file shows a run was there."""
    from utils.prediction_files import check_something_to_resume

    (tmp_path / left).write_text("{}\n")
    check_something_to_resume(tmp_path)


@pytest.mark.parametrize("content", ["", '{"task_name": "mb', "[1, 2]"])
def test_resume_names_a_saved_config_it_cannot_read_and_the_way_out(content, tmp_path):
    """An empty, cut or hand-edited generate_preds_config.json made --resume end in a bare JSONDecodeError or
    TypeError traceback."""
    from utils.prediction_files import CONFIG_FILE, decoded_by

    (tmp_path / CONFIG_FILE).write_text(content)
    for check in (lambda: check_resumable(tmp_path, {"task_name": "mbpp"}), lambda: decoded_by(tmp_path, "generate")):
        with pytest.raises(UserError, match=rf"^saved generation config {tmp_path / CONFIG_FILE}: (not valid JSON "
                                            rf"\(.+ at line 1\)|expected a JSON object); delete it to resume from "
                                            rf"{PROGRESS_FILE} without comparing the settings, or rerun with "
                                            rf"--overwrite instead of --resume to start over$"):
            check()


def test_resume_refuses_a_decoding_setting_the_saved_config_does_not_record(tmp_path):
    """A config written by an older version, without a setting this run decodes with, is no proof of the same
    decoding: the new setting is named, not skipped."""
    from utils.prediction_files import write_config

    saved = {"task_name": "mbpp", "generation": {"do_sample": False, "max_new_tokens": 8}}
    write_config(tmp_path, saved)
    check_resumable(tmp_path, saved)
    with pytest.raises(UserError, match=r"field 'generation.top_k' is None but this run has 50; rerun"):
        check_resumable(tmp_path, {**saved, "generation": {**saved["generation"], "top_k": 50}})


def test_mbpp_files_hold_each_tasks_samples_on_consecutive_lines(tmp_path):
    """mxeval groups the lines by task_id; generate_preds validates what it wrote, so a validation that wanted
    another layout failed every run with --num_return_sequences > 1 after all its generation."""
    task = get_task("mbpp")
    records = [{"task_id": f"MBPP/{i}", "prompt": "", "test": "", "entry_point": "f", "canonical_solution": ""}
               for i in (488, 489)]
    raw = {"MBPP/488": ["    return 1", "    return 2"], "MBPP/489": ["    return 3", "    return 4"]}
    write_predictions(tmp_path, task, records, raw, ())
    validate_prediction_files(tmp_path, task, ["MBPP/488", "MBPP/489"], num_samples=2)
    for name, field in (("mbxp_solutions.jsonl", "completion"), ("mbxp_raw.jsonl", "raw")):
        rows = [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
        assert [(r["task_id"], r[field]) for r in rows] == [(tid, text) for tid in raw for text in raw[tid]]
    with pytest.raises(UserError, match="one line per task and sample, in task order"):
        validate_prediction_files(tmp_path, task, ["MBPP/488", "MBPP/489"])


def test_the_mbpp_problem_file_holds_the_documented_fields_in_order(data_paths):
    """docs/GENERATION.md: task_id, language, prompt, test, entry_point, canonical_solution, description."""
    from utils.prediction_files import mbpp_problem

    record = load_task_split("mbpp", "test", data_paths["mbpp"], limit=1)[0]
    fields = ["task_id", "language", "prompt", "test", "entry_point", "canonical_solution", "description"]
    assert list(mbpp_problem({**record, "extra": 1})) == fields
    bare = {k: record[k] for k in fields if k not in ("language", "description")}
    assert mbpp_problem(bare) == {**bare, "language": "python"}


@pytest.mark.parametrize("name, bad, message", [
    ("mbxp_solutions.jsonl", {"task_id": "MBPP/488", "language": "python", "completion": None},
     r"mbxp_solutions.jsonl:1: field 'completion' must be a str, got NoneType"),
    ("output.json", {"sample_400": [1]}, r"output.json: field 'sample_400' must be a list of 1 strings")])
def test_validation_names_a_field_the_evaluators_cannot_read(name, bad, message, tmp_path):
    """A null completion or a number for an answer is a TypeError inside mxeval or CRUXEval's script."""
    mbpp = name.endswith(".jsonl")
    task = get_task("mbpp" if mbpp else "cruxeval_output_prediction")
    records = ([{"task_id": "MBPP/488", "prompt": "", "test": "", "entry_point": "f", "canonical_solution": ""}]
               if mbpp else [{"id": "sample_400", "code": "", "input": "", "output": ""}])
    write_predictions(tmp_path, task, records, {task.record_id(records[0]): ["1"]}, ())
    (tmp_path / name).write_text(json.dumps(bad) + "\n")
    with pytest.raises(UserError, match=message):
        validate_prediction_files(tmp_path, task, [task.record_id(records[0])])


@pytest.mark.parametrize("sampling", [False, True])
def test_out_of_gpu_memory_says_how_to_go_on(sampling, tmp_path, data_paths, monkeypatch, capsys):
    """A batch that does not fit the GPU (faked: this machine has none) ends in one line with the way on: greedy
    decoding resumes with smaller batches, keeping the finished ones (shown by doing it); sampling draws per batch,
    so it starts afresh."""
    import generate_preds
    import utils.generation

    real = utils.generation.generate_predictions

    def first_batch_then_oom(*args, on_batch, **kwargs):
        def stop_after_one(fresh, new_tokens):
            on_batch(fresh, new_tokens)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nmore detail")

        return real(*args, on_batch=stop_after_one, **kwargs)

    monkeypatch.setattr(utils.generation, "generate_predictions", first_batch_then_oom)
    argv = ["--task_name", "mbpp", "--model_type", "tiny-phi-2", "--data_path", data_paths["mbpp"], "--limit", "3",
            "--max_new_tokens", "4", "--no_progress", "--batch_size", "2", "--log_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exc:  # greedy: started with --overwrite, which --resume replaces
        generate_preds.main(argv + (["--temperature", "0.6"] if sampling else ["--overwrite"]))
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.startswith("error: out of GPU memory decoding batches of 2 prompts (CUDA out of memory. Tried to "
                          "allocate 2.00 GiB.): rerun with "), err
    assert err.rstrip().endswith("; --dtype bf16 halves the weights and the KV cache (a new run: --overwrite, since "
                                 "--resume keeps the dtype)"), err
    if sampling:
        assert "a lower --batch_size and --overwrite (sampling draws per batch" in err
        return
    assert f"--resume instead of --overwrite --log_dir {tmp_path} and a lower --batch_size (the finished batches " \
           f"are kept)" in err
    monkeypatch.setattr(utils.generation, "generate_predictions", real)
    assert generate_preds.main([*argv[:-4], "--batch_size", "1", "--log_dir", str(tmp_path), "--resume"]) == 0
    assert "3 tasks (2 resumed, 1 generated in" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_out_of_memory_advice_names_only_flags_the_run_can_take(dtype, tmp_path):
    """--resume replaces --overwrite only where the run was given --overwrite; bf16 is advised only to an fp32 run
    (a bf16 or fp16 one holds half-size weights already)."""
    import argparse
    from types import SimpleNamespace

    args = argparse.Namespace(batch_size=4, overwrite=False, dtype=dtype)
    greedy = SimpleNamespace(num_return_sequences=1, do_sample=False)
    assert generate_preds.out_of_memory_message(args, greedy, tmp_path, "CUDA out of memory.\nmore lines") == (
        f"out of GPU memory decoding batches of 4 prompts (CUDA out of memory.): rerun with --resume --log_dir "
        f"{tmp_path} and a lower --batch_size (the finished batches are kept)")


def test_resume_refuses_another_encoder_directory_before_loading_the_model(saved_models, data_paths, tmp_path,
                                                                            monkeypatch):
    """--enc_model_path decides a LOPA/IDPG run's encoder weights (frozen, not in the adapter), so its prompts: a run
    resumed with another one (or without it, on the adapter's recorded encoder) mixed two encoders' predictions."""
    from utils.prediction_files import write_config

    encoders = {}
    for name in ("enc_a", "enc_b"):
        encoders[name] = tmp_path / name
        encoders[name].mkdir()
        (encoders[name] / "config.json").write_text("{}")
    log_dir = tmp_path / "gen"
    log_dir.mkdir()
    argv = ["--task_name", "mbpp", "--model_type", "tiny-phi-2", "--load_adapter_from", str(saved_models["lopa"]),
            "--data_path", data_paths["mbpp"], "--limit", "3", "--max_new_tokens", "4", "--log_dir", str(log_dir)]
    args = generate_preds.build_parser().parse_args(argv + ["--enc_model_path", str(encoders["enc_a"])])
    write_config(log_dir, generate_preds.run_config(args, "lopa", generate_preds.check_args(args), 1, "tiny-roberta"))
    monkeypatch.setattr(generate_preds, "load_model", lambda *a: pytest.fail("the model loaded"))
    with pytest.raises(UserError, match=r"field 'enc_model_path' is '[^']*enc_a' but this run has '[^']*enc_b'"):
        generate_preds.main.__wrapped__([*argv, "--resume", "--enc_model_path", str(encoders["enc_b"])])
    with pytest.raises(UserError, match=r"field 'enc_model_path' is '[^']*enc_a' but this run has None"):
        generate_preds.main.__wrapped__([*argv, "--resume"])
