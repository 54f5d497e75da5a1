"""End-to-end runs of both scripts, in this process, on tiny models and real MBPP / CRUXEval records.

The PEFT methods train on a tiny base with sharper random weights (initializer_range 0.3): on the registry's
tiny models (std 0.02) the output is nearly uniform and a soft prompt has almost no leverage (measured: pt
moves the loss by < 1 %), which would make an overfitting check meaningless. Full fine-tuning uses the
registry's tiny models as they are.
"""
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import tune_fft_baseline
import tune_foundation_model
from custom_peft import TunedModel, load_tuned_model
from custom_peft.packing import pack_rows
from tests.conftest import ROOT
from utils import fixtures
from utils.batching import Collator, TaskDataset
from utils.data import load_task_split, read_jsonl
from utils.fileio import current_umask
from utils.encoders import load_encoder_tokenizer
from utils.models import load_foundation_model, load_tokenizer
from utils.registry import METHOD_FLAGS
from utils.tasks import get_task
from utils.train_logging import read_metrics
from utils.train_setup import reset_accelerate_state
from utils.batching import shorten

VOCAB = 2048  # the tiny models' tokenizer; ln(VOCAB) is the loss of a uniform guess
LR = {"lora": 0.03, "pt": 0.3, "idpg": 0.01, "lopa": 0.3, "fft": 3e-3}
OVERFIT = [("lora", "tiny-phi-2", "mbpp"), ("lora", "tiny-codegen", "cruxeval_output_prediction"),
           ("pt", "tiny-llama", "mbpp"), ("pt", "tiny-phi-2", "cruxeval_input_prediction"),
           ("idpg", "tiny-codegen", "mbpp"), ("idpg", "tiny-llama", "cruxeval_output_prediction"),
           ("lopa", "tiny-llama", "mbpp"), ("lopa", "tiny-codegen", "cruxeval_input_prediction"),
           ("fft", "tiny-llama", "mbpp"), ("fft", "tiny-phi-2", "cruxeval_output_prediction")]


def run_inprocess(script: str, argv: list[str]):
    """One run of a script's ``main`` here (accelerate's process-wide state is reset around it)."""
    reset_accelerate_state()
    try:
        return (tune_fft_baseline if script == "fft" else tune_foundation_model).main(argv)
    finally:
        reset_accelerate_state()


def data_path(data_paths, task):
    return data_paths["mbpp" if task == "mbpp" else "cruxeval"]


def records_file(data_paths, directory, family: str, n: int) -> str:
    """A JSONL with at least ``n`` training records: the real file, or (without ../shared/data) the project's
    three fixture training records repeated under new ids."""
    if data_paths["real"]:
        return data_paths[family]
    train = read_jsonl(data_paths[family])[:3]
    records = [{**train[i % 3], **({"task_id": f"MBPP/{i + 1}"} if family == "mbpp" else {"id": f"sample_{i}"})}
               for i in range(n)]
    return fixtures.write_jsonl(pathlib.Path(directory) / f"{family}-{n}.jsonl", records)


def epoch_means(log_dir) -> list[float]:
    by_epoch = {}
    for record in read_metrics(log_dir / "metrics.jsonl"):
        by_epoch.setdefault(record["epoch"], []).append(record["loss"])
    return [sum(v) / len(v) for _, v in sorted(by_epoch.items())]


@pytest.fixture(scope="module")
def sharp_bases(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from utils.models import model_config
    from utils.registry import get_model_spec

    out = {}
    for name in ("tiny-llama", "tiny-phi-2", "tiny-codegen"):
        tokenizer = load_tokenizer(name)
        config = model_config(get_model_spec(name), tokenizer)
        config.initializer_range = 0.3
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config)
        out[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(out[name])
        tokenizer.save_pretrained(out[name])
    return out


def subset_loss(model, tokenizer, task_name, path, method, enc_tokenizer=None, m=20, max_length=40) -> float:
    """Eval-mode loss of ``model`` over the training subset, batched as in training."""
    records = load_task_split(task_name, "train", path, limit=4)
    prompt = method in ("pt", "idpg", "lopa")
    dataset = TaskDataset(get_task(task_name), records, tokenizer, enc_tokenizer, num_virtual_tokens=m if prompt else 0)
    batch = Collator(tokenizer.pad_token_id, enc_tokenizer.pad_token_id if enc_tokenizer else None)(
        [shorten(e, max_length) for e in dataset.examples])
    batch.pop("task_ids")
    model.eval()
    with torch.no_grad():
        return float(model(**batch).loss)


@pytest.mark.parametrize("method, model_type, task", OVERFIT)
def test_each_method_overfits_a_small_real_subset(tmp_path, data_paths, sharp_bases, method, model_type, task):
    log_dir = tmp_path / "run"
    argv = ["--task_name", task, "--model_type", model_type, "--data_path", data_path(data_paths, task),
            "--limit_train_examples", "4", "--per_gpu_train_batch_size", "2", "--num_epochs", "30",
            "--max_length", "40", "--lr", str(LR[method]), "--save_every", "10", "--save_total_limit", "2",
            "--log_dir", str(log_dir)]
    if method != "fft":
        own = {"num_virtual_tokens": "20", "enc_model_type": "tiny-roberta"}  # the trainers refuse another method's
        argv = ["--peft_method", method, "--model_path", str(sharp_bases[model_type])] + argv + [
            x for flag, value in own.items() if method in METHOD_FLAGS[flag] for x in (f"--{flag}", value)]
    result = run_inprocess(method if method == "fft" else "peft", argv)

    means = epoch_means(log_dir)
    assert len(means) == 30
    assert means[-1] < 0.7 * means[0], means
    assert means[-1] < math.log(VOCAB) - 0.5, means  # better than a uniform guess, not just less confident
    steps = 30 * math.ceil(len(load_task_split(task, "train", data_path(data_paths, task), limit=4)) / 2)
    records = read_metrics(log_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, steps + 1)) and result.global_step == steps
    warmup = math.ceil(0.1 * steps) if method == "fft" else 0  # FFT's default 10 % warmup, then linear to 0
    expected = [LR[method] * (k / warmup if k < warmup else (steps - k) / (steps - warmup)) for k in range(steps)]
    assert [r["lr"] for r in records] == pytest.approx(expected)
    assert all(r["tokens_per_s"] > 0 and r["tokens"] > 0 and r["elapsed"] > 0 for r in records)
    assert (log_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"
    config = json.loads((log_dir / "config.json").read_text())
    assert config["model"]["method"] == method and config["runtime"]["total_steps"] == steps
    assert config["runtime"]["num_processes"] == 1 and config["runtime"]["trainable_params"] > 0
    checkpoints = log_dir / "checkpoints"  # saved at epochs 10, 20, 30; the oldest pruned
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", f"step_{steps * 2 // 3:08d}",
                                                             f"step_{steps:08d}"]
    assert (checkpoints / "latest").read_text().strip() == f"step_{steps:08d}"
    assert json.loads((checkpoints / f"step_{steps:08d}" / "config.json").read_text()) == config
    assert "trainable parameters" in (log_dir / "train.log").read_text()
    # every file is readable as a plain open() would leave it (mkstemp and safetensors 0.8 write 0600)
    modes = {str(p.relative_to(log_dir)): p.stat().st_mode & 0o777 for p in log_dir.rglob("*") if p.is_file()}
    assert len(modes) > 10 and set(modes.values()) == {0o666 & ~current_umask()}, modes

    # the saved result is the trained model: it reproduces the low loss after a reload
    final = result.final_dir
    if method == "fft":
        lm, tokenizer = load_foundation_model(model_type, model_path=str(final))
        loss = subset_loss(TunedModel("fft", lm), tokenizer, task, data_path(data_paths, task), method)
        assert config["runtime"]["trainable_params"] == sum(p.numel() for p in lm.parameters())
    else:
        assert {p.name for p in final.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
        model, tokenizer = load_tuned_model(final, model_path=str(sharp_bases[model_type]), seed=9876)
        enc_tok = load_encoder_tokenizer("tiny-roberta") if method in ("lopa", "idpg") else None
        loss = subset_loss(model, tokenizer, task, data_path(data_paths, task), method, enc_tok)
    assert loss < 0.7 * means[0] and loss < math.log(VOCAB) - 0.5, (loss, means)


def test_a_model_that_fails_to_load_leaves_no_log_dir(tmp_path, data_paths, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "llama"}))  # no weights
    with pytest.raises(SystemExit) as exc:
        run_inprocess("peft", ["--peft_method", "pt", "--task_name", "mbpp", "--model_type", "tiny-llama",
                               "--model_path", str(tmp_path / "model"), "--data_path", data_paths["mbpp"],
                               "--log_dir", str(tmp_path / "run")])
    assert exc.value.code == 2
    assert "model: not a loadable Hugging Face model directory" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_wandb_offline_run_records_the_metrics(tmp_path, data_paths, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    log_dir = tmp_path / "run"
    run_inprocess("peft", ["--peft_method", "pt", "--task_name", "mbpp", "--model_type", "tiny-llama",
                           "--data_path", data_paths["mbpp"], "--limit_train_examples", "4",
                           "--per_gpu_train_batch_size", "4", "--num_epochs", "2", "--max_length", "32",
                           "--wandb_logging", "--log_dir", str(log_dir)])
    runs = list((log_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    (data_file,) = runs[0].glob("run-*.wandb")
    # wandb's service process writes the file behind the run's finish: once (in .ci/run) it held only its header
    # when read at once, so the test waits for the records, up to a minute
    markers, deadline = (b"train/loss", b"train/lr", b"model.method"), time.monotonic() + 60
    while not all(m in (data := data_file.read_bytes()) for m in markers) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert all(m in data for m in markers), data[:200]
    assert len(read_metrics(log_dir / "metrics.jsonl")) == 2


def test_a_diverged_loss_is_logged_as_nan_not_zero(tmp_path, data_paths, monkeypatch):
    """A NaN loss used to be logged (and plotted) as 0.0, which reads as a perfect fit; only a micro-batch with
    nothing supervised (0/0) may count as 0."""
    from custom_peft.tuned_model import TunedModel

    forward = TunedModel.forward

    def diverging(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(TunedModel, "forward", diverging)
    log_dir = tmp_path / "run"
    run_inprocess("peft", ["--peft_method", "pt", "--task_name", "mbpp", "--model_type", "tiny-llama",
                           "--data_path", data_paths["mbpp"], "--limit_train_examples", "4",
                           "--per_gpu_train_batch_size", "2", "--max_train_steps", "2", "--max_length", "32",
                           "--log_dir", str(log_dir)])
    losses = [r["loss"] for r in read_metrics(log_dir / "metrics.jsonl")]
    assert len(losses) == 2 and all(math.isnan(x) for x in losses), losses


def test_runs_without_the_optional_packages_and_with_every_switch(tmp_path, data_paths):
    """The GPU image lacks deepspeed, wandb, matplotlib and datasets: a plain run must not need them."""
    log_dir, data = tmp_path / "run", records_file(data_paths, tmp_path, "mbpp", 6)
    argv = ["tune_fft_baseline.py", "--task_name", "mbpp", "--model_type", "tiny-codegen", "--data_path", data,
            "--limit_train_examples", "6", "--per_gpu_train_batch_size", "2", "--num_epochs", "2",
            "--max_length", "64", "--pad_to_max_length", "--group_by_length", "--gradient_checkpointing",
            "--log_every", "4", "--lr_scheduler_type", "cosine", "--log_dir", str(log_dir)]
    code = ("import runpy, sys\n"
            "for name in ('deepspeed', 'wandb', 'matplotlib', 'datasets'):\n"
            "    sys.modules[name] = None\n"
            f"sys.argv = {argv!r}\n"
            "runpy.run_path('tune_fft_baseline.py', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "matplotlib is not installed" in (log_dir / "train.log").read_text()
    assert not (log_dir / "loss.png").exists() and (log_dir / "final" / "model.safetensors").is_file()
    records = read_metrics(log_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [4, 6]  # every 4th step, and the last
    lengths = TaskDataset(get_task("mbpp"), load_task_split("mbpp", "train", data, limit=6),
                          load_tokenizer("tiny-codegen")).lengths()
    assert records[-1]["tokens"] == 2 * sum(min(n, 64) for n in lengths)  # padding to 64 is not counted
    config = json.loads((log_dir / "config.json").read_text())
    assert config["train"]["group_by_length"] and config["train"]["pad_to_max_length"]
    assert config["runtime"]["packing"] is False  # rows of --max_length, as the original's (packing is on by default)
    assert config["runtime"]["lr_schedule"] == "cosine" and config["runtime"]["warmup_steps"] == 1


def test_full_logits_plain_adamw_and_padded_rows_train_exactly_like_the_fast_paths(tmp_path, data_paths,
                                                                                     monkeypatch):
    """--selective_logits False / --fused_adamw False / --packing False (the plain paths) give the fast defaults'
    losses and weights. The cost estimate is pinned to "matmuls dominate" so that every batch with padding packs."""
    import custom_peft.packing as packing
    import custom_peft.tuned_model as tuned_model

    packed = []
    monkeypatch.setattr(tuned_model, "attention_width_constant", lambda lm: 1e6)
    monkeypatch.setattr(packing, "pack_rows", lambda *a: packed.append(a[2]) or pack_rows(*a))
    runs = {}
    plain = ["--selective_logits", "False", "--fused_adamw", "False", "--packing", "False"]
    for name, extra in (("fast", []), ("plain", plain)):
        log_dir = tmp_path / name
        run_inprocess("peft", ["--peft_method", "lopa", "--task_name", "mbpp", "--model_type", "tiny-llama",
                               "--enc_model_type", "tiny-roberta", "--data_path", data_paths["mbpp"],
                               "--limit_train_examples", "4", "--per_gpu_train_batch_size", "2", "--num_epochs", "2",
                               "--max_length", "200", "--lr", "0.1", "--log_dir", str(log_dir), *extra])
        config = json.loads((log_dir / "config.json").read_text())
        train = config["train"]
        assert (train["selective_logits"], train["fused_adamw"], config["runtime"]["packing"]) == ((name == "fast"),) * 3
        runs[name] = ([r["loss"] for r in read_metrics(log_dir / "metrics.jsonl")],
                      load_tuned_model(log_dir / "final")[0].prompt.shared_prompt.detach())
        if name == "fast":
            assert packed and all(len(rows) == 1 for rows in packed)  # some batches packed, two examples a row
            packed.clear()
    assert not packed
    assert len(runs["fast"][0]) == 4
    assert runs["fast"][0] == pytest.approx(runs["plain"][0], rel=1e-5)
    # other summation orders in the packed rows moved one of 640 weights by 4.8e-6 after 4 Adam steps at lr 0.1
    torch.testing.assert_close(runs["fast"][1], runs["plain"][1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("flag", [[], ["--encoder_dropout", "False"]])
def test_the_frozen_encoder_trains_with_its_dropout_unless_turned_off(tmp_path, data_paths, monkeypatch, flag):
    """Default: the encoder's dropout acts in training, as the original's; --encoder_dropout False: eval mode."""
    from utils.encoders import PooledEncoder

    modes, forward = [], PooledEncoder.forward
    monkeypatch.setattr(PooledEncoder, "forward", lambda self, *a: modes.append(self.backbone.training) or
                        forward(self, *a))
    log_dir = tmp_path / "run"
    run_inprocess("peft", ["--peft_method", "lopa", "--task_name", "mbpp", "--model_type", "tiny-llama",
                           "--enc_model_type", "tiny-roberta", "--data_path", data_paths["mbpp"],
                           "--limit_train_examples", "4", "--per_gpu_train_batch_size", "2", "--max_train_steps", "2",
                           "--max_length", "64", "--log_dir", str(log_dir), *flag])
    assert modes and set(modes) == {not flag}
    assert json.loads((log_dir / "config.json").read_text())["model"]["encoder_dropout"] is (not flag)


def test_a_second_training_run_on_the_same_log_dir_is_refused(tmp_path, data_paths, capsys):
    from utils.fileio import lock_directory

    log_dir = tmp_path / "run"
    log_dir.mkdir()
    argv = ["--peft_method", "pt", "--task_name", "mbpp", "--model_type", "tiny-llama", "--data_path",
            data_paths["mbpp"], "--limit_train_examples", "2", "--per_gpu_train_batch_size", "2",
            "--max_train_steps", "1", "--max_length", "64", "--log_dir", str(log_dir)]
    with lock_directory(log_dir, "--log_dir", "training run"):  # a live run holds it
        with pytest.raises(SystemExit) as exit_info:
            run_inprocess("peft", argv)
    assert exit_info.value.code == 2
    assert f"--log_dir {log_dir}: another training run (pid {os.getpid()}) is writing there" in capsys.readouterr().err
    assert sorted(p.name for p in log_dir.iterdir()) == [".lock"]  # it wrote nothing
    assert run_inprocess("peft", argv).global_step == 1  # the lock went with the run that held it


def test_a_run_whose_default_log_dir_another_run_started_in_the_same_second_takes_the_next(tmp_path, data_paths,
                                                                                           monkeypatch):
    """Both picked the name before either created it (a shell loop with &); the lock used to refuse the second
    ("pass another --log_dir", though it had been given none)."""
    from utils import cli, train_args
    from utils.fileio import lock_directory

    monkeypatch.chdir(tmp_path)
    name = cli.default_log_dir()
    monkeypatch.setattr(train_args, "default_log_dir", lambda: name)  # the same second's name
    argv = ["--peft_method", "pt", "--task_name", "mbpp", "--model_type", "tiny-llama", "--data_path",
            data_paths["mbpp"], "--limit_train_examples", "2", "--per_gpu_train_batch_size", "2",
            "--max_train_steps", "1", "--max_length", "64"]
    os.mkdir(tmp_path / "logging")
    os.mkdir(name)
    with lock_directory(name, "--log_dir", "training run"):  # the other run, still loading its model
        result = run_inprocess("peft", argv)
    assert result.global_step == 1 and pathlib.Path(result.log_dir) == pathlib.Path(f"{name}-2")
    assert json.loads((tmp_path / f"{name}-2" / "config.json").read_text())["output"]["log_dir"] == f"{name}-2"
    assert sorted(p.name for p in (tmp_path / name).iterdir()) == [".lock"]


def _reads_device(func, args) -> bool:
    """Whether an aten call makes the host wait for the device on a GPU: a scalar read, or a data-dependent shape."""
    name = str(func.overloadpacket)
    if name in ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select"):
        return True
    indices = args[1] if name == "aten.index" and len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


def test_a_training_step_queues_its_forward_passes_before_reading_anything_back(tmp_path, data_paths, monkeypatch):
    """The step's counts and loss scale stay on the device: on a GPU, a read before the forward would wait for the
    previous step to finish, so the host could not queue the next step's work (LOPA's eager encoder, the embedding)
    while the GPU still runs the last backward and optimizer step. Checked with every micro-batch of a gradient
    accumulation window (the second forward must not wait for the first either). The batches carry their host
    copy into the model (whose forward reads nothing either: tests/test_packing.py)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from utils import training
    from utils.training import Trainer, optimizer_step

    class Reads(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Reads.count += _reads_device(func, args)
            return func(*args, **(kwargs or {}))

    from utils.batching import HostCopy

    seen, hosts, outside, inside, step, forward = [], [], [], [0], Trainer._queue_step, TunedModel.forward

    def watched_step(self, window):
        Reads.count = inside[0] = 0
        with Reads():
            queued = step(self, window)
        outside.append(Reads.count - inside[0])
        return queued

    def watched_forward(self, *args, **kwargs):  # the model's own reads are apart (tests/test_packing.py)
        seen.append(Reads.count - inside[0])
        hosts.append(kwargs.get("host"))
        before = Reads.count
        try:
            return forward(self, *args, **kwargs)
        finally:
            inside[0] += Reads.count - before

    def watched_optimizer_step(accelerator, optimizer):  # AdamW reads its step counts, which live on the host
        before = Reads.count
        try:
            return optimizer_step(accelerator, optimizer)
        finally:
            inside[0] += Reads.count - before

    monkeypatch.setattr(Trainer, "_queue_step", watched_step)
    monkeypatch.setattr(TunedModel, "forward", watched_forward)
    monkeypatch.setattr(training, "optimizer_step", watched_optimizer_step)
    log_dir = tmp_path / "run"
    run_inprocess("peft", ["--peft_method", "lopa", "--task_name", "mbpp", "--model_type", "tiny-llama",
                           "--enc_model_type", "tiny-roberta", "--num_virtual_tokens", "4",
                           "--data_path", data_paths["mbpp"], "--limit_train_examples", "4",
                           "--per_gpu_train_batch_size", "1", "--gradient_accumulation_steps", "2",
                           "--max_train_steps", "2", "--max_length", "32", "--log_dir", str(log_dir)])
    assert seen == [0, 0, 0, 0] and outside == [0, 0], (seen, outside)  # the step's own reads, before each forward
    # each batch reached the model with its mask and labels on the host, so the forward need not read them either
    assert all(isinstance(h, HostCopy) and h.attention_mask.device.type == "cpu" and h.enc_padded is not None
               for h in hosts), hosts
    records = read_metrics(log_dir / "metrics.jsonl")
    assert len(records) == 2 and all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in records), records


def test_gpu_memory_reaches_the_logged_lines_and_the_log(tmp_path, data_paths, monkeypatch):
    """On a GPU every metrics.jsonl line gets the memory torch holds (``gpu_memory``, faked here: this machine has
    none), and the log ends with the run's peak beside the card's size."""
    import types

    from utils import training

    reads = []
    monkeypatch.setattr(training, "gpu_memory", lambda device: reads.append(device.type) or {
        "gpu_mem_gib": 1.5, "gpu_peak_mem_gib": 2.25})
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(
        total_memory=80 * 2**30))
    log_dir = tmp_path / "run"
    run_inprocess("peft", ["--peft_method", "pt", "--task_name", "mbpp", "--model_type", "tiny-llama",
                           "--num_virtual_tokens", "4", "--data_path", data_paths["mbpp"],
                           "--limit_train_examples", "3", "--per_gpu_train_batch_size", "1",
                           "--max_train_steps", "3", "--log_every", "2", "--max_length", "32",
                           "--log_dir", str(log_dir)])
    records = read_metrics(log_dir / "metrics.jsonl")
    assert [(r["step"], r["gpu_mem_gib"], r["gpu_peak_mem_gib"]) for r in records] == [(2, 1.5, 2.25), (3, 1.5, 2.25)]
    assert len(reads) == 3  # the two logged lines and the last line of the log, not every step
    assert "GPU memory: at most 2.25 GiB held by torch of the card's 80.00 GiB" in (log_dir / "train.log").read_text()


def test_a_run_that_cannot_fit_the_gpu_is_refused_before_its_log_dir(tmp_path, data_paths, monkeypatch, capsys):
    """The memory check as the trainer wires it (the device faked as CUDA, its free memory as 1 KiB): the free
    memory of the run's device is read once the model is built, and the refusal comes before the log_dir exists."""
    import accelerate

    asked = []
    monkeypatch.setattr(accelerate.Accelerator, "device", property(lambda self: torch.device("cuda")))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: asked.append(device) or (1024, 80 * 2**30))
    with pytest.raises(SystemExit) as exc:
        run_inprocess("fft", ["--task_name", "mbpp", "--model_type", "tiny-llama", "--data_path", data_paths["mbpp"],
                              "--limit_train_examples", "2", "--log_dir", str(tmp_path / "run")])
    assert exc.value.code == 2 and asked == [torch.device("cuda")] and not (tmp_path / "run").exists()
    err = capsys.readouterr().err
    assert re.search(r"error: full fine-tuning of tiny-llama needs ([\d.]+) MiB before activations \(weights "
                     r"([\d.]+) MiB, gradients \2 MiB, AdamW states ([\d.]+) MiB\), more than the 0.0 MiB free on "
                     r"this GPU", err), err


def test_gpu_memory_reads_the_allocators_reserved_counters_on_cuda_only(monkeypatch):
    from utils.train_logging import gpu_memory

    seen = []
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: seen.append(("now", device)) or 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: seen.append(("peak", device)) or 5 * 2**29)
    assert gpu_memory(torch.device("cpu")) == {} and not seen
    assert gpu_memory(torch.device("cuda", 1)) == {"gpu_mem_gib": 3.0, "gpu_peak_mem_gib": 2.5}
    assert seen == [("now", torch.device("cuda", 1)), ("peak", torch.device("cuda", 1))]


def test_a_step_with_nothing_supervised_logs_zero_and_leaves_the_weights(tmp_path, data_paths):
    """Rows cut to their first token supervise nothing: the loss is 0/0 there, counted as 0 (not NaN), and the
    update is zero (AdamW's weight decay aside, which the soft prompt does not get)."""
    log_dir = tmp_path / "run"
    run_inprocess("peft", ["--peft_method", "pt", "--task_name", "mbpp", "--model_type", "tiny-llama",
                           "--num_virtual_tokens", "4", "--data_path", data_paths["mbpp"],
                           "--limit_train_examples", "2", "--per_gpu_train_batch_size", "1",
                           "--gradient_accumulation_steps", "2", "--max_train_steps", "1", "--max_length", "1",
                           "--log_dir", str(log_dir)])
    [record] = read_metrics(log_dir / "metrics.jsonl")
    assert record["loss"] == 0.0 and record["grad_norm"] == 0.0, record


def test_a_steps_numbers_are_read_once_the_next_step_is_queued(tmp_path, data_paths, monkeypatch):
    """The one wait per step comes after the next step is queued, so the host runs a step ahead of the GPU; an
    epoch's end, a checkpoint and the run's end read their step at once (they need its numbers), and every step is
    logged once, in order."""
    from utils.training import Trainer

    calls, queue, finish = [], Trainer._queue_step, Trainer._finish_step
    monkeypatch.setattr(Trainer, "_queue_step", lambda self, window: calls.append(("q", self.state.global_step + 1))
                        or queue(self, window))
    monkeypatch.setattr(Trainer, "_finish_step", lambda self, step, bar: calls.append(("f", step.step))
                        or finish(self, step, bar))
    log_dir = tmp_path / "run"
    run_inprocess("peft", ["--peft_method", "pt", "--task_name", "mbpp", "--model_type", "tiny-llama",
                           "--data_path", data_paths["mbpp"], "--limit_train_examples", "8",
                           "--per_gpu_train_batch_size", "2", "--num_epochs", "2", "--save_every", "3steps",
                           "--max_length", "32", "--log_dir", str(log_dir)])
    # 4 steps an epoch; a checkpoint after step 3 (and 6); epoch ends after steps 4 and 8
    assert calls == [("q", 1), ("q", 2), ("f", 1), ("q", 3), ("f", 2), ("f", 3), ("q", 4), ("f", 4),
                     ("q", 5), ("q", 6), ("f", 5), ("f", 6), ("q", 7), ("q", 8), ("f", 7), ("f", 8)], calls
    assert [r["step"] for r in read_metrics(log_dir / "metrics.jsonl")] == list(range(1, 9))
    assert sorted(p.name for p in (log_dir / "checkpoints").glob("step_*")) == ["step_00000003", "step_00000006"]


def test_a_steps_time_and_rate_are_its_own_when_the_next_steps_numbers_follow_at_once(tmp_path, data_paths,
                                                                                     monkeypatch):
    """On the CPU a step's work is done when it is queued, not when it is read back one step later: a step read
    back right after the one before it (an epoch's end, the last step) used to log ~0 s and millions of tokens/s.
    Every step here takes at least 0.2 s, so each must log at least that long and no faster a rate."""
    from utils.training import Trainer

    queue = Trainer._queue_step
    monkeypatch.setattr(Trainer, "_queue_step", lambda self, window: (time.sleep(0.2), queue(self, window))[1])
    log_dir = tmp_path / "run"
    run_inprocess("peft", ["--peft_method", "pt", "--task_name", "mbpp", "--model_type", "tiny-llama",
                           "--data_path", data_paths["mbpp"], "--limit_train_examples", "4",
                           "--per_gpu_train_batch_size", "2", "--num_epochs", "2", "--max_length", "32",
                           "--log_dir", str(log_dir)])
    records = read_metrics(log_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    seconds = [b["elapsed"] - a["elapsed"] for a, b in zip([{"elapsed": 0.0}] + records, records)]
    assert all(s >= 0.19 for s in seconds), seconds
    previous = [0] + [r["tokens"] for r in records]
    assert all(r["tokens_per_s"] <= (r["tokens"] - t0) / 0.19 for r, t0 in zip(records, previous)), records


def test_compile_on_compiles_the_encoder_too_and_keeps_every_version_the_layers_need(tmp_path, data_paths,
                                                                                     monkeypatch):
    """--compile on (here with a counting backend instead of inductor): the frozen encoder's layers compile with the
    decoder's, and the run keeps more compiled versions than torch's cap (set to 2 here; 8 by default), which
    every transformers layer class shares under transformers 5.24 (5.17 caps each class apart). The losses are
    eager's. --compile_encoder False leaves the encoder eager."""
    from utils import fast_paths

    graphs, compiled = [], []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    for name in ("compile_layers", "compile_encoder_layers", "compile_prompt_heads"):
        def compile_with(module, real=getattr(fast_paths, name), name=name):
            compiled.append(name)
            return real(module, backend=counting_backend)
        monkeypatch.setattr(fast_paths, name, compile_with)
    runs = {}
    try:
        with torch._dynamo.config.patch(recompile_limit=2):
            for name, extra in (("eager", ["--compile", "off"]), ("both", ["--compile", "on"]),
                                ("decoder", ["--compile", "on", "--compile_encoder", "False"])):
                torch.compiler.reset()
                graphs.clear(), compiled.clear()
                log_dir = tmp_path / name
                run_inprocess("peft", ["--peft_method", "lopa", "--task_name", "mbpp", "--model_type", "tiny-llama",
                                       "--enc_model_type", "tiny-roberta", "--data_path", data_paths["mbpp"],
                                       "--encoder_dropout", "False", "--limit_train_examples", "6",
                                       "--per_gpu_train_batch_size", "2", "--num_epochs", "1", "--max_length", "200",
                                       "--lr", "0.1", "--log_dir", str(log_dir), *extra])
                runtime = json.loads((log_dir / "config.json").read_text())["runtime"]
                runs[name] = ([r["loss"] for r in read_metrics(log_dir / "metrics.jsonl")], len(graphs),
                              list(compiled), (runtime["compiled_layers"], runtime["compiled_encoder_layers"],
                                               runtime["compiled_prompt_heads"]))
    finally:
        torch.compiler.reset()
    assert runs["eager"][1:] == (0, [], (False, False, False))
    assert runs["both"][2:] == (["compile_layers", "compile_encoder_layers", "compile_prompt_heads"],
                                (True, True, True))
    assert runs["decoder"][2:] == (["compile_layers", "compile_prompt_heads"], (True, False, True))
    assert runs["both"][1] > max(2, runs["decoder"][1])  # past the cap of 2, with the encoder's own versions
    assert len(runs["eager"][0]) == 3
    for name in ("both", "decoder"):
        assert runs[name][0] == pytest.approx(runs["eager"][0], rel=1e-5)


def _pt_run(log_dir, data, *extra) -> tuple[list[float], dict, str]:
    """A short PT run (6 MBPP examples, batch 2): its per-step losses, config.json and train.log."""
    run_inprocess("peft", ["--peft_method", "pt", "--task_name", "mbpp", "--model_type", "tiny-llama", "--data_path",
                           data, "--limit_train_examples", "6", "--per_gpu_train_batch_size", "2", "--num_epochs", "1",
                           "--max_length", "200", "--lr", "0.1", "--log_dir", str(log_dir), *extra])
    return ([r["loss"] for r in read_metrics(log_dir / "metrics.jsonl")],
            json.loads((log_dir / "config.json").read_text()), (log_dir / "train.log").read_text())


def test_batch_widths_rounded_to_a_multiple_train_exactly_like_unrounded_ones(tmp_path, data_paths, monkeypatch):
    """--pad_to_multiple_of 64: the decoder's padded rows (m virtual tokens + the collator's row) and the packed rows
    are multiples of 64 wide, and the per-step losses are those of the run without it (pad positions and filler
    carry no label), packed or not. The cost estimate is pinned to "matmuls dominate" so that every batch with
    padding packs."""
    import custom_peft.packing as packing
    import custom_peft.tuned_model as tuned_model

    collated, packed = [], []
    collate = Collator.__call__
    monkeypatch.setattr(Collator, "__call__", lambda self, ex: collated.append(self.pad_to_multiple_of) or
                        collate(self, ex))
    monkeypatch.setattr(tuned_model, "attention_width_constant", lambda lm: 1e6)
    monkeypatch.setattr(packing, "pack_rows", lambda *a: packed.append(pack_rows(*a)[1].shape) or pack_rows(*a))
    widths = []
    forward = TunedModel.forward
    monkeypatch.setattr(TunedModel, "forward", lambda self, input_ids, *a, **k: widths.append(input_ids.shape[1])
                        or forward(self, input_ids, *a, **k))
    runs = {}
    for name, extra in (("plain", []), ("rounded", ["--pad_to_multiple_of", "64"]),
                        ("unpacked", ["--pad_to_multiple_of", "64", "--packing", "False"])):
        collated.clear(), packed.clear(), widths.clear()
        runs[name] = _pt_run(tmp_path / name, data_paths["mbpp"], *extra)
        multiple = None if name == "plain" else 64
        assert set(collated) == {multiple}
        assert (runs[name][1]["train"]["pad_to_multiple_of"], runs[name][1]["runtime"]["pad_to_multiple_of"]) == (
            multiple, multiple)
        m = runs[name][1]["model"]["num_virtual_tokens"]  # the collator counts the soft prompt in the rounding
        assert all((m + w) % 64 == 0 for w in widths) == (name != "plain"), (m, widths)
        if name == "unpacked":
            assert not packed
        else:  # packed rows hold 2 examples and m = 10 virtual tokens each: no multiple of 64 unless rounded
            assert packed and all(rows == 1 and (width % 64 == 0) == (name == "rounded") for rows, width in packed)
    assert len(runs["plain"][0]) == 3
    for name in ("rounded", "unpacked"):
        assert runs[name][0] == pytest.approx(runs["plain"][0], rel=1e-5), name
        assert runs[name][1]["runtime"]["compile_mode"] is None  # rounding alone compiles nothing


def test_an_interrupted_run_keeps_its_loss_plot_and_a_cut_epoch_logs_its_mean(tmp_path, data_paths, monkeypatch):
    """Ctrl-C in the third step: loss.png shows the two steps logged (before, only a finished run drew it).
    --max_train_steps 2 of an epoch's 3 batches: the log gives that epoch's mean so far, with how much of it ran."""
    forward, calls = TunedModel.forward, []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(TunedModel, "forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _pt_run(tmp_path / "stopped", data_paths["mbpp"], "--compile", "off")
    assert len([r for r in read_metrics(tmp_path / "stopped" / "metrics.jsonl") if "loss" in r]) == 2
    assert (tmp_path / "stopped" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setattr(TunedModel, "forward", forward)
    losses, _, log = _pt_run(tmp_path / "cut", data_paths["mbpp"], "--compile", "off", "--max_train_steps", "2")
    assert f"epoch 1 (2 of 3 batches): mean loss {sum(losses) / 2:.4f}" in log, log
    assert "epoch 1: mean loss" not in log


_FORWARD = TunedModel.forward


def _out_of_memory_from(monkeypatch, step: int) -> None:
    """TunedModel.forward raises CUDA's out-of-memory error from its ``step``-th call on (this machine has no GPU);
    the calls are counted from here."""
    calls = []

    def fake(self, *args, **kwargs):
        calls.append(1)
        if len(calls) >= step:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return _FORWARD(self, *args, **kwargs)

    monkeypatch.setattr(TunedModel, "forward", fake)


def _error_line(log_dir: pathlib.Path) -> str:
    """The run's ERROR line in its train.log."""
    return next(line for line in (log_dir / "train.log").read_text().splitlines() if " ERROR " in line)


def test_running_out_of_memory_names_what_lowers_a_steps_memory(tmp_path, data_paths, monkeypatch):
    """Out of memory in a step (faked: this machine has no GPU): the log names what lowers a step's memory and how
    to go on; the error still ends the run. Without a checkpoint every way is a new run's; with one, the ways a resume
    accepts (--gradient_checkpointing, --compile_mode default under CUDA graphs, a smaller micro-batch with more
    accumulation: the same steps) go with the resume, which then works, and bf16 is a new run's (a resume refuses
    it)."""
    from utils import fast_paths

    monkeypatch.setattr(fast_paths, "compile_layers", lambda lm, **kwargs: None)
    _out_of_memory_from(monkeypatch, 1)
    for name, mode in (("graphs", "reduce-overhead"), ("plain", "default")):
        with pytest.raises(torch.OutOfMemoryError):
            _pt_run(tmp_path / name, data_paths["mbpp"], "--compile", "on", "--compile_mode", mode)
        log = (tmp_path / name / "train.log").read_text()
        assert "ERROR out of GPU memory in step 1: " in log, log
        assert ("--compile_mode default (the decoder layers' CUDA graphs" in log) == (name == "graphs"), log
        assert ("--gradient_checkpointing (activations recomputed" in log) == (name == "plain"), log
        assert "; --per_gpu_train_batch_size 1 --gradient_accumulation_steps 2 (the same 2 examples per step; 2 x 1 " \
               "now); --model_dtype bf16 (half the frozen weights). Then rerun without --resume_from" in log, log
    _out_of_memory_from(monkeypatch, 3)  # after the checkpoint of step 2
    with pytest.raises(torch.OutOfMemoryError):
        _pt_run(tmp_path / "saved", data_paths["mbpp"], "--compile", "off", "--save_every", "2steps")
    log = (tmp_path / "saved" / "train.log").read_text()
    assert f"ERROR out of GPU memory in step 3. To go on from the last checkpoint, rerun with --resume_from " \
           f"{tmp_path / 'saved'}: it continues from step_00000002, the last complete checkpoint, adding " \
           f"--gradient_checkpointing (activations recomputed instead of kept) or --per_gpu_train_batch_size 1 " \
           f"--gradient_accumulation_steps 2 (the same 2 examples per step; 2 x 1 now); a new run can also take " \
           f"--model_dtype bf16 (half the frozen weights)\n" in log, log
    monkeypatch.setattr(TunedModel, "forward", _FORWARD)
    losses, config, _ = _pt_run(tmp_path / "saved", data_paths["mbpp"], "--compile", "off", "--save_every",
                                "2steps", "--resume_from", str(tmp_path / "saved"), "--gradient_checkpointing",
                                "--per_gpu_train_batch_size", "1", "--gradient_accumulation_steps", "2")
    assert len(losses) == 3 and config["train"]["gradient_checkpointing"]  # the ways out it named work
    assert (config["train"]["per_gpu_train_batch_size"], config["train"]["gradient_accumulation_steps"]) == (1, 2)


def test_out_of_memory_with_no_way_a_resume_takes_sends_to_a_new_run_and_names_no_refused_flag(tmp_path, data_paths,
                                                                                                monkeypatch):
    """--gradient_checkpointing already on, no CUDA graphs, a checkpoint kept, --group_by_length (whose order a
    smaller micro-batch changes: a resume refuses it): nothing a resume accepts lowers the memory, so the line names a
    new run, not a resume, and no flag the run has already (bf16) or cannot take (full fine-tuning keeps fp32
    weights: --model_dtype bf16 is refused there). With a micro-batch of 1 as well, nothing is left to name but a
    larger GPU or shorter examples."""
    _out_of_memory_from(monkeypatch, 3)  # after the checkpoint of step 2
    with pytest.raises(torch.OutOfMemoryError):
        _pt_run(tmp_path / "pt", data_paths["mbpp"], "--compile", "off", "--save_every", "2steps",
                "--gradient_checkpointing", "--model_dtype", "bf16", "--group_by_length")
    error = _error_line(tmp_path / "pt")
    assert error.endswith("ERROR out of GPU memory in step 3: a new run (another --log_dir) with a smaller "
                          "--per_gpu_train_batch_size with more --gradient_accumulation_steps (the same batch; 2 x 1 "
                          "now); a resume from the last checkpoint keeps the micro-batch and the dtype here"), error
    _out_of_memory_from(monkeypatch, 3)
    with pytest.raises(torch.OutOfMemoryError):
        _pt_run(tmp_path / "one", data_paths["mbpp"], "--compile", "off", "--save_every", "2steps",
                "--gradient_checkpointing", "--model_dtype", "bf16", "--per_gpu_train_batch_size", "1")
    error = _error_line(tmp_path / "one")
    assert error.endswith("ERROR out of GPU memory in step 3: its micro-batch is 1 and nothing else here lowers a "
                          "step's memory; use a GPU with more memory, or cut the examples shorter with --max_length "
                          "(a new run)"), error
    _out_of_memory_from(monkeypatch, 1)
    with pytest.raises(torch.OutOfMemoryError):
        run_inprocess("fft", ["--task_name", "mbpp", "--model_type", "tiny-llama", "--data_path", data_paths["mbpp"],
                              "--limit_train_examples", "2", "--log_dir", str(tmp_path / "fft")])
    error = _error_line(tmp_path / "fft")
    assert "out of GPU memory in step 1: --gradient_checkpointing (" in error and "--model_dtype" not in error, error


def test_a_run_out_of_memory_resumes_with_a_smaller_micro_batch_and_ends_as_if_never_stopped(tmp_path, data_paths,
                                                                                              monkeypatch):
    """2 x 2 accumulation steps runs out of memory in step 2 (faked), after the checkpoint of step 1, in the middle of
    the first epoch; resumed as its error line says, in micro-batches of 1 x 4, each step takes the same 4 examples
    (6 examples: each epoch ends with a step of the last 2, one micro-batch of 2 or two of 1), and the run ends with
    the uninterrupted 2 x 2 run's learning rates, token counts, losses and weights. PT on tiny-llama has no dropout:
    only the order of float sums differs (measured: weights within 2.4e-7 of each other, losses within 1e-7)."""
    run = ["--gradient_accumulation_steps", "2", "--num_epochs", "2", "--compile", "off", "--save_every", "1steps"]
    _pt_run(tmp_path / "whole", data_paths["mbpp"], *run)
    _out_of_memory_from(monkeypatch, 3)  # step 2's first micro-batch
    with pytest.raises(torch.OutOfMemoryError):
        _pt_run(tmp_path / "cut", data_paths["mbpp"], *run)
    error = next(line for line in (tmp_path / "cut" / "train.log").read_text().splitlines() if " ERROR " in line)
    assert "it continues from step_00000001, the last complete checkpoint, adding --gradient_checkpointing " \
           "(activations recomputed instead of kept) or --per_gpu_train_batch_size 1 --gradient_accumulation_steps " \
           "4 (the same 4 examples per step; 2 x 2 now); a new run can also take --model_dtype bf16" in error, error
    monkeypatch.setattr(TunedModel, "forward", _FORWARD)
    _, config, log = _pt_run(tmp_path / "cut", data_paths["mbpp"], *run, "--per_gpu_train_batch_size", "1",
                             "--gradient_accumulation_steps", "4", "--resume_from", str(tmp_path / "cut"))
    assert "resuming with micro-batch 1 x 4 accumulation steps instead of 2 x 2: the same 4 examples per step" in log
    assert "resumed from " in log and "step 1, epoch 1, batch 4" in log  # 2 micro-batches of 2 = 4 of 1
    assert (config["train"]["per_gpu_train_batch_size"], config["train"]["gradient_accumulation_steps"]) == (1, 4)
    ours, whole = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("cut", "whole"))
    assert [(r["step"], r["epoch"], r["lr"], r["tokens"]) for r in ours] == \
           [(r["step"], r["epoch"], r["lr"], r["tokens"]) for r in whole] and len(ours) == 4
    assert [r["loss"] for r in ours] == pytest.approx([r["loss"] for r in whole], rel=1e-6)
    resumed, uninterrupted = (load_file(str(tmp_path / d / "final" / "adapter_model.safetensors"))
                              for d in ("cut", "whole"))
    assert resumed.keys() == uninterrupted.keys() and resumed
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6)
        assert not torch.equal(tensor, load_file(str(tmp_path / "cut" / "checkpoints" / "step_00000001" / "adapter"
                                                     / "adapter_model.safetensors"))[name])  # it trained on


def test_the_trainer_refuses_a_split_of_other_steps_that_the_parse_let_through(tmp_path, data_paths, monkeypatch,
                                                                                capsys):
    """The parse judges a resume's micro-batch from the checkpoint's record (which may lack the processes and the
    examples); the trainer checks again with the data and processes at hand, and refuses in the same line."""
    from utils import train_checks

    _pt_run(tmp_path / "run", data_paths["mbpp"], "--compile", "off", "--save_every", "2steps")
    shutil.rmtree(tmp_path / "run" / "final")  # as if stopped after step 2's checkpoint
    monkeypatch.setattr(train_checks, "_check_batch_split", lambda *args: None)
    with pytest.raises(SystemExit) as refused:
        _pt_run(tmp_path / "run", data_paths["mbpp"], "--compile", "off", "--save_every", "2steps",
                "--per_gpu_train_batch_size", "1", "--resume_from", str(tmp_path / "run"))
    assert refused.value.code == 2
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000002"
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: {checkpoint}: the checkpoint's micro-batch x accumulation steps is 2 x 1, this run's "
        f"1 x 1: a resume may change them only where the product (the examples per step on each process, 2) stays "
        f"the same; pass --per_gpu_train_batch_size 2 --gradient_accumulation_steps 1 to resume, or start a new run")


def test_compile_mode_reduce_overhead_marks_a_step_before_each_micro_batch(tmp_path, data_paths, monkeypatch):
    """--compile on --compile_mode reduce-overhead (here with a counting backend instead of inductor, whose CUDA
    graphs the CPU skips anyway): the decoder layers compile in that mode, each micro-batch's forward starts a new
    CUDA-graph step, batch widths are rounded to 64 by default, and with accumulation the gradients stay allocated
    between steps (outside the graphs' memory). The losses are eager's. Under --compile auto on the CPU nothing
    compiles, and the log and config.json say that the mode is not used. --compile on with --compile_mode auto (the
    default) compiles in the default mode on the CPU, and the log says why."""
    from utils import fast_paths

    modes, marks, set_to_none_calls = [], [], []
    real_compile = fast_paths.compile_layers

    def compile_layers(lm, **kwargs):
        modes.append(kwargs.get("mode"))
        return real_compile(lm, backend=lambda gm, example_inputs: gm.forward)

    def zero_grad(self, set_to_none=True, real=torch.optim.Optimizer.zero_grad):
        set_to_none_calls.append(set_to_none)
        return real(self, set_to_none)

    monkeypatch.setattr(fast_paths, "compile_layers", compile_layers)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    monkeypatch.setattr(torch.optim.Optimizer, "zero_grad", zero_grad)
    accumulate = ["--per_gpu_train_batch_size", "1", "--gradient_accumulation_steps", "2"]
    runs = {}
    try:
        for name, extra in (("eager", ["--compile", "off"]), ("graphs", ["--compile", "on", "--compile_mode",
                                                                          "reduce-overhead"]),
                            ("auto", ["--compile_mode", "reduce-overhead"]), ("mode-auto", ["--compile", "on"])):
            torch.compiler.reset()
            modes.clear(), marks.clear(), set_to_none_calls.clear()
            losses, config, log = _pt_run(tmp_path / name, data_paths["mbpp"], *extra, *accumulate)
            runs[name] = (losses, list(modes), len(marks), set(set_to_none_calls), config["train"]["compile_mode"],
                          {k: config["runtime"][k] for k in ("compile_mode", "cuda_graphs", "pad_to_multiple_of")})
            assert ("records no CUDA graphs" in log, "reduce-overhead is not used" in log) == (
                name == "graphs", name == "auto")
            assert ("--compile_mode auto: the default mode, no CUDA graphs (the device is cpu, not CUDA)" in log) == (
                name == "mode-auto")
    finally:
        torch.compiler.reset()
    assert runs["eager"][1:] == ([], 0, {True}, "auto",
                                 {"compile_mode": None, "cuda_graphs": False, "pad_to_multiple_of": None})
    assert runs["graphs"][1:] == (["reduce-overhead"], 6, {False}, "reduce-overhead",  # 3 steps x 2 micro-batches
                                  {"compile_mode": "reduce-overhead", "cuda_graphs": False, "pad_to_multiple_of": 64})
    assert runs["auto"][1:] == ([], 0, {True}, "reduce-overhead",
                                {"compile_mode": None, "cuda_graphs": False, "pad_to_multiple_of": None})
    assert runs["mode-auto"][1:] == ([None], 0, {True}, "auto",
                                     {"compile_mode": "default", "cuda_graphs": False, "pad_to_multiple_of": None})
    assert len(runs["eager"][0]) == 3
    for name in ("graphs", "auto", "mode-auto"):
        assert runs[name][0] == pytest.approx(runs["eager"][0], rel=1e-5), name


def test_a_crash_right_after_an_epochs_checkpoint_keeps_that_epochs_mean_in_train_log(tmp_path, data_paths,
                                                                                      monkeypatch, capsys):
    # the epoch-end checkpoint already counts the epoch as closed: a resume never logs its mean again
    from utils import checkpoint

    class Crash(BaseException):
        pass

    def crash_once_committed(name, stage):
        if (name, stage) == ("step_00000002", "committed"):
            raise Crash
    log_dir = tmp_path / "run"
    argv = ["--peft_method", "pt", "--task_name", "mbpp", "--model_type", "tiny-llama", "--data_path",
            data_paths["mbpp"], "--limit_train_examples", "4", "--per_gpu_train_batch_size", "2", "--num_epochs",
            "2", "--max_length", "64", "--save_every", "1epochs", "--log_dir", str(log_dir)]
    monkeypatch.setattr(checkpoint, "_kill_hook", crash_once_committed)
    with pytest.raises(Crash):
        run_inprocess("peft", argv)
    monkeypatch.undo()
    # other data under the same flags (an edited or replaced file) would change the run half-way: refused
    edited = read_jsonl(data_paths["mbpp"])
    first = min(range(len(edited)), key=lambda i: int(edited[i]["task_id"].split("/")[1]))
    edited[first] = {**edited[first], "canonical_solution": edited[first]["canonical_solution"] + "  # edited"}
    other = fixtures.write_jsonl(tmp_path / "edited.jsonl", edited)
    with pytest.raises(SystemExit) as exit_info:
        run_inprocess("peft", [a if a != data_paths["mbpp"] else other for a in argv] + ["--resume_from", str(log_dir)])
    assert exit_info.value.code == 2
    assert "the run trained on other data than --data_path" in capsys.readouterr().err
    assert run_inprocess("peft", argv + ["--resume_from", str(log_dir)]).global_step == 4
    logged = [line.split("INFO ")[1] for line in (log_dir / "train.log").read_text().splitlines()
              if ": mean loss" in line]
    assert logged == [f"epoch {i + 1}: mean loss {mean:.4f}" for i, mean in enumerate(epoch_means(log_dir))]
    assert len(logged) == 2


def test_the_default_peft_checkpoints_protect_the_run_and_go_once_final_is_written(tmp_path, data_paths):
    """PEFT's default: one checkpoint per epoch, the newest kept, none for the last step (final/ follows at once),
    and checkpoints/ removed once final/ is in place, so a finished run takes no more disk than before."""
    log_dir = tmp_path / "run"
    run_inprocess("pt", ["--peft_method", "pt", "--task_name", "mbpp", "--model_type", "tiny-llama", "--data_path",
                         records_file(data_paths, tmp_path, "mbpp", 4), "--limit_train_examples", "4",
                         "--per_gpu_train_batch_size", "2", "--num_epochs", "3", "--max_length", "48",
                         "--num_virtual_tokens", "2", "--log_dir", str(log_dir)])
    saved = re.findall(r"checkpoint (\S+)", (log_dir / "train.log").read_text())
    assert [pathlib.Path(p).name for p in saved] == ["step_00000002", "step_00000004"]  # epochs 1 and 2, not 3
    assert (log_dir / "final" / "adapter_config.json").is_file() and not (log_dir / "checkpoints").exists()


def test_a_skipped_fp16_step_does_not_advance_the_lr_schedule(tmp_path, data_paths, monkeypatch):
    """fp16's loss scaler skips the steps whose gradients overflow (often the first few): the schedule must not
    move on those, or warmup and decay shift and the run reaches lr 0 early."""
    import utils.training as training
    real, calls = training.optimizer_step, []

    def first_skipped(acc, opt):
        calls.append(1)
        real(acc, opt)
        return len(calls) == 1  # as an fp16 overflow on the first step

    monkeypatch.setattr(training, "optimizer_step", first_skipped)
    log_dir = tmp_path / "run"
    run_inprocess("peft", ["--peft_method", "pt", "--task_name", "mbpp", "--model_type", "tiny-llama",
                           "--data_path", data_paths["mbpp"], "--limit_train_examples", "6",
                           "--per_gpu_train_batch_size", "2", "--max_train_steps", "3", "--max_length", "32",
                           "--lr", "0.1", "--log_dir", str(log_dir)])
    lrs = [r["lr"] for r in read_metrics(log_dir / "metrics.jsonl")]
    assert lrs[0] == pytest.approx(0.1) and lrs[1] == pytest.approx(0.1), lrs  # linear: 0.1, 0.1, 0.0667


def test_virtual_tokens_beyond_the_models_context_are_refused_before_the_log_dir(tmp_path, data_paths, capsys):
    """CRUXEval's examples take up to 512 positions after the m virtual tokens; tiny-llama has 1,024. A rotary
    model would train on positions it never saw, without an error."""
    argv = ["--peft_method", "pt", "--task_name", "cruxeval_output_prediction", "--model_type", "tiny-llama",
            "--data_path", data_paths["cruxeval"], "--limit_train_examples", "2", "--per_gpu_train_batch_size", "2",
            "--max_train_steps", "1", "--log_dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exc:
        run_inprocess("peft", [*argv, "--num_virtual_tokens", "600"])
    assert exc.value.code == 2
    assert ("--num_virtual_tokens 600 before cruxeval_output_prediction examples of up to 512 tokens: 1112 tokens, "
            "more than the model's context of 1024; use a smaller --num_virtual_tokens, or cut the examples shorter "
            "with --max_length") in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert run_inprocess("peft", [*argv, "--num_virtual_tokens", "600", "--max_length", "424"]).global_step == 1


def test_idpgs_virtual_tokens_count_against_the_context_as_pts_do(tmp_path, data_paths, capsys):
    # IDPG prepends m generated tokens like PT and LOPA: its rows take m more positions, and its first label is
    # predicted from a virtual token (counted in the loss's mean)
    argv = ["--peft_method", "idpg", "--enc_model_type", "tiny-roberta", "--task_name", "cruxeval_output_prediction",
            "--model_type", "tiny-llama", "--data_path", data_paths["cruxeval"], "--limit_train_examples", "2",
            "--per_gpu_train_batch_size", "2", "--max_train_steps", "1", "--num_virtual_tokens", "600",
            "--log_dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exc:
        run_inprocess("peft", argv)
    assert exc.value.code == 2
    assert "--num_virtual_tokens 600 before cruxeval_output_prediction examples of up to 512 tokens" in \
        capsys.readouterr().err
    assert not (tmp_path / "run").exists()
