"""A full disk (ENOSPC) part-way through every writer: one line naming the file, no good output lost, no partial
output read as complete, and the rerun (--resume_from, --resume, run_experiment) recovers.

The disk fills by monkeypatching a write to raise what the libraries raise on a full tmpfs (measured there):
OSError(ENOSPC) from Python files, SafetensorError / Exception with "(os error 28)" from the Rust libraries.
"""
import errno
import json
import pathlib

import pytest
import torch

from tests.test_training_runs import run_inprocess
from tests.test_training_units import accelerated  # noqa: F401 (fixture)
from utils.checkpoint import LATEST, TrainerState, find_checkpoint, load_checkpoint, save_checkpoint
from utils.errors import UserError, cli_entry
from utils.train_logging import MetricsFile, read_metrics


def enospc(filename=None) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", filename)


def raising(exc):
    def main(*args, **kwargs):
        raise exc
    return main


def test_cli_entry_prints_a_full_disk_as_one_line_and_lets_other_errors_through(capsys):
    class CellFailed(Exception):  # quotes a disk-full message but is not one: must pass through untouched
        pass

    for exc, line in [(enospc("/out/metrics.jsonl"), "error: /out/metrics.jsonl: no space left on device; free "
                                                       "space there (or write elsewhere) and rerun"),
                      (Exception("No space left on device (os error 28)"),  # tokenizers' save
                       "error: no space left on device writing the output; free space on its file system")]:
        with pytest.raises(SystemExit) as exit_info:
            cli_entry(raising(exc))()
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(line) and err.count("\n") == 1 and "Traceback" not in err
    for exc in (OSError(errno.EACCES, "Permission denied"), CellFailed("OSError: (os error 28)")):
        with pytest.raises(type(exc)):
            cli_entry(raising(exc))()


def test_an_interrupted_run_says_how_to_go_on_below_the_traceback(monkeypatch, capsys, tmp_path, data_paths):
    """Ctrl-C printed Python's traceback and nothing else: not that --resume (or --resume_from) goes on."""
    import sys

    import generate_preds
    from utils import generation
    from utils.errors import on_interrupt

    def interrupted(hint):
        def run():
            if hint is not None:
                on_interrupt(hint)
            raise KeyboardInterrupt
        return run

    for hint, shown in (("say this", "interrupted: say this\n"), (lambda: "made then", "interrupted: made then\n"),
                        (None, "")):  # cli_entry forgets an earlier run's hint
        monkeypatch.setattr(sys, "excepthook", lambda *exc: print("Traceback ...", file=sys.stderr))
        with pytest.raises(KeyboardInterrupt) as info:  # still raised: the exit status stays Python's
            cli_entry(interrupted(hint))()
        sys.excepthook(KeyboardInterrupt, info.value, None)
        assert capsys.readouterr().err == "Traceback ...\n" + shown
    # run_experiment runs each stage's main inside its own: the outer advice is the one printed, once
    inner = cli_entry(interrupted("a stage's"))
    outer = cli_entry(lambda: (on_interrupt("the runner's"), inner()))
    monkeypatch.setattr(sys, "excepthook", lambda *exc: print("Traceback ...", file=sys.stderr))
    with pytest.raises(KeyboardInterrupt) as info:
        outer()
    sys.excepthook(KeyboardInterrupt, info.value, None)
    assert capsys.readouterr().err == "Traceback ...\ninterrupted: the runner's\n"
    monkeypatch.setattr(sys, "excepthook", lambda *exc: print("Traceback ...", file=sys.stderr))
    monkeypatch.setattr(generation, "generate_predictions", raising(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt) as info:
        generate_preds.main(["--task_name", "mbpp", "--model_type", "tiny-phi-2", "--data_path", data_paths["mbpp"],
                             "--limit", "2", "--no_progress", "--log_dir", str(tmp_path / "gen")])
    capsys.readouterr()
    sys.excepthook(KeyboardInterrupt, info.value, None)
    assert capsys.readouterr().err.endswith(f"interrupted: rerun the same command with --resume (and --log_dir "
                                            f"{tmp_path / 'gen'}): it keeps the finished batches and generates the "
                                            f"rest\n")
    import evaluate_preds  # before scoring starts: the line names the file of kept samples (evaluate_file then counts)

    monkeypatch.setattr(sys, "excepthook", lambda *exc: print("Traceback ...", file=sys.stderr))
    monkeypatch.setattr(evaluate_preds, "evaluate_file", raising(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt) as info:
        evaluate_preds.main(["--task_name", "mbpp", "--path", str(tmp_path / "mbxp_solutions_stage1.jsonl")])
    sys.excepthook(KeyboardInterrupt, info.value, None)
    assert capsys.readouterr().err == (f"Traceback ...\ninterrupted: rerun the same command: it goes on from the "
                                       f"samples kept in {tmp_path / 'mbxp_solutions_stage1_results.partial.jsonl'}"
                                       f", if any\n")



def test_a_run_stopped_while_it_loads_says_that_nothing_was_written(monkeypatch, capsys, tmp_path, data_paths):
    """Ctrl-C or SIGTERM while the model loads (minutes for a large one) printed a bare traceback: a training and a
    generation say that nothing was written yet, and that the same command goes on."""
    import sys

    import generate_preds
    from utils import training

    line = "stopped while the model and data loaded, before the run wrote anything: rerun the same command\n"
    monkeypatch.setattr(training.Trainer, "_build", raising(KeyboardInterrupt()))
    monkeypatch.setattr(generate_preds, "load_model", raising(KeyboardInterrupt()))
    for run in (lambda: run_inprocess("peft", ["--peft_method", "pt", "--task_name", "mbpp", "--model_type",
                                               "tiny-llama", "--data_path", data_paths["mbpp"], "--log_dir",
                                               str(tmp_path / "train")]),
                lambda: generate_preds.main(["--task_name", "mbpp", "--model_type", "tiny-phi-2", "--data_path",
                                             data_paths["mbpp"], "--limit", "2", "--log_dir", str(tmp_path / "gen")])):
        monkeypatch.setattr(sys, "excepthook", lambda *exc: print("Traceback ...", file=sys.stderr))
        with pytest.raises(KeyboardInterrupt) as info:
            run()
        capsys.readouterr()
        sys.excepthook(KeyboardInterrupt, info.value, None)
        assert capsys.readouterr().err == "Traceback ...\ninterrupted: " + line
    assert not (tmp_path / "train").exists() and not (tmp_path / "gen").exists()

def test_a_full_disk_elsewhere_is_named_beside_the_output_it_stopped(tmp_path, monkeypatch):
    """A run wrapped as a whole names its log_dir; when the file the OS names lies elsewhere (a cache in /tmp),
    that one is named too, else the user frees space on the wrong file system."""
    from utils.fileio import naming_full_disk

    run = tmp_path / "run"
    for inside, shown in ((enospc("/tmp/inductor/cache.bin"), " (writing /tmp/inductor/cache.bin);"),
                          (enospc(f"{tmp_path}2/cache.bin"), f" (writing {tmp_path}2/cache.bin);"),  # a sibling
                          (enospc(str(run / "metrics.jsonl")), ";"), (enospc(), ";")):
        with pytest.raises(UserError) as err, naming_full_disk(run, "free space"):
            raise inside
        assert str(err.value) == f"{run}: no space left on device{shown} free space"
    monkeypatch.chdir(tmp_path)  # a relative --log_dir (the default is one): its files are its own
    with pytest.raises(UserError) as err, naming_full_disk("run", "free space"):
        raise enospc("run/metrics.jsonl")
    assert str(err.value) == "run: no space left on device; free space"


def fail_torch_save_on(monkeypatch, name: str) -> None:
    """torch.save into ``name`` fails as on a full disk: given a path, torch raises RuntimeError("... unexpected
    pos ...") with no word of the disk; given a Python file, that file's OSError(ENOSPC)."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if pathlib.Path(getattr(f, "name", f)).name == name:
            if isinstance(f, (str, pathlib.Path)):
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
            raise enospc()
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_a_checkpoint_cut_off_by_a_full_disk_is_removed_and_named_and_the_last_good_one_resumes(
        tmp_path, accelerated, monkeypatch):  # noqa: F811
    acc, model, opt, sched = accelerated
    root = tmp_path / "checkpoints"
    save_checkpoint(acc, model, opt, sched, TrainerState(global_step=1, num_processes=1), {}, root)
    weight = model.weight.detach().clone()
    fail_torch_save_on(monkeypatch, "optimizer.pt")
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(UserError) as info:
        save_checkpoint(acc, model, opt, sched, TrainerState(global_step=2, num_processes=1), {}, root,
                        total_limit=1)
    assert str(info.value) == (f"{root / '.tmp-step_00000002'}: no space left on device; it was removed; free space, "
                               f"then rerun with --resume_from {tmp_path}: it continues from step_00000001, the last "
                               f"complete checkpoint")
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "step_00000001"]  # the partial one gave its space back
    monkeypatch.undo()
    state, _ = load_checkpoint(find_checkpoint(tmp_path), acc, model, opt, sched)
    assert state.global_step == 1 and torch.equal(model.weight, weight)


class _Rank:
    """A one-process accelerator seen as ``rank`` of 2 (the collective calls are no-ops on one process)."""

    def __init__(self, acc, rank: int):
        self.acc, self.process_index, self.num_processes, self.is_main_process = acc, rank, 2, rank == 0

    def __getattr__(self, name):
        return getattr(self.acc, name)


def test_a_multi_process_checkpoint_cut_off_is_left_for_the_other_ranks_and_named_to_delete(
        tmp_path, accelerated, monkeypatch):  # noqa: F811
    """Removing it would pull the directory from under a rank still writing (measured with torchrun, 2 gloo
    processes: rank 1 died with FileNotFoundError), and a rank other than the main one never removed it while its
    line said "it was removed"."""
    acc, model, opt, sched = accelerated
    root = tmp_path / "checkpoints"
    save_checkpoint(acc, model, opt, sched, TrainerState(global_step=1, num_processes=1), {}, root)
    tmp = root / ".tmp-step_00000002"
    for rank, name in ((0, "optimizer.pt"), (1, "rng_state_1.pt")):
        fail_torch_save_on(monkeypatch, name)
        tmp.mkdir(exist_ok=True)  # rank 0 made it before the barrier
        with pytest.raises(UserError) as info:
            save_checkpoint(_Rank(acc, rank), model, opt, sched, TrainerState(global_step=2, num_processes=2), {},
                            root)
        assert str(info.value).startswith(f"{tmp}: no space left on device; it is never read: delete it to get its "
                                          f"space back; free space, then rerun with --resume_from {tmp_path}")
        assert (tmp / "rng_state_0.pt").is_file()  # rank 0 wrote it before its optimizer.pt failed
        monkeypatch.undo()
    save_checkpoint(acc, model, opt, sched, TrainerState(global_step=3, num_processes=1), {}, root)
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "step_00000001", "step_00000003"]  # the next save


def test_read_metrics_skips_the_line_a_full_disk_cut_off_and_resume_rewrites_without_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    full = "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(full[:-15])  # what a short append on a full tmpfs left (measured: 4096 bytes, mid-record)
    assert read_metrics(path) == records[:2]
    MetricsFile(tmp_path, enabled=True).resume_at(2)
    assert path.read_text() == full[:full.index('{"step": 3')]
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl:2: not a JSON record"):
        read_metrics(path)


def test_a_resume_that_cannot_rewrite_metrics_keeps_the_old_file_whole(tmp_path, monkeypatch):
    """resume_at rewrote metrics.jsonl in place: a kill or a full disk between the truncation and the write left
    it empty, and the steps before the checkpoint were gone from it (and from loss.png) for good."""
    import os

    path = tmp_path / "metrics.jsonl"
    full = "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3))
    path.write_text(full)
    monkeypatch.setattr(os, "fsync", raising(enospc()))  # the new content never reaches the disk
    with pytest.raises(UserError, match="no space left on device"):
        MetricsFile(tmp_path, enabled=True).resume_at(2)
    assert path.read_text() == full  # the next resume drops step 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary file left


def test_final_cut_off_by_a_full_disk_is_one_line_then_the_resumed_run_finishes_without_its_plot(
        tmp_path, data_paths, monkeypatch, capsys):
    from utils.training import Trainer

    log_dir = tmp_path / "run"
    argv = ["--peft_method", "lora", "--task_name", "mbpp", "--model_type", "tiny-llama", "--data_path",
            data_paths["mbpp"], "--limit_train_examples", "4", "--per_gpu_train_batch_size", "2", "--max_train_steps",
            "2", "--max_length", "48", "--save_every", "1steps", "--log_dir", str(log_dir)]
    write_adapter = Trainer._write_adapter

    def adapter_on_a_full_disk(self, directory):
        if directory.name == ".tmp-final":  # the checkpoints' adapters are written; final/'s is not
            directory.mkdir(parents=True)
            (directory / "adapter_model.safetensors").write_bytes(b"\0" * 10)  # cut off
            raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")
        write_adapter(self, directory)

    monkeypatch.setattr(Trainer, "_write_adapter", adapter_on_a_full_disk)
    with pytest.raises(SystemExit) as exit_info:
        run_inprocess("peft", argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert (f"error: {log_dir / '.tmp-final'}: no space left on device; it was removed, final/ is as it was; free "
            f"space, then rerun with --resume_from {log_dir}: it continues from step_00000002") in err
    assert "Traceback" not in err
    assert not (log_dir / ".tmp-final").exists() and not (log_dir / "final").exists()

    monkeypatch.undo()
    import matplotlib.figure

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", raising(enospc()))
    result = run_inprocess("peft", argv + ["--resume_from", str(log_dir)])  # the plot alone must not fail the run
    assert result.global_step == 2 and (result.final_dir / "adapter_model.safetensors").is_file()
    assert not (log_dir / "loss.png").exists()
    assert f"{log_dir / 'loss.png'}: not written: no space left on device" in capsys.readouterr().err


def test_a_metrics_append_on_a_full_disk_mid_run_is_one_line_naming_the_run_and_its_resume(
        tmp_path, data_paths, monkeypatch, capsys):
    from utils.train_logging import MetricsFile

    log_dir = tmp_path / "run"
    write = MetricsFile.write

    def full_at_step_2(self, record):
        if record["step"] == 2:
            raise enospc()  # an append names no file
        write(self, record)

    monkeypatch.setattr(MetricsFile, "write", full_at_step_2)
    with pytest.raises(SystemExit):
        run_inprocess("peft", ["--peft_method", "lora", "--task_name", "mbpp", "--model_type", "tiny-llama",
                               "--data_path", data_paths["mbpp"], "--limit_train_examples", "4",
                               "--per_gpu_train_batch_size", "2", "--max_train_steps", "3", "--max_length", "48",
                               "--save_every", "1steps", "--log_dir", str(log_dir)])
    err = capsys.readouterr().err
    assert (f"error: {log_dir}: no space left on device; free space, then rerun with --resume_from {log_dir}: it "
            f"continues from step_00000001, the last complete checkpoint\n") in err and "Traceback" not in err


class _FullDiskAfter:
    """A text file that takes ``room`` more characters, then fails as a full disk does (a short write first)."""

    def __init__(self, fh, room: int):
        self.fh, self.room = fh, room

    def write(self, text):
        self.fh.write(text[:self.room])
        if len(text) > self.room:
            self.fh.flush()
            raise enospc()
        self.room -= len(text)

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


def test_generation_progress_cut_off_by_a_full_disk_names_the_file_and_resume_keeps_the_batches(tmp_path,
                                                                                                 monkeypatch):
    from utils.prediction_files import PROGRESS_FILE, ProgressLog, write_predictions
    from utils.tasks import get_task

    log = ProgressLog(tmp_path)
    log.append({"MBPP/11": ["def a(): pass"]})
    real_open = pathlib.Path.open
    monkeypatch.setattr(pathlib.Path, "open", lambda self, *a, **k: _FullDiskAfter(real_open(self, *a, **k), 9))
    with pytest.raises(UserError) as info:
        log.append({"MBPP/12": ["def b(): pass"]})
    assert str(info.value).startswith(f"{tmp_path / PROGRESS_FILE}: no space left on device; the batches before "
                                      f"this one are kept")
    monkeypatch.undo()
    log.repair()  # what --resume does first
    assert log.read() == {"MBPP/11": ["def a(): pass"]}

    monkeypatch.setattr("os.fsync", raising(enospc()))  # the final files' temp copies
    task = get_task("mbpp")
    record = {"task_id": "MBPP/11", "prompt": "p", "test": "t", "entry_point": "a", "canonical_solution": "c"}
    with pytest.raises(UserError, match=r"mbxp_solutions.jsonl: no space left on device; free space, then rerun "
                                        r"with --resume \(every task is in generation_progress.jsonl"):
        write_predictions(tmp_path, task, [record], {"MBPP/11": ["x"]}, task.stop_sequences)
    assert sorted(p.name for p in tmp_path.iterdir()) == [PROGRESS_FILE]  # no temporary copy left behind


def test_generation_progress_cut_inside_a_utf8_character_resumes_with_the_batches_before(tmp_path):
    """The kernel's short write ends at a byte (a page), not at a character; predictions are stored unescaped, so
    a line may also hold U+2028, which is no end of a record."""
    from utils.prediction_files import ProgressLog

    log = ProgressLog(tmp_path)
    log.append({"MBPP/11": ["s = 'a\u2028b'"]})
    log.append({"MBPP/12": ["print('é')"]})
    data = log.path.read_bytes()
    log.path.write_bytes(data[:data.rindex("é".encode()) + 1])  # the second batch cut inside the é
    log.repair()
    assert log.read() == {"MBPP/11": ["s = 'a\u2028b'"]} and log.path.read_bytes().endswith(b"\n")


def test_a_cell_whose_training_fills_the_disk_is_failed_with_one_line_and_redone_next_run(tmp_path, monkeypatch):
    import run_experiment
    from tests.test_experiment import _fake_stages
    from utils import experiment

    key = "tiny-phi-2/mbpp/lora"
    metrics = tmp_path / "cells" / key / "train" / "metrics.jsonl"

    class TornMetrics(OSError):  # the training stage wrote one step, then the disk filled mid-line
        def __init__(self):
            metrics.parent.mkdir(parents=True, exist_ok=True)
            metrics.write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "lo')
            super().__init__(errno.ENOSPC, "No space left on device")

    _fake_stages(monkeypatch)
    fake = experiment._script_main

    def stage(script):
        main = fake(script)

        def run(argv):
            if script == "tune_foundation_model.py" and f"/cells/{key}/" in " ".join(argv):
                raise TornMetrics()
            return main(argv)
        return cli_entry(run)

    monkeypatch.setattr(experiment, "_script_main", stage)
    argv = ["--preset", "smoke", "--out", str(tmp_path), "--tasks", "mbpp", "--methods", "lora,pt"]
    first = run_experiment.main(argv)  # the loss-curve plot reads the cut-off metrics.jsonl too
    assert first["failed"][key]["reason"].startswith("exit status 2: error: no space left on device writing the output")
    assert first["ran"] == ["tiny-phi-2/mbpp/pt"] and not (tmp_path / "cells" / key / "result.json").exists()
    assert (tmp_path / "loss_curves.png").is_file() and "failed" in (tmp_path / "results.md").read_text()
    _fake_stages(monkeypatch)
    assert run_experiment.main(argv)["ran"] == [key]



def test_train_log_on_a_full_disk_stays_quiet_on_the_console_and_other_log_errors_do_not(tmp_path, capsys):
    """A train.log line that does not fit must not print logging's "--- Logging error ---" block with a traceback
    for every line (the console handler still shows each line); any other handler error still does."""
    from utils.train_logging import setup_logging

    class Failing:
        def __init__(self, exc):
            self.exc = exc

        def write(self, text):
            raise self.exc

        def flush(self):
            pass

    logger = setup_logging(tmp_path, is_main=True)
    file_handler, real = logger.handlers[-1], logger.handlers[-1].stream
    for exc, block in ((enospc(), False), (ValueError("bad format"), True)):
        file_handler.stream = Failing(exc)
        logger.info("step 7")
        err = capsys.readouterr().err
        assert "step 7" in err and ("--- Logging error ---" in err) is block, err
    file_handler.stream = real
    setup_logging(None, is_main=True)  # closes the file handler


def test_a_run_lock_that_cannot_write_its_pid_is_one_line_naming_it(tmp_path, monkeypatch):
    """The lock file records the holder's pid for the next run's message; a full disk there is a one-line error
    naming the lock file, not a traceback."""
    import builtins

    from utils import fileio

    class FullDisk:  # the real lock file, whose writes fail as on a full disk
        def __init__(self, fh):
            self.fh, self.name = fh, fh.name

        def __getattr__(self, attr):
            return getattr(self.fh, attr)

        def write(self, text):
            raise enospc()

    real_open = builtins.open
    monkeypatch.setattr(fileio, "open", lambda *a, **k: FullDisk(real_open(*a, **k)), raising=False)
    with pytest.raises(UserError, match=rf"^{tmp_path / '.lock'}: no space left on device; free space"):
        fileio.try_lock(tmp_path)
