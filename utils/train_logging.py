"""What a person follows during training: a text log, ``metrics.jsonl``, a progress bar, wandb, a loss plot.

Only the main process writes. ``metrics.jsonl`` has one JSON object per logged optimizer step:
``step, epoch (1-based), loss, lr, tokens (cumulative, all processes), tokens_per_s, elapsed (s)`` and
``grad_norm`` when known; on a CUDA device also ``gpu_mem_gib`` and ``gpu_peak_mem_gib`` (``gpu_memory``). On resume,
lines past the checkpoint's step are dropped (they are re-done).
wandb and matplotlib are imported only when used (the GPU image may lack them).
"""
from __future__ import annotations

import json
import logging
import pathlib
import sys

from utils.errors import is_disk_full
from utils.fileio import atomic_write_text, parse_appended_lines

LOGGER_NAME = "lopa.train"
METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"


class _LogFile(logging.FileHandler):
    def handleError(self, record):
        if not is_disk_full(sys.exc_info()[1]):  # the console still shows the line; the run's next write stops it
            super().handleError(record)


class _Console(logging.StreamHandler):
    """stderr through ``tqdm.write``: a log line clears the progress bar, goes above it, and the bar is drawn again
    at its latest step (written straight to stderr, the line ran on from the bar's, and an epoch's mean could show
    beside the bar one step short)."""

    def emit(self, record):
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def setup_logging(log_dir: pathlib.Path | None, is_main: bool) -> logging.Logger:
    """INFO to stderr and ``log_dir/train.log`` on the main process; warnings only elsewhere."""
    logger = logging.getLogger(LOGGER_NAME)
    for old in list(logger.handlers):
        old.close()
        logger.removeHandler(old)
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    stream = _Console(sys.stderr)
    stream.setFormatter(fmt)
    logger.addHandler(stream)
    if is_main and log_dir is not None:
        handler = _LogFile(log_dir / "train.log")
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return logger


def gpu_memory(device) -> dict:
    """The GPU memory torch's allocator holds on ``device`` now (``gpu_mem_gib``) and at most so far
    (``gpu_peak_mem_gib``), in GiB: the memory the run takes from the card, its cached blocks and the CUDA graphs'
    private pools included (allocated-memory counters leave a graph's memory out once it is recorded). Read from the
    allocator's counters, without waiting for the GPU; empty off CUDA."""
    if device.type != "cuda":
        return {}
    import torch

    return {"gpu_mem_gib": round(torch.cuda.memory_reserved(device) / 2**30, 3),
            "gpu_peak_mem_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 3)}


def read_metrics(path: str | pathlib.Path) -> list[dict]:
    """The logged records; a torn last line (an append cut short by a full disk or a kill) is left out."""
    path = pathlib.Path(path)
    if not path.is_file():
        return []
    lines = [line for line in path.read_bytes().splitlines() if line.strip()]
    return parse_appended_lines(path, lines, lambda record: record, "not a JSON record; delete the line (or the file)")


class MetricsFile:
    """Append-only ``metrics.jsonl``; ``resume_at(step)`` first drops lines logged after that step."""

    def __init__(self, log_dir: pathlib.Path, enabled: bool):
        self.path = log_dir / METRICS_FILE
        self.enabled = enabled

    def resume_at(self, step: int) -> None:
        if not self.enabled or not self.path.is_file():
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        # atomic: a kill (or a full disk) mid-rewrite keeps the old file, whose later lines the next resume drops
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")


class ProgressBar:
    """tqdm over optimizer steps with loss, lr and tokens/s; silent off the main process."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def update(self, record: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def plot_loss(metrics_path: pathlib.Path, png_path: pathlib.Path, title: str) -> pathlib.Path | None:
    """Loss (and lr) per step as a PNG; None when matplotlib is missing or nothing was logged."""
    records = read_metrics(metrics_path)
    if not records:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logging.getLogger(LOGGER_NAME).warning("matplotlib is not installed: no %s", png_path.name)
        return None
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    marker = "o" if len(records) <= 20 else None  # a run of a step or two is still visible
    ax.plot(steps, [r["loss"] for r in records], lw=1, label="loss", marker=marker)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [r["lr"] for r in records], lw=1, color="tab:orange", alpha=0.6, label="lr", marker=marker)
    lr_ax.set_ylabel("learning rate")
    fig.tight_layout()
    try:
        fig.savefig(png_path, dpi=100)
    except OSError as exc:  # the trained weights are already saved: a missing plot must not fail the run
        if not is_disk_full(exc):
            raise
        png_path.unlink(missing_ok=True)  # a cut-off PNG
        logging.getLogger(LOGGER_NAME).warning("%s: not written: no space left on device", png_path)
        return None
    finally:
        plt.close(fig)
    return png_path


def flatten(config: dict, prefix: str = "") -> dict:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}`` (wandb config)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
