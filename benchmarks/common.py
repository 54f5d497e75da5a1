"""Shared pieces of the benchmark scripts: device and version stamps, result lines, timing, FLOP counts."""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import sys
import time
import uuid

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results.jsonl"
# Dense bf16 tensor-core peak used for MFU (H100 SXM and H200 share it).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark script's command line: its module docstring as help, and no abbreviated flags (as the project's
    scripts: ``utils.cli.ArgumentParser``)."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                   allow_abbrev=False)


def _torch():
    """torch if this process already imported it; the evaluation benchmark must not (its forks would slow)."""
    return sys.modules.get("torch")


def device_name() -> str:
    torch = _torch()
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cores, CPU only)"


def peak_flops() -> float | None:
    name = device_name()
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "accelerate"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


class ResultWriter:
    """Appends one JSON line per figure, stamped with device, versions, date and a run id."""

    def __init__(self, path: str | os.PathLike | None = None, run_id: str | None = None):
        self.path = pathlib.Path(path or RESULTS)
        self.run_id = run_id or os.environ.get("BENCH_RUN_ID") or uuid.uuid4().hex[:12]
        self.stamp = {"device": device_name(), "versions": versions(),
                      "date": datetime.date.today().isoformat(), "run_id": self.run_id}

    def write(self, bench: str, **figures) -> dict:
        line = {"bench": bench, **figures, **self.stamp}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps(line) + "\n")
        print(json.dumps({k: v for k, v in line.items() if k not in ("versions",)}), flush=True)
        return line


def sync() -> None:
    torch = _torch()
    if torch is not None and torch.cuda.is_available():
        torch.cuda.synchronize()


class Timer:
    def __enter__(self):
        sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync()
        self.seconds = time.perf_counter() - self.start


def matmul_params(lm) -> int:
    """Parameters that take part in matrix products per token: all but the input embedding table."""
    emb = lm.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in lm.parameters()) - emb


def train_flops_per_token(lm, seq_len: int, full_finetune: bool) -> float:
    """6N (weights trained) or 4N (frozen base: forward + input gradients) plus attention 12·L·d·T."""
    cfg = lm.config
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    width = getattr(cfg, "hidden_size", None) or cfg.n_embd
    return (6 if full_finetune else 4) * matmul_params(lm) + 12 * layers * width * seq_len
