"""bench_train's attribution figures (the pure parts; the profiler itself runs on CUDA only) and its teardown."""
import json
import weakref
from types import SimpleNamespace

import pytest
import torch

from benchmarks import bench_train
from benchmarks.profile_step import device_kernels, kernel_summary
from utils.fast_paths import compile_layers, decoder_layers


def test_kernel_summary_gives_busy_fraction_and_per_step_top_kernels():
    long_name = "ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_32x5_tn_" + "x" * 40
    kernels = [(long_name, 3000.0), ("softmax", 500.0), (long_name, 3000.0), ("Memcpy HtoD", 250.0),
               ("softmax", 500.0), ("add", 100.0), ("mul", 50.0), ("neg", 10.0)]
    out = kernel_summary(kernels, wall_seconds=0.02, steps=2, top=3)
    assert out["gpu_busy_fraction"] == pytest.approx(7410 / 20000)
    assert out["top_kernels"] == [[long_name[:60], pytest.approx(3.0)], ["softmax", pytest.approx(0.5)],
                                  ["Memcpy HtoD", pytest.approx(0.125)]]
    assert out["kernels_per_step"] == 4.0  # 8 device events over 2 steps


def test_device_kernels_counts_device_events_but_not_host_ops_or_annotation_ranges():
    cuda, cpu = torch.profiler.DeviceType.CUDA, torch.profiler.DeviceType.CPU
    events = [SimpleNamespace(name="gemm", device_type=cuda, is_user_annotation=False, device_time_total=40.0),
              SimpleNamespace(name="aten::mm", device_type=cpu, is_user_annotation=False, device_time_total=40.0),
              SimpleNamespace(name="CompiledFunction", device_type=cuda, is_user_annotation=True,
                              device_time_total=90.0),
              SimpleNamespace(name="Memset (Device)", device_type=cuda, is_user_annotation=False,
                              device_time_total=2.5)]
    assert device_kernels(SimpleNamespace(events=lambda: events)) == [("gemm", 40.0), ("Memset (Device)", 2.5)]
    renamed = [SimpleNamespace(name="gemm", device_type=cuda)]  # no duration attribute under any known name
    with pytest.raises(AttributeError, match="device_time_total"):
        device_kernels(SimpleNamespace(events=lambda: renamed))


def test_bench_train_frees_a_compiled_method_before_building_the_next(tmp_path, monkeypatch):
    """dynamo's caches hold compiled decoder layers, themselves in reference cycles, until torch.compiler.reset():
    a collection before the reset left them alive through the next method (on the GPU, its peak memory)."""
    held, layer_refs, alive_at_build = [], [], []  # ``held`` plays dynamo's caches (the CPU ones let go earlier)
    real_reset, real_build = torch.compiler.reset, bench_train.build

    def reset():
        held.clear()
        real_reset()

    def compile_held(lm):
        compile_layers(lm, backend="eager")
        held.extend(decoder_layers(lm))
        layer_refs.extend(weakref.ref(layer) for layer in decoder_layers(lm))

    def build(method, args):
        alive_at_build.append(sum(ref() is not None for ref in layer_refs))
        return real_build(method, args)

    monkeypatch.setattr(torch.compiler, "reset", reset)
    monkeypatch.setattr(bench_train, "compile_layers", compile_held)
    monkeypatch.setattr(bench_train, "build", build)
    out = tmp_path / "r.jsonl"
    bench_train.main(["--model", "tiny-phi-2", "--encoder", "tiny-roberta", "--methods", "pt,lora,peft-pt",
                      "--batch_size", "2", "--seq_len", "32", "--m", "4", "--dtype", "fp32", "--steps", "1",
                      "--warmup", "1", "--results", str(out)])
    assert len(layer_refs) == 4 and alive_at_build == [0, 0, 0]  # tiny-phi-2: 2 layers, pt and lora compiled
    lines = {line["method"]: line for line in map(json.loads, out.read_text().splitlines())}
    for method, line in lines.items():
        assert line["ms_per_step"] > 0 and line["dynamo_graph_breaks"] >= 0
        cuda_only = ("allocated_before_gib", "gpu_busy_fraction", "top_kernels", "host_ms_per_step",
                     "profiled_ms_per_step")
        assert all(line[k] is None for k in cuda_only), line
    # one shared layer frame per compiled method (more: recompilations); the eager baseline compiles nothing
    assert lines["pt"]["dynamo_frames_compiled"] >= 1 and lines["lora"]["dynamo_frames_compiled"] >= 1
    assert lines["peft-pt"]["dynamo_frames_compiled"] == 0
