"""The benchmark scripts run end to end on the CPU with tiny models (no timing is asserted)."""
import json

import pytest
import torch

from benchmarks import bench_decode_loop, bench_generate, bench_train


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_bench_train_plan_only_packs_phi2s_padded_batches_without_running_it(tmp_path, data_paths):
    """The layouts of phi-2's architecture (built on the meta device): packing removes most padded positions."""
    out = tmp_path / "results.jsonl"
    bench_train.main(["--model", "phi-2", "--plan_only", "--batch_size", "2", "--padding_batches", "20",
                      "--results", str(out), "--data_path", data_paths["mbpp"]])
    plan = {line["padding"]: line for line in _lines(out)}
    assert set(plan) == {"fixed", "dynamic", "dynamic-unpacked", "dynamic-grouped"}
    assert all(line["plan_only"] and "tokens_per_s" not in line for line in plan.values())
    assert plan["fixed"]["est_speedup_vs_fixed"] == 1.0
    if data_paths["real"]:  # the fixture's three short examples barely pad
        assert plan["dynamic"]["decoder_pad_fraction"] < 0.5 * plan["dynamic-unpacked"]["decoder_pad_fraction"]
        assert plan["dynamic"]["est_speedup_vs_fixed"] > plan["dynamic-unpacked"]["est_speedup_vs_fixed"] > 1.0


def test_bench_train_smoke_writes_one_line_per_figure(tmp_path, data_paths):
    out = tmp_path / "results.jsonl"
    bench_train.main(["--smoke", "--padding", "--results", str(out), "--data_path", data_paths["mbpp"]])
    lines = _lines(out)
    methods = {line["method"] for line in lines if "padding" not in line}
    assert methods == {"fft", "lora", "pt", "idpg", "lopa", "peft-pt", "peft-lora"}
    for line in lines:
        assert line["bench"] == "train" and "error" not in line
        assert {"model", "method", "batch_size", "device", "versions", "date", "run_id"} <= set(line)
        assert line["tokens_per_s"] > 0
    padding = {line["padding"]: line for line in lines if "padding" in line}
    assert set(padding) == {"fixed", "dynamic", "dynamic-unpacked", "dynamic-grouped"}
    assert padding["fixed"]["pad_fraction"] > max(padding["dynamic"]["pad_fraction"],
                                                  padding["dynamic-grouped"]["pad_fraction"])
    assert padding["dynamic"]["pad_fraction"] == padding["dynamic-unpacked"]["pad_fraction"]
    assert padding["dynamic"]["decoder_pad_fraction"] <= padding["dynamic-unpacked"]["decoder_pad_fraction"]
    assert [padding[m]["packing"] for m in ("fixed", "dynamic", "dynamic-unpacked")] == [False, True, False]
    # every method but fft trains only a small part of the model
    trainable = {line["method"]: line["trainable_params"] for line in lines if "padding" not in line}
    assert trainable["pt"] == trainable["peft-pt"] and trainable["lora"] == trainable["peft-lora"]
    assert max(v for k, v in trainable.items() if k != "fft") < trainable["fft"] / 10


def test_bench_generate_smoke(tmp_path, data_paths):
    out = tmp_path / "results.jsonl"
    bench_generate.main(["--smoke", "--results", str(out), "--data_path", data_paths["mbpp"]])
    lines = _lines(out)
    gen = [line for line in lines if line["bench"] == "generate"]
    assert {line["method"] for line in gen} == {"hf-generate", "none", "pt", "lopa", "none-own", "pt-own",
                                                "lopa-own", "none-own-full", "none-own-static"}
    assert all(line["new_tokens_per_s"] > 0 and "error" not in line for line in gen)
    own = {line["method"]: line for line in gen if "-own" in line["method"]}
    assert {line["decode_loop"] for line in own.values()} == {"own"}
    # -own: attention over the cache positions in use, in buckets of 64; -own-full: over the whole static cache;
    # -own-static: compiled (on a GPU) once per shape and bucket, where the others compile once
    assert {m: line["kv_bucket"] for m, line in own.items()} == {"none-own": 64, "pt-own": 64, "lopa-own": 64,
                                                                  "none-own-full": None, "none-own-static": 64}
    assert {m for m, line in own.items() if not line["dynamic_shapes"]} == {"none-own-static"}
    checks = [line for line in lines if line["bench"] == "generate-check"]
    assert {line["method"] for line in checks} == {"none", "lopa", "none-own", "lopa-own"}
    assert all(line["identical_rows"] == 4 for line in checks)  # fp32 CPU: fast path and own loop == eager path
    assert all(line["identical_rows_vs_fast"] == 4 for line in checks if line["method"].endswith("-own"))
    for line in checks:  # identical rows: no divergence, and fp32 rounding noise only (the own loop's logits too)
        assert line["first_divergence"] == [None] * 4 and line["divergences_not_near_ties"] == 0
        assert line["first_step_top1_agrees"] == [True] * 4 and max(line["first_step_max_logit_diff"]) < 1e-4
        assert 0 <= line["max_logit_diff_before_divergence"] < 1e-4


def test_bench_generate_check_only_writes_the_checks_alone(tmp_path, data_paths):
    out = tmp_path / "results.jsonl"
    bench_generate.main(["--smoke", "--check_only", "--results", str(out), "--data_path", data_paths["mbpp"]])
    lines = _lines(out)
    assert {line["bench"] for line in lines} == {"generate-check"}
    assert {line["method"] for line in lines} == {"none", "lopa", "none-own", "lopa-own"}
    with pytest.raises(SystemExit):  # nothing left to run
        bench_generate.main(["--smoke", "--check_only", "--no_check", "--results", str(out)])


def test_bench_train_padding_alone_records_its_compile_mode(tmp_path, data_paths):
    """--methods "" runs the padding comparison alone (gpu_run.sh's padding_graphs); its lines name the compile
    mode, so that summarize tells a CUDA-graph run from the trainer's default."""
    out = tmp_path / "results.jsonl"
    bench_train.main(["--smoke", "--methods", "", "--padding", "--results", str(out), "--data_path",
                      data_paths["mbpp"]])
    lines = _lines(out)
    assert [line["padding"] for line in lines] == ["fixed", "dynamic", "dynamic-unpacked", "dynamic-grouped"]
    assert all(line["compile_mode"] is None and line["compile"] is False for line in lines)  # --smoke: eager


def test_bench_train_pad_multiple_rounds_packed_rows_as_the_trainer_does(tmp_path, data_paths, monkeypatch):
    """--pad_multiple sets the model's ``packed_width_multiple``, as the trainer's --pad_to_multiple_of does: the
    packed rows the model runs are multiples of it wide, like the collator's padded rows (the CUDA-graph runs of
    gpu_run.sh then measure the trainer's shapes)."""
    import custom_peft.packing as packing

    real, widths = packing.pack_rows, []
    monkeypatch.setattr(packing, "pack_rows", lambda *a: widths.append(real(*a)[1].shape[1]) or real(*a))
    out = tmp_path / "results.jsonl"
    bench_train.main(["--smoke", "--methods", "", "--padding", "--pad_multiple", "8", "--results", str(out),
                      "--data_path", data_paths["mbpp"]])
    lines = {line["padding"]: line for line in _lines(out)}
    assert all(line["pad_multiple"] == 8 for line in lines.values())
    assert widths and all(width % 8 == 0 for width in widths), widths
    assert lines["dynamic"]["decoder_pad_fraction"] > 0  # the FLOP estimate counts the rounded rows too
    batch = {"attention_mask": torch.tensor([[1] + [0] * 7, [1] * 8]), "input_ids": torch.zeros(2, 8)}  # m = 2
    assert bench_train._decoder_work(batch, 2, 1e9, True) == (13, 13 * (1e9 + 13), (1, 13))  # one row of 3 + 10
    assert bench_train._decoder_work(batch, 2, 1e9, True, 8) == (16, 16 * (1e9 + 16), (1, 16))  # rounded up to 16
    assert bench_train._decoder_work(batch, 2, 1e9, False) == (20, 20 * (1e9 + 10), (2, 10))  # padded: 2 rows of 10
    # each mode counts the distinct shapes its batches run (CUDA graphs record one per shape); fixed rows have one
    assert lines["fixed"]["decoder_shapes"] == 1
    assert all(1 <= line["decoder_shapes"] <= line["batches"] for line in lines.values())


def test_bench_decode_loop_smoke(tmp_path, data_paths):
    out = tmp_path / "results.jsonl"
    bench_decode_loop.main(["--smoke", "--results", str(out), "--data_path", data_paths["mbpp"]])
    lines = _lines(out)
    assert [(line["method"], line["batch_size"]) for line in lines] == [
        (loop, rows) for rows in (1, 3) for loop in ("hf-generate", "hf-static", "own-k1", "own-k8", "own-end")]
    # no stop string occurs and EOS is off: every loop makes every token, and the same ones
    assert all(line["made"] == 10 and line["same_tokens_as_first"] for line in lines)
    assert all(line["seconds"] > 0 and line["prefill_seconds"] > 0 for line in lines)  # no timing is compared


def test_bench_train_compiles_every_methods_layers(tmp_path, monkeypatch):
    """Methods run in one process and their decoder layers share one transformers wrapper, whose compiled versions
    torch caps (8; 2 here): without a reset between methods, later methods were timed eager, still labelled compiled."""
    import torch

    from utils.fast_paths import compile_layers

    compiled = []

    def counting_backend(gm, example_inputs):
        compiled[-1] += 1
        return gm.forward

    def compile_counted(lm):
        compiled.append(0)
        compile_layers(lm, backend=counting_backend)

    monkeypatch.setattr(bench_train, "compile_layers", compile_counted)
    with torch._dynamo.config.patch(recompile_limit=2):
        bench_train.main(["--model", "tiny-phi-2", "--encoder", "tiny-roberta", "--methods", "pt,lora,lopa",
                          "--batch_size", "2", "--seq_len", "32", "--m", "4", "--dtype", "fp32", "--steps", "1",
                          "--warmup", "1", "--results", str(tmp_path / "r.jsonl")])
    assert len(compiled) == 3 and min(compiled) >= 1, compiled


def test_preflight_runs_real_widths_at_one_layer_and_names_a_failed_run(capsys):
    """The GPU run's code paths on deepseek-coder-1.3b's real config (one layer): it must pass here, report a
    method that fails, and leave the registry's layer counts as they were."""
    from benchmarks import preflight
    from utils.registry import get_encoder_spec, get_model_spec

    with pytest.raises(SystemExit) as exit_:  # one run: a method that works and one that cannot
        preflight.main(["--models", "deepseek-coder-1.3b-base", "--gen_methods", "none",
                        "--train_methods", "lopa,no-such-method"])
    out = capsys.readouterr().out
    assert '"method": "lopa", "batch_size": 2' in out and '"method": "none"' in out and '"generate-check"' in out
    assert exit_.value.code == 1 and "preflight: train deepseek-coder-1.3b-base: failed: no-such-method" in out
    assert "generate deepseek-coder-1.3b-base" not in out.split("preflight:")[-1]  # generation passed
    assert get_model_spec("deepseek-coder-1.3b-base").arch["num_hidden_layers"] == 24
    assert get_encoder_spec("codebert-base").arch["num_hidden_layers"] == 12


def test_preflight_names_a_model_without_an_architecture_config(capsys):
    """codegen-350M (and minilm as encoder) have no config to cut to one layer: a one-line error, not a KeyError."""
    from benchmarks import preflight

    for argv in (["--models", "codegen-350M"], ["--models", "phi-2", "--encoder", "minilm"]):
        with pytest.raises(SystemExit) as exit_:
            preflight.main(argv)
        assert exit_.value.code == 2 and f"error: {argv[-1]}: no architecture config in utils/registry.py; --models " \
            "takes phi-2, deepseek-coder-1.3b-base, Meta-Llama-3-8B" in capsys.readouterr().err


def test_gpu_run_encoder_ab_runs_every_line_when_one_fails(tmp_path):
    """encoder_ab: the CUDA-graph variant of the first model failing (never yet run on a GPU) must not lose the
    next model's lines; the section still reports the failure."""
    import subprocess

    calls = tmp_path / "calls.txt"
    fake = tmp_path / "python"  # records each benchmark command; the graphs run of model a fails
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\n'
                    '[[ "$*" == *"--model a "*--encoder_graphs* ]] && exit 1\nexit 0\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    result = subprocess.run(["bash", "benchmarks/gpu_run.sh", str(out), "data.jsonl", "encoder_ab"],
                            env={"PATH": "/usr/bin:/bin", "PYTHON": str(fake), "AB_MODELS": "a b"},
                            capture_output=True, text=True, timeout=60)
    runs = [line.split()[2:4] + line.split()[6:7] for line in calls.read_text().splitlines()
            if "bench_train" in line]
    assert runs == [["--model", "a", "--eager_encoder"], ["--model", "a", "--encoder_graphs"],
                    ["--model", "b", "--eager_encoder"], ["--model", "b", "--encoder_graphs"]], runs
    assert "=== encoder_ab exit 1" in result.stdout, result.stdout


def test_gpu_run_padding_graphs_and_generate_check_run_what_they_say(tmp_path):
    """padding_graphs: phi-2's padding modes at a multiple of 64, under CUDA graphs and then compiled as the trainer
    does, the second run even when the first fails, with an empty --methods (the padding comparison alone);
    generate_check: the check alone, and GEN_NO_CHECK keeps generate_phi2 from running it a second time."""
    import subprocess

    calls = tmp_path / "calls.txt"
    fake = tmp_path / "python"  # one line per command, each argument in <> so that an empty one shows
    fake.write_text(f'#!/usr/bin/env bash\nprintf "<%s>" "$@" >> {calls}\necho >> {calls}\n'
                    '[[ "$*" == *"--compile_mode reduce-overhead"* ]] && exit 1\nexit 0\n')
    fake.chmod(0o755)
    result = subprocess.run(["bash", "benchmarks/gpu_run.sh", str(tmp_path / "out"), "my data.jsonl",
                             "padding_graphs,generate_phi2,generate_check"],
                            env={"PATH": "/usr/bin:/bin", "PYTHON": str(fake), "GEN_NO_CHECK": "1"},
                            capture_output=True, text=True, timeout=60)
    runs = [line[1:-1].split("><") for line in calls.read_text().splitlines() if line.startswith("<-m><benchmarks.")]
    assert [run[1] for run in runs] == ["benchmarks.bench_train", "benchmarks.bench_train",
                                        "benchmarks.bench_generate", "benchmarks.bench_generate"], runs
    for run, mode in zip(runs, ("reduce-overhead", "default")):
        assert run[run.index("--methods") + 1] == "" and "--padding" in run
        assert run[run.index("--pad_multiple") + 1] == "64" and run[run.index("--compile_mode") + 1] == mode
        assert run[run.index("--data_path") + 1] == "my data.jsonl" and run[run.index("--padding_batches") + 1] == "30"
        assert run[run.index("--model") + 1] == "phi-2" and run[run.index("--batch_size") + 1] == "8"
    assert "--no_check" in runs[2] and "--check_only" not in runs[2]
    assert "--check_only" in runs[3] and "--no_check" not in runs[3]
    assert "=== padding_graphs exit 1" in result.stdout and "=== generate_check exit 0" in result.stdout
    # the graphs' memory over an epoch's shapes on a large model: PADG_MODEL, PADG_BATCH, PADG_BATCHES=0
    calls.unlink()
    subprocess.run(["bash", "benchmarks/gpu_run.sh", str(tmp_path / "out"), "d.jsonl", "padding_graphs"],
                   env={"PATH": "/usr/bin:/bin", "PYTHON": str(fake), "PADG_MODEL": "Meta-Llama-3-8B",
                        "PADG_BATCH": "2", "PADG_BATCHES": "0"}, capture_output=True, text=True, timeout=60)
    runs = [line[1:-1].split("><") for line in calls.read_text().splitlines() if line.startswith("<-m><benchmarks.")]
    assert [(run[run.index("--model") + 1], run[run.index("--batch_size") + 1], run[run.index("--padding_batches") + 1],
             run[run.index("--compile_mode") + 1]) for run in runs] == [
        ("Meta-Llama-3-8B", "2", "0", "reduce-overhead"), ("Meta-Llama-3-8B", "2", "0", "default")], runs


def test_padding_modes_warm_up_twice_under_cuda_graphs_and_profile_spread_batches():
    """Under CUDA graphs a new shape's first run is a warm-up and its second records: the timed pass must find every
    shape recorded. The profiled steps spread over a mode's batches, not its first few."""
    import argparse

    from benchmarks.profile_step import spread

    def args(compile_, mode):
        return argparse.Namespace(compile=compile_, compile_mode=mode)

    assert bench_train.untimed_passes(args(True, "reduce-overhead")) == 2
    assert bench_train.untimed_passes(args(True, "default")) == 1
    assert bench_train.untimed_passes(args(False, "reduce-overhead")) == 1
    assert spread(list(range(60)), 3) == [0, 20, 40] and spread(["only"], 3) == ["only"] * 3


def test_bench_train_refuses_to_run_nothing(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_train.main(["--methods", ""])
    assert exit_.value.code == 2 and "runs no method" in capsys.readouterr().err


def test_count_ops_gives_the_layer_graph_counts_benchmarks_md_quotes():
    """BENCHMARKS.md's LoRA estimate: per decoder layer of deepseek's structure, 7 matrix products forward and 7
    backward for pt and lopa, 13 and 19 for lora (r 16 on q, k, v; its first layer compiles apart)."""
    from benchmarks import count_ops

    rows = {r["method"]: r for r in count_ops.main(["--only", "layer_graphs"])}
    counts = {m: (r["forward_matmuls"], r["backward_matmuls"], r["graphs"]) for m, r in rows.items()}
    assert counts == {"pt": (7, 7, 2), "lopa": (7, 7, 2), "lora": (13, 19, 4)}


def test_count_ops_gives_the_outside_layer_counts_benchmarks_md_quotes():
    """BENCHMARKS.md's LOPA estimate: outside the decoder layers an eager LOPA step dispatches PT's operations plus
    its frozen encoder's (forward) and its heads' (forward, backward, optimizer)."""
    from benchmarks import count_ops

    rows = {r["method"]: r for r in count_ops.main(["--only", "outside_layers"])}
    counts = {m: (r["forward_ops"], r["backward_ops"], r["optimizer_ops"]) for m, r in rows.items()}
    assert counts == {"pt": (72, 29, 13), "lopa": (962, 79, 85)}
    assert rows["pt"]["per_layer_forward_ops"] == rows["lopa"]["per_layer_forward_ops"] > 0
