"""Where a training step's time goes: device busy fraction, top kernels, host issue time (CUDA only), and
dynamo's compile counters. It runs after the timed steps, and a failure here never loses their figures."""
from __future__ import annotations

import time
import traceback
from collections import defaultdict

import torch

PROFILED_STEPS = 3
TOP_KERNELS = 5
CUDA_FIGURES = ("gpu_busy_fraction", "top_kernels", "kernels_per_step", "host_ms_per_step", "profiled_ms_per_step")


def kernel_summary(kernels, wall_seconds: float, steps: int, top: int = TOP_KERNELS) -> dict:
    """``kernels``: ``(name, device µs)`` of every kernel, memcpy and memset of ``steps`` steps that took
    ``wall_seconds``. ``gpu_busy_fraction``: their summed device time over the wall time (work overlapping on
    two streams counts twice); ``top_kernels``: ``[name cut to 60 characters, ms per step]`` for the ``top``
    names with the most device time; ``kernels_per_step``: how many device events a step launched (each one is
    host work: ``host_ms_per_step`` over it is the host's time per launch where the host sets the pace)."""
    per_name: dict[str, float] = defaultdict(float)
    for name, us in kernels:
        per_name[name] += us
    ranked = sorted(per_name.items(), key=lambda kv: kv[1], reverse=True)[:top]
    return {"gpu_busy_fraction": sum(per_name.values()) / 1e6 / wall_seconds,
            "top_kernels": [[name[:60], us / 1e3 / steps] for name, us in ranked],
            "kernels_per_step": len(kernels) / steps}


def device_kernels(prof) -> list[tuple[str, float]]:
    """``(name, device µs)`` of the device-side events of a finished ``torch.profiler.profile``, leaving out the
    annotation ranges (``record_function``, compiled regions) that span kernels already counted."""
    out = []
    for evt in prof.events():
        if evt.device_type != torch.profiler.DeviceType.CUDA or getattr(evt, "is_user_annotation", False):
            continue
        us = getattr(evt, "device_time_total", None)  # torch < 2.4 called it cuda_time_total
        us = getattr(evt, "cuda_time_total", None) if us is None else us
        if us is None:
            raise AttributeError("profiler events carry neither device_time_total nor cuda_time_total")
        out.append((evt.name, us))
    return out


def spread(batches: list, steps: int) -> list:
    """``steps`` of ``batches`` spread evenly over the list (its first ones, repeated, when it is shorter): the
    profiled steps of a padding mode then see short and long batches alike, not only the first few."""
    return [batches[i * len(batches) // steps] for i in range(steps)]


def step_figures(step, batches, steps: int = PROFILED_STEPS) -> dict:
    """``CUDA_FIGURES`` over ``steps`` more steps (``spread`` over ``batches``): ``host_ms_per_step`` without any
    synchronize (a full launch queue also makes the host wait, so read it beside ``gpu_busy_fraction``), then the
    profiled steps (``profiled_ms_per_step`` beside the timed figure shows the profiler's own overhead).
    All None on the CPU; a figure whose measurement fails is None and the error is printed."""
    out = dict.fromkeys(CUDA_FIGURES)
    if not torch.cuda.is_available():
        return out
    profiled = spread(batches, steps)
    try:
        torch.cuda.synchronize()
        host = 0.0
        for batch in profiled:
            start = time.perf_counter()
            step(batch)
            host += time.perf_counter() - start
        torch.cuda.synchronize()
        out["host_ms_per_step"] = host * 1e3 / steps
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            torch.cuda.synchronize()
            start = time.perf_counter()
            for batch in profiled:
                step(batch)
            torch.cuda.synchronize()
            wall = time.perf_counter() - start
        kernels = device_kernels(prof)
        if not any(us for _, us in kernels):  # a busy fraction of 0 would read as an idle GPU
            raise RuntimeError("the profiler recorded no CUDA kernel time")
        out.update(kernel_summary(kernels, wall, steps), profiled_ms_per_step=wall * 1e3 / steps)
    except Exception:  # the timed figures matter more than their attribution
        traceback.print_exc()
        print("step profiling failed: its figures are written as None", flush=True)
    return out


def dynamo_counts() -> dict:
    """Running totals of dynamo's counters (never reset): subtract a snapshot for one method's figures.
    ``dynamo_frames_compiled`` counts every compilation of a Python frame: one shared decoder-layer frame with no
    graph break gives 1; each recompilation (a new shape or guard) and each frame resumed after a break adds 1.
    ``cudagraph_skips``: compiled graphs inductor ran without CUDA graphs under ``mode="reduce-overhead"``."""
    from torch._dynamo.utils import counters

    return {"dynamo_frames_compiled": counters["frames"]["total"],
            "dynamo_graph_breaks": sum(counters["graph_break"].values()),
            "dynamo_unique_graphs": counters["stats"]["unique_graphs"],
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}


def dynamo_delta(before: dict) -> dict:
    return {k: v - before[k] for k, v in dynamo_counts().items()}
