"""results.md, the chart of the table and the loss curves of an experiment directory."""
from __future__ import annotations

import os
import pathlib

from utils.experiment import recorded_training_commits
from utils.experiment_plan import Cell
from utils.fileio import atomic_write_text
from utils.paper_results import CONFIRMED, paper_pass_at_1
from utils.train_logging import read_metrics

ROW_NAMES = {"none": "None", "fft": "FFT", "lora": "LoRA", "pt": "PT", "idpg": "IDPG", "lopa": "LOPA"}
COLUMN_NAMES = {"cruxeval_input_prediction": "CruxEval-I", "cruxeval_output_prediction": "CruxEval-O",
                "mbpp": "MBPP"}


def _fmt(value) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def write_results_md(out_dir: pathlib.Path, preset_name: str, cells: list[Cell], results: dict[str, dict],
                     failed: dict[str, dict] | None = None) -> pathlib.Path:
    """``failed``: cell key -> {script, reason, log, command} of the cells that failed in this run."""
    failed = failed or {}
    lines = [f"# Results: preset `{preset_name}`", "",
             "pass@1 (%) from the project's sandboxed evaluator. MBPP is scored on the stage-1 completions (cut at "
             "the first stop string); stage 2 (function body, final `return` trimmed) and both stages' mean (what the "
             "paper reports) are in the second table. "
             "Each cell's commands, seed and git commit are listed below the tables; a cell kept from an earlier "
             "run was not redone after code changes (the cache compares commands and data only).", ""]
    shown = [r for k, r in results.items() if any(c.key == k for c in cells)]
    commits = sorted({r["git_commit"] for r in shown} | {c for r in shown if r.get("training") != "fresh"
                                                          for c in recorded_training_commits(r) if c != "unrecorded"})
    if len(commits) > 1:
        lines += [f"**The cells come from {len(commits)} different commits** ({', '.join(f'`{c}`' for c in commits)}); "
                  "rerun with --force for a table from one code version.", ""]
    if failed:
        lines += [f"**{len(failed)} cell(s) failed** (`failed` below; see Provenance for the command and log).", ""]
    models = list(dict.fromkeys(c.model for c in cells))
    tasks = [t for t in COLUMN_NAMES if any(c.task == t for c in cells)]
    for model in models:
        methods = _methods(cells, model)
        lines += [f"## {model}", "", "| Tuning method | " + " | ".join(COLUMN_NAMES[t] for t in tasks) + " |",
                  "|---|" + "---:|" * len(tasks)]
        for method in methods:
            row = ["failed" if f"{model}/{t}/{method}" in failed else
                   _fmt(results.get(f"{model}/{t}/{method}", {}).get("pass@1")) for t in tasks]
            lines.append(f"| {ROW_NAMES[method]} | " + " | ".join(row) + " |")
        if "mbpp" in tasks:
            lines += ["", "| Tuning method | MBPP stage 1 | MBPP stage 2 | MBPP both stages |", "|---|---:|---:|---:|"]
            for method in methods:
                r = results.get(f"{model}/mbpp/{method}", {})
                lines.append(f"| {ROW_NAMES[method]} | {_fmt(r.get('pass@1'))} | {_fmt(r.get('mbpp_stage2_pass@1'))} "
                             f"| {_fmt(mbpp_both_stages(r))} |")
        lines += _against_the_paper(model, tasks, methods, results)
        lines += _training_cost(model, tasks, methods, results)
        lines.append("")
    lines += ["## Provenance", ""]
    for cell in cells:
        r = results.get(cell.key)
        if cell.key in failed:
            f = failed[cell.key]
            lines += [f"- `{cell.key}`: **failed** in {f['script']}: {f['reason']}; log `{f['log']}`",
                      f"  - `{f['command']}`"]
            continue
        if not r:
            lines.append(f"- `{cell.key}`: no result")
            continue
        trained = ""
        if r.get("training") in ("reused", "resumed"):  # weights (partly) from an earlier attempt's code
            how = "reused from an earlier attempt" if r["training"] == "reused" else "resumed"
            trained = f"; training {how} (commits {', '.join(f'`{c}`' for c in recorded_training_commits(r))})"
        lines.append(f"- `{cell.key}`: pass@1 {_fmt(r['pass@1'])} on {r['n_tasks']} tasks{_samples_each(r)}; "
                     f"seed {r['seed']}; commit `{r['git_commit']}`{trained}; {r['seconds']} s; "
                     f"finished {r['finished']}")
        lines += [f"  - `{c}`" for c in r["commands"]]
    path = out_dir / "results.md"
    atomic_write_text(path, "\n".join(lines) + "\n")  # runs sharing --out each write it when they end
    return path


def _samples_each(result: dict) -> str:
    """How many samples each task's pass@1 averages (``" (N samples each)"``), from a result that recorded it."""
    per_task = result.get("samples_per_task")
    if not per_task:
        return ""
    low, high = per_task["min"], per_task["max"]
    return f" ({low if low == high else f'{low} to {high}'} sample{'' if high == 1 else 's'} each)"


def _training_cost(model: str, tasks: list[str], methods: list[str], results: dict[str, dict]) -> list[str]:
    """Each trained cell's trainable parameters (millions, as the paper counts them), training time and, from a GPU,
    the most memory torch held: what the methods cost beside what they score. Cells from before these were recorded
    show a dash."""
    rows = []
    for method in methods:
        cells = [results.get(f"{model}/{t}/{method}", {}) for t in tasks]
        if not any("trainable_params" in r for r in cells):
            continue
        rows.append(f"| {ROW_NAMES[method]} | " + " | ".join(_cost(r) for r in cells) + " |")
    if not rows:
        return []
    return ["", "Training cost: trainable parameters; training time (steps and checkpoints); the most GPU memory torch "
                "held (GPU runs).", "", "| Tuning method | " + " | ".join(COLUMN_NAMES[t] for t in tasks) + " |",
            "|---|" + "---|" * len(tasks), *rows]


def _cost(result: dict) -> str:
    if result.get("trainable_params") is None:
        return "—"
    n, seconds = result["trainable_params"], result.get("train_seconds")
    parts = [f"{n / 1e6:,.2f} M" if n >= 1e6 else f"{n:,}"]  # millions as the paper counts; a PT prompt in full
    if seconds is not None:
        parts.append(_duration(seconds))
    if result.get("train_gpu_peak_gib") is not None:
        parts.append(f"{result['train_gpu_peak_gib']:.1f} GiB")
    return "; ".join(parts)


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"


def _panels(plt, n: int, width: float, height: float):
    """A figure of ``n`` panels of ``width`` x ``height`` inches, three to a row; returns it and the ``n`` axes."""
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    axes = axes.flatten()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n])


def _save(fig, path: pathlib.Path, dpi: int) -> None:
    """Write the figure whole or not at all (runs sharing --out each draw it when they end)."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(fig)


def _colour(method: str) -> str:
    """One colour per method in every panel of results.png and loss_curves.png."""
    return f"C{list(ROW_NAMES).index(method)}"


def _methods(cells: list[Cell], model: str) -> list[str]:
    """The table's rows for ``model``: the methods it has cells for, in the paper's order."""
    return [m for m in ROW_NAMES if any(c.model == model and c.method == m for c in cells)]


def _against_the_paper(model: str, tasks: list[str], methods: list[str], results: dict[str, dict]) -> list[str]:
    """The paper's pass@1 and ours minus it, for the rows the paper reports (none for tiny models)."""
    rows = []
    for method in methods:
        paper = [paper_pass_at_1(model, t, method) for t in tasks]
        if all(p is None for p in paper):
            continue
        ours = [_as_the_paper_scored(t, results.get(f"{model}/{t}/{method}", {})) for t in tasks]
        rows.append(f"| {ROW_NAMES[method]} | " + " | ".join(
            "—" if p is None else f"{p:.2f} / " + ("—" if o is None else f"{100 * o - p:+.2f}")
            for p, o in zip(paper, ours)) + " |")
    if not rows:
        return []
    source = ("the README's table" if model == "phi-2" else "the authors' numbers" +
              ("" if model in CONFIRMED else ", in a column whose model is inferred from model size"))
    mbpp = " MBPP: ours is both stages' mean, as the paper scored it (docs/EVALUATION.md)." if "mbpp" in tasks else ""
    return ["", f"Against the paper ({source}; utils/paper_results.py): paper pass@1 (%) / ours − paper.{mbpp}", "",
            "| Tuning method | " + " | ".join(COLUMN_NAMES[t] for t in tasks) + " |", "|---|" + "---:|" * len(tasks),
            *rows]


def mbpp_both_stages(result: dict) -> float | None:
    """Pass@1 of the original's interleaved ``mbxp_solutions_post_processed.json`` (each task's stage-1 and stage-2
    completions as two samples): the mean of the two stages."""
    one, two = result.get("pass@1"), result.get("mbpp_stage2_pass@1")
    return None if one is None or two is None else (one + two) / 2


def _as_the_paper_scored(task: str, result: dict) -> float | None:
    return mbpp_both_stages(result) if task == "mbpp" else result.get("pass@1")


def plot_table(out_dir: pathlib.Path, cells: list[Cell], results: dict[str, dict]) -> pathlib.Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(c.model for c in cells))
    tasks = [t for t in COLUMN_NAMES if any(c.task == t for c in cells)]
    fig, axes = _panels(plt, len(models), 2 + 2.2 * len(tasks), 4)  # the paper's six models: two rows of three
    for ax, model in zip(axes, models):
        methods = _methods(cells, model)
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            scores = [_as_the_paper_scored(t, results.get(f"{model}/{t}/{method}", {})) for t in tasks]
            xs = [j + i * width for j in range(len(tasks))]
            ax.bar(xs, [100 * (v or 0) for v in scores], width, label=ROW_NAMES[method], color=_colour(method))
            for x in (x for x, v in zip(xs, scores) if v is None):  # failed or not run: not a score of 0
                ax.text(x, 0, "n/a", rotation=90, ha="center", va="bottom", fontsize="x-small", color="grey")
            paper = [(j + i * width, v) for j, t in enumerate(tasks)
                     if (v := paper_pass_at_1(model, t, method)) is not None]
            if paper:  # the paper's value as a black bar-wide tick over ours
                ax.scatter(*zip(*paper), marker="_", s=(72 * width * 2) ** 2 / 4, color="black", zorder=3,
                           label="paper" if not any(h.get_label() == "paper" for h in ax.collections) else None)
        ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(tasks))])
        ax.set_xticklabels([COLUMN_NAMES[t] + (" (both stages)" if t == "mbpp" else "") for t in tasks])
        ax.set_ylabel("pass@1 (%)")
        ax.set_ylim(bottom=0)  # all-zero scores (a smoke run) would otherwise centre the axis on 0
        ax.set_title(model)
    max(axes, key=lambda ax: len(ax.get_legend_handles_labels()[1])).legend(fontsize="small")
    fig.tight_layout()
    path = out_dir / "results.png"
    _save(fig, path, dpi=120)
    return path


def plot_loss_curves(out_dir: pathlib.Path, cells: list[Cell]) -> pathlib.Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}
    for cell in cells:
        metrics = cell.directory / "train" / "metrics.jsonl"
        if metrics.is_file():
            rows = [r for r in read_metrics(metrics) if "loss" in r and "step" in r]
            if rows:
                curves.setdefault((cell.model, cell.task), {})[cell.method] = rows
    if not curves:
        return None
    fig, axes = _panels(plt, len(curves), 4.5, 3.5)  # a model's three tasks per row
    for ax, ((model, task), by_method) in zip(axes, curves.items()):  # in the cells' (the table's) order
        for method, rows in by_method.items():
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=ROW_NAMES[method],
                    color=_colour(method),
                    marker="o" if len(rows) <= 20 else None)  # a run of a step or two is still visible
        ax.set_title(f"{model} / {COLUMN_NAMES[task]}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax.legend(fontsize="small")
    fig.tight_layout()
    path = out_dir / "loss_curves.png"
    _save(fig, path, dpi=110)
    return path
