"""benchmarks/summarize.py: the targets and ratios of BENCHMARKS.md, recomputed from the committed result lines."""
import json

import pytest

from benchmarks import summarize
from benchmarks.common import RESULTS

H100 = ["gpu-20261126T181908", "gpu-20261126T182538"]


def _verdicts(lines):
    return {target: (measured, met) for target, measured, met in summarize.targets(lines)}


def test_the_h100_runs_targets_as_benchmarks_md_states_them():
    got = _verdicts(summarize.load(RESULTS, H100))
    assert got["phi-2: pt ≥ 1.2× peft-pt"] == ("2.36×", True)
    assert got["phi-2: lopa ≥ 0.95× pt"] == ("0.910×", False)
    assert got["deepseek-coder-1.3b-base: lopa ≥ 0.95× pt"] == ("0.666×", False)
    assert got["Meta-Llama-3-8B: lopa ≥ 0.95× pt"] == ("0.969×", True)
    assert got["deepseek-coder-1.3b-base: lora ≥ 1.3× peft-lora"] == ("1.73×", True)
    assert got["phi-2: fft ≥ 45 % MFU"] == ("47.3 %", True)
    assert got["phi-2: useful tokens/s, dynamic (compiled, default mode) ≥ 2× fixed"] == ("1.90×", False)
    assert got["phi-2: generate none, B = 64: ≥ 6,000 new tokens/s"] == ("5,851", False)
    assert got["phi-2: generate lopa, B = 64: ≥ 2.2× hf-generate"] == ("5.77×", True)
    # those lines predate allocated_before_gib: a leak from an earlier method cannot be ruled out
    assert got["phi-2: lopa peak ≤ pt + 1 GiB"] == ("+4.98 GiB (no allocated_before_gib)", None)
    assert "Meta-Llama-3-8B: fft ≥ 45 % MFU" not in got  # not run: no verdict invented
    text = summarize.markdown(summarize.load(RESULTS, H100))
    assert "| deepseek-coder-1.3b-base | lopa | 59,021 | 69.4 | 1.24× | 0.666× | 32.4 % | 10.32 |" in text
    assert "| phi-2 | none | 64 | 5,851 | 10.94 | 6.18× |" in text
    assert "* phi-2 lopa: 2 of 4 rows identical, 68.8 % of tokens" in text


def test_the_session_13_h100_runs_targets_as_benchmarks_md_states_them():
    got = _verdicts(summarize.load(RESULTS, ["gpu-s13-train", "gpu-s13-gen"]))
    assert got["phi-2: lopa ≥ 0.95× pt"] == ("0.966×", True)
    assert got["deepseek-coder-1.3b-base: lopa ≥ 0.95× pt"] == ("0.963×", True)
    assert got["phi-2: lopa peak ≤ pt + 1 GiB"] == ("+0.29 GiB", True)
    assert got["deepseek-coder-1.3b-base: lopa peak ≤ pt + 1 GiB"] == ("+0.28 GiB", True)
    assert got["phi-2: useful tokens/s, dynamic (compiled, default mode) ≥ 2× fixed"] == ("1.85×", False)
    assert got["phi-2: generate none, B = 64: ≥ 6,000 new tokens/s"] == ("5,786", False)
    assert got["phi-2: generate none-own, B = 64: ≥ 6,000 new tokens/s"] == ("7,796", True)
    assert got["phi-2: generate lopa-own, B = 64: ≥ 6,000 new tokens/s"] == ("7,715", True)
    text = summarize.markdown(summarize.load(RESULTS, ["gpu-s13-train", "gpu-s13-gen"]))
    assert "| deepseek-coder-1.3b-base | lopa+eager_encoder | 72,772 | 56.3 | 1.57× | 0.850× | 39.9 % | 8.02 |" in text
    assert "| deepseek-coder-1.3b-base | lopa+encoder_graphs | 67,983 | 60.3 | 1.46× | 0.794× | 37.3 % | 8.10 |" in text


def test_the_session_17_h100_runs_figures_as_benchmarks_md_states_them():
    lines = summarize.load(RESULTS, ["gpu-s17-gen"])
    got = _verdicts(lines)
    assert got["phi-2: generate none-own, B = 64: ≥ 6,000 new tokens/s"] == ("7,587", True)  # the last line counts
    assert got["phi-2: generate none-own, B = 64: ≥ 2.2× hf-generate"] == ("12.08×", True)
    assert got["phi-2: generate lopa-own, B = 64: ≥ 2.2× hf-generate"] == ("12.04×", True)
    text = summarize.markdown(lines)
    assert "| phi-2 | hf-generate | 64 | 628 | 101.94 |  | 4.0 |" in text
    assert "| phi-2 | none-own | 64 | 7,660 | 8.35 | 12.20× | 28.2 |" in text
    for method in ("none-own", "lopa-own"):  # the check that made the own loop the default on a GPU
        line, = [x for x in text.splitlines() if x.startswith(f"* phi-2 {method}: ")]
        assert line.endswith("1 of 4 rows identical, " + ("65.6" if method == "none-own" else "71.9") +
                             " % of tokens, 0 divergences not near ties; 4 rows identical to the fast path's"), line



def test_the_session_19_h100_runs_figures_as_benchmarks_md_states_them():
    lines = summarize.load(RESULTS, ["gpu-s19-train", "gpu-s19-cli", "gpu-s19-ab"])
    got = _verdicts(lines)
    assert not any("useful tokens/s" in target for target in got)  # only variants ran: nothing judged
    assert not any("peft-lora" in target for target in got)  # its baseline was not run
    text = summarize.markdown(lines)
    for row in ("| phi-2 | fixed+reduce-overhead+pad64 | 12,157 | 42,430 | 70.1 % | 1.00× |",
                "| phi-2 | dynamic+reduce-overhead+pad64 | 29,646 | 55,088 | 0.1 % | 2.44× |",
                "| phi-2 | dynamic-unpacked+reduce-overhead+pad64 | 22,894 | 42,541 | 44.7 % | 1.88× |",
                "| phi-2 | dynamic-grouped+reduce-overhead+pad64 | 34,679 | 41,242 | 14.7 % | 2.85× |",
                "| phi-2 | dynamic+pad64 | 20,549 | 38,185 | 0.1 % | 1.69× |",
                "| phi-2 | dynamic-grouped+pad64 | 19,846 | 23,601 | 14.7 % | 1.63× |",
                "| deepseek-coder-1.3b-base | lora | 57,082 | 71.8 |  | 0.621× | 31.4 % | 9.41 |",
                "| deepseek-coder-1.3b-base | lora+reduce-overhead | 79,542 | 51.5 |  | 0.865× | 43.8 % | 3.43 |",
                "| phi-2 | lopa+eager_encoder | 42,869 | 95.5 |  |  | 48.1 % | 13.16 |",
                "| phi-2 | lopa+encoder_graphs | 40,629 | 100.8 |  |  | 45.6 % | 13.23 |",
                "| phi-3 | none | 64 | 5,107 | 12.53 |  | 33.0 |",
                "| phi-3 | none-own | 64 | 6,495 | 9.85 |  | 65.3 |"):
        assert row in text, row
    graphed = [x for x in lines if x.get("compile_mode") == "reduce-overhead"]
    assert len(graphed) == 6 and all(x["cudagraph_skips"] == 0 for x in graphed)
    assert {x["device"] for x in lines} == {"NVIDIA H100 80GB HBM3"}

def test_the_session_20_h100_runs_figures_as_benchmarks_md_states_them():
    lines = summarize.load(RESULTS, ["gpu-s20-train"])
    got = _verdicts(lines)
    assert got == {"deepseek-coder-1.3b-base: lora ≥ 1.3× peft-lora": ("1.95×", True),
                   "phi-2: useful tokens/s, dynamic (CUDA graphs, widths to 64: the default on one GPU) ≥ 2× fixed": (
                       "2.41×", True)}
    text = summarize.markdown(lines)
    for row in ("| deepseek-coder-1.3b-base | peft-lora | 31,001 | 132.1 |  |  | 17.1 % | 11.92 |",
                "| deepseek-coder-1.3b-base | lora | 60,449 | 67.8 | 1.95× |  | 33.3 % | 9.41 |",
                "| deepseek-coder-1.3b-base | lora+reduce-overhead | 79,109 | 51.8 | 2.55× |  | 43.5 % | 3.43 |",
                "| phi-2 | fixed+reduce-overhead+pad64 | 12,163 | 42,452 | 70.1 % | 1.00× |",
                "| phi-2 | dynamic+reduce-overhead+pad64 | 29,292 | 54,430 | 2.5 % | 2.41× |",
                "| phi-2 | dynamic-unpacked+reduce-overhead+pad64 | 22,803 | 42,372 | 44.7 % | 1.87× |",
                "| phi-2 | dynamic-grouped+reduce-overhead+pad64 | 36,113 | 42,947 | 4.0 % | 2.97× |",
                "| phi-2 | fixed+pad64 | 12,199 | 42,577 | 70.1 % | 1.00× |",
                "| phi-2 | dynamic+pad64 | 17,490 | 32,500 | 2.5 % | 1.43× |",
                "| phi-2 | dynamic-unpacked+pad64 | 16,938 | 31,473 | 44.7 % | 1.39× |",
                "| phi-2 | dynamic-grouped+pad64 | 20,426 | 24,291 | 4.0 % | 1.67× |"):
        assert row in text, row
    assert all(x["cudagraph_skips"] == 0 for x in lines) and len(lines) == 11
    assert {x["device"] for x in lines} == {"NVIDIA H100 80GB HBM3"}


def test_padding_variants_are_compared_with_their_own_fixed_line_and_only_the_defaults_judged():
    """bench_train --padding under CUDA graphs or with lengths rounded up to 64 (gpu_run.sh's padding_graphs): shown
    with its variant in the table, against the fixed line of the same variant; only the trainer's defaults count for
    the 2× target: the default compile mode, and CUDA graphs with widths to 64 (the default on one GPU since session
    20), except in session 19's run, whose packed rows were not rounded."""
    def pad(mode, useful, **variant):
        return {"bench": "train", "model": "m", "method": "pt", "padding": mode, "batch_size": 8,
                "useful_tokens_per_s": useful, "tokens_per_s": 2 * useful, "decoder_pad_fraction": 0.1, **variant}

    graphs = dict(compile_mode="reduce-overhead", pad_multiple=64)
    lines = [pad("fixed", 100.0, compile_mode="default"), pad("dynamic", 185.0, compile_mode="default"),
             pad("fixed", 120.0, **graphs), pad("dynamic", 300.0, **graphs),
             pad("dynamic", 150.0, compile_mode="default", pad_multiple=64)]
    got = _verdicts(lines)
    assert got["m: useful tokens/s, dynamic (compiled, default mode) ≥ 2× fixed"] == ("1.85×", False)
    assert got["m: useful tokens/s, dynamic (CUDA graphs, widths to 64: the default on one GPU) ≥ 2× fixed"] == (
        "2.50×", True)
    assert len([t for t in got if "useful tokens/s" in t]) == 2  # +pad64 alone (no fixed line) is not judged
    unrounded = [dict(line, run_id="gpu-s19-train") for line in lines]
    assert [t for t in _verdicts(unrounded) if "useful tokens/s" in t] == [
        "m: useful tokens/s, dynamic (compiled, default mode) ≥ 2× fixed"]
    text = summarize.markdown(lines)
    assert "| m | dynamic+reduce-overhead+pad64 | 300 | 600 | 10.0 % | 2.50× |" in text
    assert "| m | dynamic+pad64 | 150 | 300 | 10.0 % |  |" in text  # no fixed line of that variant: no ratio
    assert "| m | dynamic | 185 | 370 | 10.0 % | 1.85× |" in text


def _train(method, tps, peak, before, model="m"):
    return {"bench": "train", "model": model, "method": method, "batch_size": 8, "seq_len": 512,
            "tokens_per_s": tps, "mfu": None, "peak_gib": peak, "allocated_before_gib": before}


@pytest.mark.parametrize("before, lopa_peak, expected", [
    (0.0, 13.5, ("+0.50 GiB", True)),
    (0.0, 14.5, ("+1.50 GiB", False)),
    (4.69, 17.8, ("+4.80 GiB (4.69 GiB left by an earlier method)", None)),
])
def test_the_lopa_peak_target_is_judged_only_without_leftovers(before, lopa_peak, expected):
    lines = [_train("pt", 100.0, 13.0, 0.0), _train("lopa", 96.0, lopa_peak, before)]
    assert _verdicts(lines)["m: lopa peak ≤ pt + 1 GiB"] == expected


def test_the_lopa_peak_target_uses_the_run_peak_where_both_lines_have_it():
    """Under CUDA graphs the timed steps' peak leaves the graphs' memory out (it looks free once recorded): the peak
    over the run counts it, and is judged where both lines have it; the table shows all three figures."""
    pt = dict(_train("pt", 100.0, 3.4, 0.0), run_peak_gib=9.0, reserved_gib=11.0)
    lopa = dict(_train("lopa", 96.0, 3.5, 0.0), run_peak_gib=10.5, reserved_gib=12.5)
    assert _verdicts([pt, lopa])["m: lopa peak ≤ pt + 1 GiB"] == ("+1.50 GiB", False)
    assert _verdicts([pt, dict(lopa, run_peak_gib=None)])["m: lopa peak ≤ pt + 1 GiB"] == ("+0.10 GiB", True)
    text = summarize.markdown([pt, lopa])
    assert "| m | lopa | 96 | 42666.7 |  | 0.960× |  | 3.50 | 10.50 | 12.50 |" in text


def test_an_eager_encoder_variant_is_shown_beside_lopa_and_never_judged_in_its_place():
    variant = dict(_train("lopa", 50.0, 13.2, 0.0), compile=True, compile_encoder=False)
    lopa = dict(_train("lopa", 90.0, 13.2, 0.0), compile=True, compile_encoder=True)
    graphed = dict(_train("lopa", 99.0, 13.2, 0.0), compile=True, compile_encoder=False, encoder_graphs=True)
    lines = [_train("peft-pt", 40.0, 30.0, 0.0), _train("pt", 100.0, 13.0, 0.0), lopa, variant, graphed]
    assert _verdicts(lines)["m: lopa ≥ 0.95× pt"] == ("0.900×", False)
    assert "| m | lopa+eager_encoder | 50 | 81920.0 | 1.25× | 0.500× |  | 13.20 |" in summarize.markdown(lines)
    assert "| m | lopa+encoder_graphs | 99 |" in summarize.markdown(lines)
    # CUDA graphs of the decoder layers (bench_train --compile_mode reduce-overhead) never stand in for pt
    overhead = dict(_train("pt", 200.0, 13.0, 0.0), compile=True, compile_mode="reduce-overhead")
    assert _verdicts([*lines, overhead])["m: lopa ≥ 0.95× pt"] == ("0.900×", False)
    assert "| m | pt+reduce-overhead | 200 |" in summarize.markdown([*lines, overhead])
    # lines from before the encoder was compiled by default carry no compile_encoder field: they are the default
    assert _verdicts([*lines[:2], _train("lopa", 96.0, 13.2, 0.0), variant])["m: lopa ≥ 0.95× pt"][1] is True


def test_the_own_decoding_loop_is_judged_beside_generate():
    def gen(method, tps, model="phi-2"):
        return {"bench": "generate", "model": model, "method": method, "batch_size": 64, "new_tokens_per_s": tps,
                "seconds": 256 * 64 / tps, "new_tokens": 256}

    lines = [gen("hf-generate", 1000.0), gen("none", 5800.0), gen("none-own", 9000.0), gen("none-own-full", 7500.0),
             gen("none", 3000.0, "phi-3"), {**gen("none-own-static", 9100.0), "warmup_seconds": 81.25},
             {"bench": "generate-check", "model": "phi-2", "method": "none-own", "batch_size": 4, "identical_rows": 3,
              "token_agreement": 0.9, "identical_rows_vs_fast": 2}]
    got = _verdicts(lines)
    assert got["phi-2: generate none, B = 64: ≥ 6,000 new tokens/s"] == ("5,800", False)
    assert got["phi-2: generate none-own, B = 64: ≥ 6,000 new tokens/s"] == ("9,000", True)
    assert got["phi-2: generate none-own, B = 64: ≥ 2.2× hf-generate"] == ("9.00×", True)
    assert not [target for target in got if target.startswith("phi-3")]  # the targets are phi-2's; phi-3: a table
    assert ("* phi-2 none-own: 3 of 4 rows identical, 90.0 % of tokens; 2 rows identical to the fast path's"
            in summarize.markdown(lines))
    assert "| phi-3 | none | 64 | 3,000 |" in summarize.markdown(lines)
    # the own loop over the whole static cache is the A/B for its KV buckets: shown in the table, never judged
    assert "| phi-2 | none-own-full | 64 | 7,500 | 8.53 | 7.50× |" in summarize.markdown(lines)
    assert not [target for target in got if "own-full" in target]
    # so is the own loop compiled once per shape and bucket, the A/B for symbolic shapes; its warm-up is shown
    assert "| phi-2 | none-own-static | 64 | 9,100 | 7.03 | 9.10× | 81.2 |" in summarize.markdown(lines)
    assert not [target for target in got if "own-static" in target]


def test_errors_are_listed_and_an_unknown_run_is_refused(tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in [
        _train("pt", 100.0, 13.0, 0.0),
        {"bench": "train", "model": "m", "method": "fft", "batch_size": 8, "error": "fft: OutOfMemoryError: CUDA",
         "run_id": "x"}]) + "\n")
    assert "* train m fft: fft: OutOfMemoryError: CUDA" in summarize.main(["--results", str(path)])
    with pytest.raises(SystemExit):
        summarize.main(["--results", str(path), "--runs", "nope"])
    assert "no result lines with run ids nope" in capsys.readouterr().err


def test_lines_of_several_machines_are_refused_without_runs(capsys):
    with pytest.raises(SystemExit):
        summarize.main(["--results", str(RESULTS)])  # the committed file holds CPU, H200 and H100 runs
    err = capsys.readouterr().err
    assert "several machines" in err and "NVIDIA H100 80GB HBM3: gpu-20261126T181908, gpu-20261126T182538" in err


@pytest.mark.parametrize("variant, name", [([], "lopa"), (["--eager_encoder"], "lopa+eager_encoder"),
                                           (["--encoder_graphs"], "lopa+encoder_graphs"),
                                           (["--compile_mode", "reduce-overhead"], "lopa+reduce-overhead")])
def test_a_failed_encoder_variant_is_listed_under_its_own_name(tmp_path, monkeypatch, variant, name):
    """A failed bench_train line names the variant asked for, so an error of the CUDA-graph A/B never reads as the
    default lopa failing."""
    from benchmarks import bench_train

    def fail(method, args, writer):
        raise RuntimeError("capture failed")

    monkeypatch.setattr(bench_train, "bench_method", fail)
    out = tmp_path / "results.jsonl"
    with pytest.raises(SystemExit):
        bench_train.main(["--model", "m", "--methods", "lopa", "--results", str(out), *variant])
    text = summarize.markdown(summarize.load(out, None))
    assert f"* train m {name}: lopa: RuntimeError: capture failed" in text, text
