"""Arguments of the training scripts: defaults, help, validation before anything loads, shipped configs."""
import argparse
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT
from utils.batching import LengthGroupedSampler
from utils.errors import UserError
from utils.train_args import PAPER_LR, build_parser, config_from_namespace, parse_args
from utils.train_config import SaveEvery

BASE = ["--task_name", "mbpp", "--model_type", "tiny-llama"]


def _parse(argv, script="peft", tmp_path=None):
    log = ["--log_dir", str(tmp_path / "run")] if tmp_path is not None else []
    return parse_args(argv + log, script)


@pytest.mark.parametrize("script", ["peft", "fft"])
def test_help_lists_every_argument_with_its_default(script):
    parser = build_parser(script)
    help_text = parser.format_help().split("options:", 1)[1]  # the entries, not the usage
    entries = {m.group(1): " ".join(m.group(2).split())  # an entry: a line starting "  --flag", up to the next
               for m in re.finditer(r"^  (--\w+)(.*?)(?=^  -|^\S|\Z)", help_text, re.M | re.S)}
    options = [a for a in parser._actions if a.option_strings and a.dest != "help" and a.help != argparse.SUPPRESS]
    assert len(options) >= (37 if script == "peft" else 28)
    for action in options:  # None (not given) and False (a switch that is off) have nothing to show
        flag = action.option_strings[0]
        if action.default is not None and action.default is not False:
            assert "default" in entries[flag], f"{flag} shows no default"
        assert "(default: None)" not in entries[flag], f"{flag}: a bare None where the help says what it means"
    text = " ".join(help_text.split())
    for flag in ("--peft_method", "--num_virtual_tokens", "--lp_rank", "--num_epochs", "--per_gpu_train_batch_size",
                 "--lr", "--log_dir", "--wandb_logging", "--data_path", "--gradient_accumulation_steps", "--seed",
                 "--num_warmup_steps", "--lr_scheduler_type", "--max_train_steps", "--mixed_precision",
                 "--gradient_checkpointing", "--save_every", "--resume_from", "--pad_to_max_length",
                 "--group_by_length"):
        if script == "fft" and flag in ("--peft_method", "--num_virtual_tokens", "--lp_rank"):
            continue
        assert f"{flag} " in text
    # FFT's help leaves out what it refuses (an adapter's m, r and encoder) or ignores (the encoder's fast paths)
    for flag in ("--enc_model_type", "--enc_model_path", "--num_virtual_tokens", "--lp_rank", "--compile_encoder",
                 "--encoder_graphs"):
        assert (f"{flag} " in text) == (script == "peft"), flag


def test_paper_defaults(tmp_path):
    for method in ("lora", "pt", "idpg", "lopa"):
        cfg = _parse(["--peft_method", method] + BASE, tmp_path=tmp_path)
        assert cfg.train.lr == PAPER_LR[method] == (1e-4 if method == "lora" else 1e-3)
        assert (cfg.model.num_virtual_tokens, cfg.model.lp_rank, cfg.model.seed) == (10, 1, 9876)
        assert (cfg.train.num_epochs, cfg.train.per_gpu_train_batch_size, cfg.train.num_warmup_steps) == (10, 2, 0)
        assert (cfg.train.weight_decay, cfg.train.warmup_ratio, cfg.train.lr_scheduler_type) == (0.0, 0.0, "linear")
        assert cfg.model.enc_model_type == ("codesage-small" if method in ("lopa", "idpg") else None)
        assert (cfg.output.save_every, cfg.output.save_total_limit) == (SaveEvery(1), 1)  # a crash loses an epoch
        assert cfg.output.keep_checkpoints is False  # removed once final/ exists
        assert cfg.output.wandb_logging is False
    assert _parse(["--peft_method", "lora", "--lr", "3e-4"] + BASE, tmp_path=tmp_path).train.lr == 3e-4


def test_keep_checkpoints_follows_save_every_unless_given(tmp_path):
    def keep(*flags, method="pt"):
        return _parse(["--peft_method", method, *flags] + BASE, tmp_path=tmp_path).output.keep_checkpoints

    assert (keep(), keep("--save_every", "2"), keep("--save_every", "2", "--keep_checkpoints", "false")) == \
        (False, True, False)
    assert (keep("--keep_checkpoints"), keep("--keep_checkpoints", "True")) == (True, True)


def test_a_default_log_dir_taken_in_the_same_second_gets_a_suffix(tmp_path, monkeypatch):
    """Two runs started in the same second without --log_dir picked the same directory; the second was refused
    ("pass another --log_dir"), though it had been given none."""
    import datetime
    import types

    from utils import cli

    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.datetime(2026, 11, 27, 12, 14, 48)

    monkeypatch.setattr(cli, "datetime", types.SimpleNamespace(datetime=Frozen))  # cli's name only
    monkeypatch.chdir(tmp_path)
    assert cli.default_log_dir() == "logging/20261127-121448"
    (tmp_path / "logging" / "20261127-121448").mkdir(parents=True)
    assert cli.default_log_dir() == "logging/20261127-121448-2"
    (tmp_path / "logging" / "20261127-121448-2").mkdir()
    assert cli.default_log_dir() == "logging/20261127-121448-3"


def test_two_runs_that_picked_the_same_default_log_dir_make_two_directories(tmp_path, monkeypatch):
    """Runs started in the same second (a shell loop with &) pick the name before either creates it: the one that
    creates it second takes the next -N. A --log_dir given by the user is created as it is, or used as it is."""
    from utils import cli

    monkeypatch.chdir(tmp_path)
    first, second = cli.default_log_dir(), cli.default_log_dir()
    assert first == second and not os.path.exists(first)
    assert cli.make_log_dir(first) == pathlib.Path(first)
    assert cli.make_log_dir(second) == pathlib.Path(f"{first}-2") and os.path.isdir(f"{first}-2")
    assert cli.make_log_dir(first) == pathlib.Path(f"{first}-3")  # a third such run
    given = tmp_path / "given" / "run"
    assert cli.make_log_dir(given) == given and cli.make_log_dir(given) == given


def test_default_log_dir_is_a_timestamp_under_logging():
    cfg = parse_args(["--peft_method", "pt"] + BASE, "peft")
    assert re.fullmatch(r"logging/\d{8}-\d{6}", cfg.output.log_dir)


def test_seed_readme_fft_command_parses_with_real_booleans(tmp_path):
    cfg = _parse(["--local_rank=0", "--path_to_ds_config", "config_files/zero_stage3_config.json", "--fp16", "False",
                  "--gradient_accumulation_steps", "2"], "fft", tmp_path)
    assert (cfg.model.method, cfg.model.task_name, cfg.model.model_type) == ("fft", "mbpp", "phi-2")
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.warmup_ratio) == (1e-5, 0.05, 0.1)
    assert cfg.train.lr_scheduler_type == "linear" and cfg.train.gradient_accumulation_steps == 2
    assert (cfg.output.save_every, cfg.output.save_total_limit) == (SaveEvery(0), None)  # a whole model each
    assert cfg.train.mixed_precision == "auto"  # "False" is false, not a truthy string
    ns = build_parser("fft").parse_args(["--fp16", "True", "--log_dir", str(tmp_path / "x")])
    assert config_from_namespace(ns, "fft").train.mixed_precision == "fp16"
    ns = build_parser("fft").parse_args(["--fp16", "--mixed_precision", "bf16"])
    with pytest.raises(UserError, match="--fp16 True contradicts"):
        config_from_namespace(ns, "fft")


@pytest.mark.parametrize("argv, flag_value", [
    (["--wandb_logging"], True), (["--wandb_logging", "False"], False), (["--wandb_logging", "true"], True),
    (["--gradient_checkpointing", "no"], False), (["--pad_to_max_length", "1"], True)])
def test_flags_are_real_booleans(argv, flag_value):
    ns = build_parser("peft").parse_args(["--peft_method", "pt"] + BASE + argv)
    assert getattr(ns, argv[0][2:]) is flag_value


def test_save_every_units():
    assert SaveEvery.parse("2") == SaveEvery(2, "epochs") == SaveEvery.parse("2epochs")
    assert SaveEvery.parse("50steps") == SaveEvery(50, "steps") and str(SaveEvery.parse("50 steps")) == "50steps"
    assert SaveEvery.parse("-1") == SaveEvery.parse("0") == SaveEvery(0)
    every2 = SaveEvery.parse("2")
    assert [e for e in range(1, 7) if every2.due(epoch=e)] == [2, 4, 6] and not every2.due(step=2)
    assert [s for s in range(1, 120) if SaveEvery.parse("50steps").due(step=s)] == [50, 100]
    with pytest.raises(UserError, match="--save_every"):
        SaveEvery.parse("often")


@pytest.mark.parametrize("argv, message", [
    (["--peft_method", "lopa", "--enc_model_type", "bert-huge"], "unknown encoder type 'bert-huge'"),
    (["--peft_method", "lora", "--enc_model_type", "codebert-base"], "--enc_model_type is for idpg/lopa, not lora; "
                                                                     "drop it"),
    (["--peft_method", "pt", "--lp_rank", "4"], "--lp_rank is for lopa, not pt; drop it"),
    (["--peft_method", "lopa", "--lora_dim", "8"], "--lora_dim is for lora, not lopa; drop it"),
    (["--peft_method", "pt", "--lr", "0"], "--lr must be > 0"),
    (["--peft_method", "pt", "--num_epochs", "0"], "--num_epochs must be >= 1"),
    (["--peft_method", "pt", "--per_gpu_train_batch_size", "0"], "--per_gpu_train_batch_size must be >= 1"),
    (["--peft_method", "pt", "--warmup_ratio", "1.5"], "--warmup_ratio must be in [0, 1)"),
    (["--peft_method", "pt", "--num_virtual_tokens", "0"], "--num_virtual_tokens must be >= 1"),
    (["--peft_method", "pt", "--lr_scheduler_type", "constant", "--num_warmup_steps", "5"], "constant_with_warmup"),
    (["--peft_method", "pt", "--mixed_precision", "fp16"], "--mixed_precision fp16 (or the original's --fp16 True) "
     "needs a CUDA GPU; on the CPU use --mixed_precision bf16 or no (or --fp16 False)"),
    (["--peft_method", "pt", "--data_path", "tests"], "--data_path tests: a directory; pass the task's .jsonl file"),
    (["--peft_method", "pt", "--model_dtype", "fp16"], "--model_dtype fp16 needs a CUDA GPU; on the CPU use "
                                                       "--model_dtype bf16, or fp32"),
    (["--peft_method", "pt", "--path_to_ds_config", "missing.json"], "missing.json: no such file"),
    (["--peft_method", "pt", "--resume_from", "nowhere"], "--resume_from nowhere: not a checkpoint"),
    (["--peft_method", "lora", "--lora_dropout", "1"], "--lora_dropout must be in [0, 1)"),
    (["--peft_method", "pt", "--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--peft_method", "pt", "--weight_decay", "nan"], "--weight_decay must be >= 0, got nan"),
    (["--peft_method", "pt", "--weight_decay", "inf"], "--weight_decay must be a finite number"),
    (["--peft_method", "pt", "--max_grad_norm", "nan"], "--max_grad_norm must be >= 0, got nan"),
    (["--peft_method", "pt", "--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
    (["--peft_method", "pt", "--seed", str(2**32)], "--seed must be in [0, 2**32)"),
    (["--peft_method", "pt", "--compile", "off", "--compile_mode", "reduce-overhead"],
     "--compile_mode reduce-overhead is a mode of compiling the decoder layers, which --compile off turns off"),
    (["--peft_method", "pt", "--compile_mode", "reduce-overhead", "--path_to_ds_config",
      "config_files/zero_stage2_nofp16_config.json"],
     "--compile_mode reduce-overhead is not supported under DeepSpeed (--path_to_ds_config)"),
    (["--peft_method", "pt", "--compile_mode", "reduce-overhead", "--gradient_checkpointing"],
     "--compile_mode reduce-overhead with --gradient_checkpointing: torch's CUDA graphs fail inside"),
    (["--peft_method", "pt", "--pad_to_multiple_of", "-1"], "--pad_to_multiple_of must be >= 0, got -1"),
    (["--peft_method", "pt", "--pad_to_max_length", "--pad_to_multiple_of", "64"],
     "--pad_to_multiple_of 64 does nothing under --pad_to_max_length"),
])
def test_bad_values_fail_in_parsing(tmp_path, argv, message):
    if "fp16" in argv and __import__("torch").cuda.is_available():
        pytest.skip("fp16 is valid on a GPU machine")
    with pytest.raises(UserError) as err:
        _parse(argv + BASE, tmp_path=tmp_path)
    assert message in str(err.value)
    assert not (tmp_path / "run").exists()


def test_file_problems_are_found_before_anything_is_written(tmp_path, data_paths):
    (tmp_path / "ds.json").write_bytes(b'{"zero_optimization": {"stage": 2}, "x": "\xff"}')  # a binary file, say
    with pytest.raises(UserError, match=r"ds\.json: not UTF-8 text \(byte 0xff at offset 42\); --path_to_ds_config"):
        _parse(["--peft_method", "pt", "--path_to_ds_config", str(tmp_path / "ds.json")] + BASE, tmp_path=tmp_path)
    (tmp_path / "ds.json").write_text("[1, 2]")
    with pytest.raises(UserError, match=r"ds\.json: expected a JSON object"):
        _parse(["--peft_method", "pt", "--path_to_ds_config", str(tmp_path / "ds.json")] + BASE, tmp_path=tmp_path)
    with pytest.raises(UserError, match="missing field 'task_id'; it looks like CRUXEval data .*; the task mbpp "
                                        "needs the MBXP-format MBPP"):
        _parse(["--peft_method", "pt", "--data_path", data_paths["cruxeval"]] + BASE, tmp_path=tmp_path)
    (tmp_path / "model").mkdir()
    with pytest.raises(UserError, match="--model_path .*model: no config.json"):
        _parse(["--peft_method", "pt", "--model_path", str(tmp_path / "model")] + BASE, tmp_path=tmp_path)
    assert not (tmp_path / "run").exists()
    (tmp_path / "run").write_text("")
    with pytest.raises(UserError, match="exists and is not a directory; pass a directory path"):
        _parse(["--peft_method", "pt"] + BASE, tmp_path=tmp_path)
    with pytest.raises(UserError, match=r"--log_dir .*run/sub: .*run is a file, not a directory"):
        _parse(["--peft_method", "pt"] + BASE + ["--log_dir", str(tmp_path / "run" / "sub")])


@pytest.mark.parametrize("method, way_out", [("fft", "tune_fft_baseline.py"), ("none", "--peft_method none")])
def test_methods_this_script_does_not_train_name_the_way_out(method, way_out, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser("peft").parse_args(["--peft_method", method] + BASE)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1
    assert f"invalid choice: '{method}' (choose from lora, pt, idpg, lopa)" in err and way_out in err


def test_an_abbreviated_flag_is_refused_not_taken_for_the_flag_it_begins(capsys):
    """``--limit 3`` trained on 3 examples (argparse read it as --limit_train_examples), where generate_preds.py's
    --limit means test tasks; run_experiment.py's ``--meth`` ran the --methods subset."""
    import run_experiment

    for parse, argv, meant in (
            (build_parser("peft").parse_args, ["--peft_method", "pt", *BASE, "--limit", "3"], "--limit_train_examples"),
            (build_parser("fft").parse_args, [*BASE, "--num_ep", "2"], "--num_epochs"),
            (run_experiment.parse_args, ["--preset", "smoke", "--meth", "pt"], "--methods")):
        with pytest.raises(SystemExit) as exc:
            parse(argv)
        assert exc.value.code == 2
        assert capsys.readouterr().err == (f"error: unrecognized arguments: {' '.join(argv[-2:])}; flags are not "
                                           f"abbreviated: spell out {meant}\n")
    # the same setting under another script's name (generate_preds.py's --dtype is training's --model_dtype)
    import generate_preds

    for parse, argv, meant in ((build_parser("peft").parse_args, ["--peft_method", "pt", *BASE, "--dtype", "bf16"],
                                "--model_dtype"),
                               (generate_preds.build_parser().parse_args, [*BASE, "--model_dtype", "bf16"], "--dtype"),
                               # run_experiment's --out is the stages' --log_dir, and the reverse
                               (build_parser("peft").parse_args, ["--peft_method", "pt", *BASE, "--out", "r"],
                                "--log_dir"),
                               (run_experiment.parse_args, ["--preset", "smoke", "--log_dir", "r"], "--out"),
                               (build_parser("fft").parse_args, [*BASE, "--learning_rate", "1e-5"], "--lr")):
        with pytest.raises(SystemExit):
            parse(argv)
        assert capsys.readouterr().err.endswith(f"; did you mean {meant}?\n")


def test_fft_rejects_a_low_precision_master_copy(tmp_path):
    with pytest.raises(UserError, match="--model_dtype must be fp32"):
        _parse(["--model_dtype", "bf16"], "fft", tmp_path)


@pytest.mark.parametrize("argv", [
    ["--peft_method", "lopa", "--task_name", "mbpp", "--model_type", "gpt-9"],
    ["--peft_method", "prefix", "--task_name", "mbpp", "--model_type", "tiny-llama"],
    ["--peft_method", "pt", "--task_name", "mbpp", "--model_type", "tiny-llama", "--data_path", "no.jsonl"],
    ["--peft_method", "pt", "--task_name", "mbpp", "--model_type", "tiny-llama", "--num_epochs", "x"],
])
def test_cli_exits_2_with_one_line_and_writes_nothing(tmp_path, argv):
    log_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "tune_foundation_model.py", *argv, "--log_dir", str(log_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert not log_dir.exists() and proc.stdout == ""


def test_a_used_log_dir_needs_resume_and_one_without_a_checkpoint_needs_a_fresh_start(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")  # killed before its first checkpoint: nothing to resume
    with pytest.raises(UserError, match="stopped before its first checkpoint, so it cannot be resumed; remove"):
        _parse(["--peft_method", "pt"] + BASE, tmp_path=tmp_path)
    with pytest.raises(UserError, match="saved no checkpoint: it stopped before its first one.*start over without "
                                        "--resume_from"):
        _parse(["--peft_method", "pt"] + BASE + ["--resume_from", str(run)], tmp_path=tmp_path)
    (run / "final").mkdir()  # finished, its checkpoints removed (PEFT's default) or never written: not to be removed
    finished = f"already holds a finished run \\(its model: {run / 'final'}\\); choose another --log_dir$"
    with pytest.raises(UserError, match=finished):
        _parse(["--peft_method", "pt"] + BASE, tmp_path=tmp_path)
    with pytest.raises(UserError, match=f"this run finished \\(its model: {run / 'final'}\\) and keeps no "
                                        f"checkpoint .*: there is nothing to resume$"):
        _parse(["--peft_method", "pt"] + BASE + ["--resume_from", str(run)], tmp_path=tmp_path)
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run / "checkpoints" / "step_00000002" / "trainer_state.json").write_text("{}")
    (run / "checkpoints" / "latest").write_text("step_00000002\n")
    with pytest.raises(UserError, match=finished):
        _parse(["--peft_method", "pt"] + BASE, tmp_path=tmp_path)  # finished, its checkpoints kept (--save_every)
    (run / "final").rmdir()
    with pytest.raises(UserError, match=f"already holds a run .*; pass --resume_from {run} to continue it"):
        _parse(["--peft_method", "pt"] + BASE, tmp_path=tmp_path)


def test_a_log_dir_holding_a_model_or_other_files_is_refused(tmp_path):
    """A model directory given as --log_dir (--model_path and --log_dir swapped) had its config.json overwritten
    by the run's, and no longer loaded; the project's root was written into too."""
    run = tmp_path / "run"
    run.mkdir()
    model_config = '{"model_type": "phi", "hidden_size": 64}'
    (run / "config.json").write_text(model_config)
    with pytest.raises(UserError, match=r"holds files no training run wrote \(config.json \(a model's\)\); a run "
                                        r"writes its config.json and final/ there: choose a new or empty --log_dir"):
        _parse(["--peft_method", "pt"] + BASE, tmp_path=tmp_path)
    (run / "config.json").unlink()
    (run / "README.md").write_text("notes")
    with pytest.raises(UserError, match=r"holds files no training run wrote \(README.md\)"):
        _parse(["--peft_method", "pt"] + BASE, tmp_path=tmp_path)
    (run / "README.md").unlink()
    # what a run killed while starting leaves is no obstacle: its log, its config, a temporary file
    (run / "train.log").write_text("")
    (run / "config.json").write_text(json.dumps({"script": "tune_foundation_model.py", "runtime": {}}))
    (run / ".config.json.abc.tmp").write_text("")
    (run / "preds").mkdir()  # predictions generate_preds.py wrote there (README's layout)
    (run / "preds" / "generate_preds_config.json").write_text("{}")
    assert _parse(["--peft_method", "pt"] + BASE, tmp_path=tmp_path).output.log_dir == str(run)
    (run / "final").mkdir()  # finished: said so, whatever else is there
    (run / "notes.txt").write_text("")
    with pytest.raises(UserError, match="already holds a finished run"):
        _parse(["--peft_method", "pt"] + BASE, tmp_path=tmp_path)


def test_resume_rejects_changed_arguments(tmp_path):
    cfg = _parse(["--peft_method", "pt"] + BASE, tmp_path=tmp_path)
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    (ckpt / "config.json").write_text(json.dumps(cfg.to_dict()))
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000002\n")
    resumed = parse_args(["--peft_method", "pt"] + BASE + ["--resume_from", str(tmp_path / "run")], "peft")
    assert resumed.output.log_dir == str(tmp_path / "run")  # continues in the run's own directory
    for where in (tmp_path / "run" / "checkpoints", ckpt):  # find_checkpoint accepts both; the log_dir is the run's
        again = parse_args(["--peft_method", "pt"] + BASE + ["--resume_from", str(where)], "peft")
        assert again.output.log_dir == str(tmp_path / "run")
    # a resume may change --compile_mode and --pad_to_multiple_of (the layout, not the data order or what is trained)
    parse_args(["--peft_method", "pt"] + BASE + ["--compile_mode", "reduce-overhead", "--pad_to_multiple_of", "32",
                                                  "--resume_from", str(ckpt)], "peft")
    with pytest.raises(UserError, match=r"field 'train.max_train_steps' is None but this run has 5; drop "
                                        r"--max_train_steps to resume"):
        parse_args(["--peft_method", "pt"] + BASE + ["--max_train_steps", "5", "--resume_from", str(ckpt)], "peft")
    with pytest.raises(UserError, match=r"micro-batch x accumulation steps is 2 x 1, this run's 4 x 1"):
        parse_args(["--peft_method", "pt"] + BASE + ["--per_gpu_train_batch_size", "4", "--resume_from",
                                                      str(ckpt)], "peft")
    with pytest.raises(UserError, match=r"field 'model.method' is 'pt'.*--peft_method pt"):
        parse_args(["--peft_method", "lora"] + BASE + ["--resume_from", str(ckpt)], "peft")
    with pytest.raises(UserError, match=r"field 'script' is 'peft'; resume it with tune_foundation_model.py "
                                        r"\(this is tune_fft_baseline.py\)"):
        parse_args(BASE + ["--resume_from", str(ckpt)], "fft")



def test_a_resume_may_split_the_same_steps_into_other_micro_batches_and_nothing_else(tmp_path):
    """A run that ran out of GPU memory goes on with a smaller micro-batch and more accumulation where every step
    takes the same examples (tests/test_training_runs.py runs one); another number of examples per step,
    --group_by_length, a DeepSpeed checkpoint and an epoch that accelerate evens out with other repeats (several
    processes) are refused in one line naming the checkpoint's split."""
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 2, "batch_in_epoch": 4}))
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000002\n")

    def checkpoint(processes: int, examples: int, *flags: str) -> None:
        saved = _parse(["--peft_method", "pt", *BASE, "--per_gpu_train_batch_size", "2",
                        "--gradient_accumulation_steps", "2", *flags], tmp_path=tmp_path / "new")
        runtime = {"num_processes": processes, "train_examples": examples}
        (ckpt / "config.json").write_text(json.dumps({**saved.to_dict(), "runtime": runtime}))

    def resume(batch: int, accumulation: int, *flags: str):
        train = parse_args(["--peft_method", "pt", *BASE, "--per_gpu_train_batch_size", str(batch),
                            "--gradient_accumulation_steps", str(accumulation), *flags, "--resume_from",
                            str(tmp_path / "run")], "peft").train
        return train.per_gpu_train_batch_size, train.gradient_accumulation_steps

    keep = r"; pass --per_gpu_train_batch_size 2 --gradient_accumulation_steps 2 to resume, or start a new run$"
    checkpoint(1, 6)  # one process: 6 examples in steps of 4, each epoch's last step 2 of them in either split
    assert resume(1, 4) == (1, 4) and resume(4, 1) == (4, 1) and resume(2, 2) == (2, 2)
    with pytest.raises(UserError, match=r"step_00000002/config.json: the checkpoint's micro-batch x accumulation "
                                        r"steps is 2 x 2, this run's 1 x 2: a resume may change them only where the "
                                        r"product \(the examples per step on each process, 4\) stays the same" + keep):
        resume(1, 2)
    checkpoint(2, 6)  # 2 x 2 on two processes repeats 2 examples to fill its last step, 1 x 4 none
    with pytest.raises(UserError, match=r"with 2 processes and 6 examples accelerate repeats examples to give each "
                                        r"process as many micro-batches, 2 with micro-batches of 2, 0 with 1, so the "
                                        r"last step of each epoch would train on other examples" + keep):
        resume(1, 4)
    checkpoint(2, 8)  # no repeats either way
    assert resume(1, 4) == (1, 4)
    lengths = [5, 1, 4, 2, 3, 6]
    assert list(LengthGroupedSampler(lengths, 2)) != list(LengthGroupedSampler(lengths, 1))  # another order
    checkpoint(1, 6, "--group_by_length")
    assert resume(2, 2, "--group_by_length") == (2, 2)
    with pytest.raises(UserError, match=r"--group_by_length groups the examples by micro-batch, so another one "
                                        r"changes their order" + keep):
        resume(1, 4, "--group_by_length")
    checkpoint(1, 6)
    (ckpt / "deepspeed").mkdir()  # a DeepSpeed checkpoint: refused once, before a resume with another split was tried
    assert resume(1, 4) == (1, 4)


def test_a_checkpoint_that_records_only_one_half_of_the_split_resumes_as_other_unrecorded_fields_do(tmp_path):
    """A record without --gradient_accumulation_steps (the micro-batch alone): the split cannot be judged, so it is
    accepted, as an unrecorded field is (not a KeyError)."""
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000002\n")
    saved = _parse(["--peft_method", "pt", *BASE], tmp_path=tmp_path / "new").to_dict()
    del saved["train"]["gradient_accumulation_steps"]
    (ckpt / "config.json").write_text(json.dumps(saved))
    train = parse_args(["--peft_method", "pt", *BASE, "--gradient_accumulation_steps", "3", "--resume_from",
                        str(tmp_path / "run")], "peft").train
    assert (train.per_gpu_train_batch_size, train.gradient_accumulation_steps) == (2, 3)


def test_a_run_that_recorded_another_methods_flag_still_resumes(tmp_path):
    """Before such flags were refused, a pt run given --lp_rank 4 recorded it; resuming it now met two errors that
    each asked for the other's fix."""
    run = tmp_path / "run"
    cfg = parse_args(["--peft_method", "pt"] + BASE + ["--log_dir", str(run)], "peft").to_dict()
    cfg["model"]["lp_rank"] = 4
    ckpt = run / "checkpoints" / "step_00000002"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    (ckpt / "config.json").write_text(json.dumps(cfg))
    (run / "checkpoints" / "latest").write_text("step_00000002\n")
    assert parse_args(["--peft_method", "pt"] + BASE + ["--resume_from", str(run)], "peft").model.lp_rank == 1
    cfg["model"]["num_virtual_tokens"] = 20  # a flag pt reads must still match
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="field 'model.num_virtual_tokens' is 20 but this run has 10"):
        parse_args(["--peft_method", "pt"] + BASE + ["--resume_from", str(run)], "peft")


def test_resuming_a_checkpoint_from_before_encoder_dropout_keeps_its_eval_mode_encoder(tmp_path):
    """Its config.json has no 'encoder_dropout': that run's encoder ran in eval mode, so the new default (True)
    would change the training half-way; pt never had an encoder, so the missing field does not matter there."""
    for method, extra in (("lopa", ["--enc_model_type", "tiny-roberta"]), ("pt", [])):
        run = tmp_path / method
        cfg = parse_args(["--peft_method", method] + BASE + extra + ["--log_dir", str(run)], "peft").to_dict()
        del cfg["model"]["encoder_dropout"]
        ckpt = run / "checkpoints" / "step_00000002"
        ckpt.mkdir(parents=True)
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
        (ckpt / "config.json").write_text(json.dumps(cfg))
        (run / "checkpoints" / "latest").write_text("step_00000002\n")
        argv = ["--peft_method", method] + BASE + extra + ["--resume_from", str(run)]
        if method == "pt":  # no encoder: nothing recorded, and the flag is not pt's
            assert parse_args(argv, "peft").model.encoder_dropout is None
            with pytest.raises(UserError, match="--encoder_dropout is for idpg/lopa, not pt; drop it"):
                parse_args(argv + ["--encoder_dropout", "False"], "peft")
            continue
        with pytest.raises(UserError, match=r"no field 'model.encoder_dropout' \(written before it existed, when "
                                            r"the frozen encoder always ran in eval mode\) but this run has True; pass "
                                            r"--encoder_dropout False to resume"):
            parse_args(argv, "peft")
        assert parse_args(argv + ["--encoder_dropout", "False"], "peft").model.encoder_dropout is False


def test_shipped_accelerate_configs_name_existing_deepspeed_files():
    configs = ROOT / "config_files"
    yamls = {p.name: yaml.safe_load(p.read_text()) for p in configs.glob("*.yaml")}
    assert {"config_single_gpu.yaml", "config_multi_gpu.yaml", "config_ds_zero_stage2_no_fp16.yaml",
            "config_ds_zero3_fft.yaml"} <= set(yamls)
    assert yamls["config_single_gpu.yaml"]["num_processes"] == 1
    assert yamls["config_multi_gpu.yaml"]["distributed_type"] == "MULTI_GPU"
    for name, cfg in yamls.items():
        if cfg["distributed_type"] == "DEEPSPEED":
            ds_file = ROOT / cfg["deepspeed_config"]["deepspeed_config_file"]
            ds = json.loads(ds_file.read_text())
            stage = ds["zero_optimization"]["stage"]
            assert stage == (3 if "fft" in name else 2)
            assert ds["train_micro_batch_size_per_gpu"] == ds["gradient_accumulation_steps"] == "auto"
    stage2 = json.loads((configs / "zero_stage2_nofp16_config.json").read_text())
    assert "fp16" not in stage2 and stage2["optimizer"]["params"]["torch_adam"] is True
    assert json.loads((configs / "zero_stage2_config.json").read_text())["fp16"]["enabled"] is True
    stage3 = json.loads((configs / "zero_stage3_config.json").read_text())
    assert stage3["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert stage3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    for path in configs.glob("*.json"):  # the schedule comes from --lr_scheduler_type in every launch mode
        assert "scheduler" not in json.loads(path.read_text()), path


def test_compile_switch_is_validated_and_auto_by_default():
    from utils.train_args import parse_args

    config = parse_args(["--peft_method", "pt", "--task_name", "mbpp", "--model_type", "tiny-llama"], script="peft")
    assert config.train.compile == "auto"
    off = parse_args(["--peft_method", "pt", "--task_name", "mbpp", "--model_type", "tiny-llama", "--compile", "off"],
                     script="peft")
    assert off.train.compile == "off"


def test_compile_mode_auto_and_the_width_multiple(monkeypatch):
    """--compile_mode defaults to auto and the multiple to unset; the multiple is 64 where the layers compile with
    reduce-overhead (CUDA graphs, one per batch shape), off with 0 or 1, and off under --pad_to_max_length (one
    length already)."""
    from utils.train_config import TrainArgs
    from utils.train_setup import make_accelerator
    from utils.train_config import pad_multiple

    config = parse_args(["--peft_method", "pt"] + BASE, script="peft")
    assert (config.train.compile_mode, config.train.pad_to_multiple_of) == ("auto", None)
    assert parse_args(["--task_name", "mbpp", "--model_type", "tiny-llama"], script="fft").train.compile_mode == "auto"
    assert parse_args(["--peft_method", "pt", "--pad_to_max_length", "--pad_to_multiple_of", "1"] + BASE,
                      "peft").train.pad_to_multiple_of == 1  # off: nothing to contradict
    cases = [({}, "reduce-overhead", 64), ({}, "default", None), ({}, None, None),
             ({"pad_to_multiple_of": 0}, "reduce-overhead", None), ({"pad_to_multiple_of": 1}, None, None),
             ({"pad_to_multiple_of": 32}, None, 32), ({"pad_to_max_length": True}, "reduce-overhead", None)]
    for fields, mode, want in cases:
        assert pad_multiple(TrainArgs(**fields), mode) == want, (fields, mode)
    # accelerate launch with a DeepSpeed YAML: refused before the Accelerator (and DeepSpeed) is built
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "config_files/zero_stage2_nofp16_config.json")
    graphs = parse_args(["--peft_method", "pt", "--compile_mode", "reduce-overhead"] + BASE, "peft")
    with pytest.raises(UserError, match=r"not supported under DeepSpeed \(the accelerate config's distributed_type"):
        make_accelerator(graphs)


def test_compile_mode_default_goes_with_what_reduce_overhead_is_refused_with(tmp_path):
    """--compile off, DeepSpeed and --gradient_checkpointing refuse reduce-overhead (CUDA graphs) only: the default
    mode, named, is accepted with each of them (and recorded as given)."""
    for extra in (["--compile", "off"], ["--gradient_checkpointing"],
                  ["--path_to_ds_config", "config_files/zero_stage2_nofp16_config.json"]):
        config = _parse(["--peft_method", "pt", "--compile_mode", "default", *extra] + BASE, tmp_path=tmp_path)
        assert config.train.compile_mode == "default", extra


def test_compile_mode_auto_chooses_cuda_graphs_only_where_they_were_run():
    """auto: reduce-overhead for a PEFT method in one process on CUDA, without DeepSpeed, activation checkpoints or
    the encoder's own CUDA graphs; otherwise the default mode, with every reason named. A named mode is kept."""
    from utils.train_config import TrainArgs
    from utils.train_config import resolve_compile_mode

    auto = TrainArgs()
    for method in ("pt", "lora", "lopa", "idpg"):
        assert resolve_compile_mode(auto, method, "cuda", 1, False, False) == ("reduce-overhead", None)
    assert resolve_compile_mode(auto, "fft", "cuda", 1, False, False) == ("default",
                                                                          "fft has not been run with them")
    cases = [((auto, "pt", "cpu", 1, False, False), "the device is cpu, not CUDA"),
             ((auto, "pt", "cuda", 2, False, False), "2 processes"),
             ((auto, "lora", "cuda", 1, True, False), "DeepSpeed"),
             ((TrainArgs(gradient_checkpointing=True), "pt", "cuda", 1, False, False), "--gradient_checkpointing"),
             ((auto, "lopa", "cuda", 1, False, True), "--encoder_graphs"),
             ((TrainArgs(gradient_checkpointing=True), "fft", "cpu", 4, True, False),
              "the device is cpu, not CUDA; fft has not been run with them; 4 processes; DeepSpeed; "
              "--gradient_checkpointing")]
    for args, reason in cases:
        assert resolve_compile_mode(*args) == ("default", reason), args
    for mode in ("default", "reduce-overhead"):
        assert resolve_compile_mode(TrainArgs(compile_mode=mode), "fft", "cpu", 2, False, False) == (mode, None)


def test_a_resumed_run_keeps_the_checkpointing_it_was_started_with(tmp_path):
    """A run started with --save_every 2steps (or before PEFT's per-epoch default) and resumed without the flag
    kept checkpointing under today's default, pruning its earlier checkpoints to one."""
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text("{}")
    (run / "checkpoints" / "latest").write_text("step_00000002\n")
    (step / "config.json").write_text(json.dumps({"output": {"save_every": "2steps", "save_total_limit": None}}))
    resume = ["--peft_method", "pt", *BASE, "--resume_from", str(run)]
    cfg = config_from_namespace(build_parser("peft").parse_args(resume), "peft")
    assert (cfg.output.save_every, cfg.output.save_total_limit, cfg.output.keep_checkpoints) == \
        (SaveEvery(2, "steps"), None, True)
    cfg = config_from_namespace(build_parser("peft").parse_args(
        [*resume, "--save_every", "1", "--save_total_limit", "3"]), "peft")  # the command line wins
    assert (cfg.output.save_every, cfg.output.save_total_limit, cfg.output.keep_checkpoints) == (SaveEvery(1), 3, True)
    (step / "config.json").write_text(json.dumps({"output": {"save_every": "1epochs", "save_total_limit": 1,
                                                             "keep_checkpoints": False}}))
    cfg = config_from_namespace(build_parser("peft").parse_args(resume), "peft")
    assert (cfg.output.save_every, cfg.output.save_total_limit, cfg.output.keep_checkpoints) == (SaveEvery(1), 1, False)


def test_mbpp_split_with_a_cruxeval_task_is_refused_by_every_script(tmp_path, capsys):
    """--mbpp_split picks MBPP's tasks: with CRUXEval it did nothing, yet config.json recorded it (and
    run_experiment's --set mbpp_split=standard retrained every CRUXEval cell for the same result)."""
    import evaluate_preds
    import generate_preds

    message = "--mbpp_split standard is for --task_name mbpp; cruxeval_output_prediction has one split: drop it"
    crux = ["--task_name", "cruxeval_output_prediction", "--model_type", "tiny-llama"]
    with pytest.raises(UserError, match=re.escape(message)):
        _parse(["--peft_method", "pt", *crux, "--mbpp_split", "standard"], tmp_path=tmp_path)
    assert _parse(["--peft_method", "pt", *crux], tmp_path=tmp_path).model.mbpp_split == "paper"  # the default
    with pytest.raises(SystemExit) as exit_:
        generate_preds.main([*crux, "--mbpp_split", "standard", "--log_dir", str(tmp_path / "gen")])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(UserError, match=re.escape(message)):
        evaluate_preds.parse_args(["--task_name", "cruxeval_output_prediction", "--path", str(tmp_path / "a.json"),
                                   "--mbpp_split", "standard"])
