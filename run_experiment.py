"""From data to the results table: train → generate → post-process → evaluate for a grid of methods × tasks ×
models, then results.md (the paper's table layout), results.png and loss_curves.png in --out.

    python run_experiment.py --preset smoke                       # tiny models on the CPU, about a minute
    python run_experiment.py --preset paper-phi-2 --out runs/phi2  # the paper's phi-2 settings, on a GPU
    python run_experiment.py --preset smoke --set lopa.lp_rank=2   # redoes only the cells this changes

A cell with a stored result for the same settings is skipped unless --force. See README.md.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

from utils.errors import UserError, cli_entry
from utils.registry import METHODS, TASKS


def parse_args(argv=None) -> argparse.Namespace:
    from utils.experiment import PRESETS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--out", default=None, help="experiment directory (default: runs/<preset>)")
    p.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--tasks", default=None, help=f"comma-separated subset of {','.join(TASKS)}")
    p.add_argument("--models", default=None, help="comma-separated model types (default: the preset's)")
    p.add_argument("--mbpp_data", default=None, help="MBPP JSONL (default: ../shared/data copy, else public source)")
    p.add_argument("--cruxeval_data", default=None, help="CRUXEval JSONL (default: as --mbpp_data)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a stage argument: train.lr=1e-3, lopa.lp_rank=2, gen.batch_size=8, eval.timeout=5")
    p.add_argument("--force", action="store_true", help="redo cells that already have a result")
    return p.parse_args(argv)


def _subset(value: str | None, allowed, default: list[str], what: str) -> list[str]:
    if value is None:
        return default
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in chosen if allowed is not None and v not in allowed]
    if bad or not chosen:
        raise UserError(f"--{what} {value!r}: choose from {', '.join(allowed)}")
    return chosen


@cli_entry
def main(argv=None) -> dict:
    args = parse_args(argv)
    from utils import fixtures
    from utils.experiment import PRESETS, apply_overrides, plan_cells, run_cell, stored_result
    from utils.experiment_report import plot_loss_curves, plot_table, write_results_md

    preset = apply_overrides(PRESETS[args.preset](), args.set)
    preset.methods = _subset(args.methods, METHODS, preset.methods, "methods")
    preset.tasks = _subset(args.tasks, TASKS, preset.tasks, "tasks")
    preset.models = _subset(args.models, None, preset.models, "models")
    out = pathlib.Path(args.out or f"runs/{args.preset}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    for family, path in (("mbpp", args.mbpp_data), ("cruxeval", args.cruxeval_data)):
        if path:
            preset.data[family] = str(pathlib.Path(path).resolve())
    if args.preset == "smoke":  # without ../shared/data the smoke run uses the project's own fixture files
        from utils.data import default_data_path

        if not (preset.data.get("mbpp") or default_data_path("mbpp")):
            preset.data.update(fixtures.write_fixture_data(out / "fixture_data"))
    cells = plan_cells(preset, out)
    results, ran = {}, []
    for i, cell in enumerate(cells, 1):
        stored = None if args.force else stored_result(cell)
        if stored is not None:
            results[cell.key] = stored
            print(f"[{i}/{len(cells)}] {cell.key}: kept (pass@1 {100 * stored['pass@1']:.2f})", flush=True)
            continue
        print(f"[{i}/{len(cells)}] {cell.key}: running", flush=True)
        results[cell.key] = run_cell(cell, preset.seed)
        ran.append(cell.key)
        print(f"[{i}/{len(cells)}] {cell.key}: pass@1 {100 * results[cell.key]['pass@1']:.2f} "
              f"({results[cell.key]['seconds']} s)", flush=True)
    table = write_results_md(out, preset.name, cells, results)
    plot_table(out, cells, results)
    plot_loss_curves(out, cells)
    print(f"{len(ran)} cells run, {len(cells) - len(ran)} kept -> {table}")
    return {"ran": ran, "results": results, "results_md": str(table)}


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
