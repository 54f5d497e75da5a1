"""From data to the results table: train → generate → post-process → evaluate for a grid of methods × tasks ×
models, then results.md (the paper's table layout), results.png and loss_curves.png in --out.

    python run_experiment.py --preset smoke                       # tiny models on the CPU, a minute or two
    python run_experiment.py --preset paper-phi-2 --out runs/phi2  # the paper's phi-2 settings, on a GPU
    python run_experiment.py --preset paper-phi-3 --out runs/phi3  # likewise for each model of the paper's table
    python run_experiment.py --preset paper --out runs/paper       # all six: the paper's whole table, one results.md
    python run_experiment.py --preset smoke --set lopa.lp_rank=2   # redoes only the cells this changes

A cell is skipped when it has a stored result for the same commands and data file content; the code version is
NOT part of that check: after changing the code, rerun with --force (results.md lists each cell's git commit, and
a kept cell from another commit is flagged). A cell that fails leaves no result: the other cells still run, the
failure (command, error, cells/<model>/<task>/<method>/cell.log) is printed and listed in results.md, and the exit
status is 1. A cell interrupted by Ctrl-C, SIGTERM or a kill leaves no result either (after Ctrl-C or SIGTERM,
results.md still shows the cells finished before it). The next run redoes both. Runs may share --out (one per
GPU): each cell runs under its own lock, and a run skips the cells another is running. See README.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time

from utils.cli import ArgumentParser
from utils.errors import UserError, cli_entry, on_interrupt
from utils.fileio import check_writable_dir
from utils.registry import METHODS, TASKS


def parse_args(argv=None) -> argparse.Namespace:
    from utils.presets import PRESET_GROUPS, PRESETS

    p = ArgumentParser(description=__doc__)
    p.add_argument("--preset", required=True, choices=sorted(PRESETS) + sorted(PRESET_GROUPS),
                   help="a preset, or a group of them (paper: every paper-<model>, one results.md)")
    p.add_argument("--out", default=None, help="experiment directory (default: runs/<preset>)")
    p.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--tasks", default=None, help=f"comma-separated subset of {','.join(TASKS)}")
    p.add_argument("--models", default=None, help="comma-separated model types (default: the preset's)")
    p.add_argument("--mbpp_data", default=None, help="MBPP JSONL (default: ../shared/data copy, else public source)")
    p.add_argument("--cruxeval_data", default=None, help="CRUXEval JSONL (default: as --mbpp_data)")
    p.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                   help="override a stage argument: train.lr=1e-3, lopa.lp_rank=2, gen.batch_size=8, eval.timeout=5; "
                        "seed=N (training and generation), model_path=DIR (every stage's base model), "
                        "mbpp_split=NAME (every stage's)")
    p.add_argument("--plan", action="store_true",
                   help="list the selected cells (stored, or to run) and their commands after checking every stage's "
                        "arguments and data files; run nothing and write no cell or report (smoke may write its "
                        "fixture data)")
    p.add_argument("--force", action="store_true",
                   help="redo the selected cells even if they have a result (needed after a code change: the "
                        "cache compares commands and data, not code)")
    return p.parse_args(argv)


def _subset(value: str | None, allowed, default: list[str], what: str) -> list[str]:
    if value is None:
        return default
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in chosen if allowed is not None and v not in allowed]
    if allowed is None and not chosen:  # a single preset's --models takes any model type: no choices to list
        raise UserError(f"--{what} {value!r}: name at least one model type")
    if bad or not chosen:
        raise UserError(f"--{what} {value!r}: choose from {', '.join(allowed)}")
    return chosen


@cli_entry
def main(argv=None) -> dict:
    args = parse_args(argv)
    from utils.presets import PRESET_GROUPS, PRESETS, apply_overrides

    names = PRESET_GROUPS.get(args.preset, [args.preset])
    presets = [apply_overrides(PRESETS[name](), args.set or []) for name in names]
    if len(presets) > 1:  # a group's --models names its members' models
        members = [m for p in presets for m in p.models]
        _subset(args.models, members, members, "models")
    grids = [_select(args, preset, group=len(presets) > 1) for preset in presets]
    if not any(p.models and p.methods and p.tasks for p in presets):  # only a group's narrowing can empty it
        raise UserError(f"--preset {args.preset}: no member preset has the selected models, methods and tasks "
                        f"together; a single preset runs what it does not list (--preset paper-phi-3 --methods fft)")
    presets = _local_model_path(args.set or [], names, presets)
    out = pathlib.Path(args.out or f"runs/{args.preset}").resolve()
    if out.exists() and not out.is_dir():  # (--plan too: its checks of each cell would blame the preset)
        raise UserError(f"--out {out}: a file, not a directory; pass a directory")
    if not args.plan:
        check_writable_dir(out, "--out")
        out.mkdir(parents=True, exist_ok=True)
    return _run(args, presets, grids, out)


def _local_model_path(overrides: list[str], names: list[str], presets: list) -> list:
    """``--set [section.]model_path=DIR`` holds one model's weights: refused when several models are selected (each
    would be tuned on DIR and reported under its own name). A group's members left without a selected model are
    rebuilt without it: DIR is no setting of their cells, whose stored results the report shows."""
    from utils.presets import PRESETS, apply_overrides

    models = list(dict.fromkeys(m for p in presets for m in p.models))
    local = [item for item in overrides if item.partition("=")[0].rpartition(".")[2] == "model_path"]
    if local and len(models) > 1:
        raise UserError(f"--set {local[0]!r}: every selected model ({', '.join(models)}) would load that directory "
                        f"and be tuned and reported under its own name; select the model it holds with --models")
    if not local or len(presets) == 1:
        return presets
    others = [item for item in overrides if item not in local]
    return [p if p.models else dataclasses.replace(apply_overrides(PRESETS[name](), others), models=[],
                                                   methods=p.methods, tasks=p.tasks) for name, p in zip(names, presets)]


def _select(args, preset, group: bool) -> dict:
    """Apply --methods/--tasks/--models to ``preset``; return its grid before them. A single preset may be told to
    run what it does not list (a tiny stand-in model, FFT where the paper has none); a group's members are only
    narrowed (one left without models runs nothing; its stored cells are still shown)."""
    full = {"methods": preset.methods, "tasks": preset.tasks, "models": preset.models}
    if group:
        everything = {"methods": METHODS, "tasks": TASKS, "models": None}
        for what, allowed in everything.items():
            chosen = _subset(getattr(args, what), allowed, full[what], what)
            setattr(preset, what, [v for v in full[what] if v in chosen])
        return full
    preset.methods = _subset(args.methods, METHODS, preset.methods, "methods")
    preset.tasks = _subset(args.tasks, TASKS, preset.tasks, "tasks")
    preset.models = _subset(args.models, None, preset.models, "models")
    # the report shows the preset's grid and whatever was selected outside it (say --models tiny-phi-2)
    return {k: list(dict.fromkeys(v + getattr(preset, k))) for k, v in full.items()}


def _run(args, presets: list, grids: list[dict], out: pathlib.Path) -> dict:
    from utils import fixtures
    from utils.experiment import stored_result
    from utils.experiment_plan import check_commands, plan_cells, uncached_hub_models
    from utils.experiment_report import plot_loss_curves, plot_table, write_results_md

    if len({p.seed for p in presets}) > 1:
        raise UserError(f"preset group {args.preset!r} mixes seeds; run its presets one by one")
    for preset in presets:
        for family, path in (("mbpp", args.mbpp_data), ("cruxeval", args.cruxeval_data)):
            if path:
                preset.data[family] = str(pathlib.Path(path).resolve())
        if preset.name == "smoke":  # without ../shared/data the smoke run uses the project's own fixture files
            from utils.data import default_data_path

            if not (preset.data.get("mbpp") or default_data_path("mbpp")):
                preset.data.update(fixtures.write_fixture_data(out / "fixture_data"))
    cells = [cell for preset in presets for cell in plan_cells(preset, out)]
    check_commands(cells)
    for line in uncached_hub_models(cells):  # a warning: the plan and --set may be what is being prepared
        print(f"warning: {line}", file=sys.stderr)
    if args.plan:
        return _print_plan(cells, args.force)
    results, ran, failed, busy = {}, [], {}, []

    def report() -> pathlib.Path:
        # The report covers the presets' whole grids: cells outside --methods/--tasks/--models that an earlier run
        # stored with the same configuration are shown too, and so are those another run finished meanwhile.
        selected = {c.key for c in cells}
        shown = []
        for preset, grid in zip(presets, grids):
            for cell in plan_cells(dataclasses.replace(preset, **grid), out):
                stored = None if cell.key in results or cell.key in failed else stored_result(cell)
                if stored is not None:
                    results[cell.key] = stored
                if cell.key in selected or stored is not None:
                    shown.append(cell)
        table = write_results_md(out, args.preset, shown, results, failed)
        plot_table(out, shown, results)
        plot_loss_curves(out, shown)
        return table

    try:
        _run_cells(cells, presets[0].seed, args.force, results, ran, failed, busy)
    except BaseException:  # Ctrl-C, or a crash of the runner itself: report the cells finished so far
        try:
            print(f"stopped; the cells finished so far -> {report()}", file=sys.stderr, flush=True)
        except Exception as exc:  # the stop is what the user must see, not a second error
            print(f"warning: no report of the finished cells ({type(exc).__name__}: {exc})", file=sys.stderr)
        raise
    # every cell is done: stopped while writing the report, a rerun writes it and runs no cell again
    on_interrupt("every selected cell finished; rerun the same command to write results.md and the plots (it keeps "
                 "every cell)")
    table = report()
    kept = len(cells) - len(ran) - len(failed) - len(busy)
    print(f"{len(ran)} cells run, {kept} kept, {len(busy)} left to other runs, {len(failed)} failed -> {table}")
    for key, failure in failed.items():
        print(f"  FAILED {key}: {failure['reason']} (log: {failure['log']})")
    return {"ran": ran, "failed": failed, "busy": busy, "results": results, "results_md": str(table)}


def _print_plan(cells, force: bool) -> dict:
    from utils.experiment import planned_training, replaced_results, stored_result

    stored = [] if force else [c.key for c in cells if stored_result(c) is not None]
    trainings = {"fresh": 0, "resumed": 0, "reused": 0, "none": 0}
    replacing = 0
    for i, cell in enumerate(cells, 1):
        status = "stored, kept"
        if cell.key not in stored:
            training = planned_training(cell) if not force else "none" if cell.training_hash() is None else "fresh"
            trainings[training] += 1
            replaced = None if force else replaced_results(cell, training)
            replacing += replaced is not None
            status = "to run" + (f"; {replaced}" if replaced else {
                "reused": ", its finished training reused", "resumed": ", its training resumed"}.get(training, ""))
        print(f"[{i}/{len(cells)}] {cell.key}: {status}")
        for script, argv in cell.commands:
            print(f"    python {script} {' '.join(argv)}")
    to_train = trainings["fresh"] + trainings["resumed"]
    reuse = f", {trainings['reused']} reusing a finished one" if trainings["reused"] else ""
    print(f"{len(cells)} cells: {len(stored)} stored, {len(cells) - len(stored)} to run ({to_train} with a training "
          f"to run{reuse})")
    if replacing:
        print(f"{replacing} of them replace a stored result of other settings (a cell directory holds one): to keep "
              f"those, pass another --out")
    return {"planned": [c.key for c in cells], "stored": stored, "ran": [], "failed": {}, "results": {}}


def _run_cells(cells, seed: int, force: bool, results: dict, ran: list[str], failed: dict,
               busy: list[str]) -> None:
    """Run the cells that have no stored result (all of them with ``force``), each under ``<cell>/.lock``: a cell
    that another run (sharing --out, say on another GPU) holds is left to it, and one it finished meanwhile is
    kept, also under ``force``. Fills in results, the keys run here, failures and the keys left to other runs as
    it goes (an interrupted run still reports the cells it finished)."""
    from utils.errors import stop_requested
    from utils.experiment import CellFailed, git_commit, replaced_results, run_cell, stored_result
    from utils.fileio import try_lock

    commit, started = git_commit(), time.time()

    def keep(cell, tag, stored):
        results[cell.key] = stored
        other = "" if stored["git_commit"] == commit else (
            f"; from commit {stored['git_commit'][:12]}, the code is now {commit[:12]}: --force to redo")
        print(f"{tag}: kept (pass@1 {100 * stored['pass@1']:.2f}{other})", flush=True)

    on_interrupt("rerun the same command: stored cells are kept, and the interrupted one goes on from its "
                 "training's last checkpoint (or its finished training), its finished generation batches and its "
                 "scored samples")
    for i, cell in enumerate(cells, 1):
        if (stop := stop_requested()) is not None:  # a Ctrl-C or SIGTERM Python swallowed inside a finalizer
            raise stop
        tag = f"[{i}/{len(cells)}] {cell.key}"
        stored = None if force else stored_result(cell)
        if stored is not None:
            keep(cell, tag, stored)
            continue
        cell.directory.mkdir(parents=True, exist_ok=True)
        lock, holder = try_lock(cell.directory)
        if lock is None:
            busy.append(cell.key)
            print(f"{tag}: another run (pid {holder}) is running it; left to that run", flush=True)
            continue
        with lock:
            stored = stored_result(cell, warn=False)  # finished by another run since this one started?
            result_file = cell.directory / "result.json"
            if stored is not None and (not force or result_file.stat().st_mtime >= started):
                keep(cell, tag, stored)
                continue
            replaced = None if force else replaced_results(cell)
            print(f"{tag}: running" + (f" ({replaced})" if replaced else ""), flush=True)
            try:
                results[cell.key] = run_cell(cell, seed, fresh=force)
            except CellFailed as exc:  # the other cells still run; this one is redone next time
                failed[cell.key] = {"script": exc.script, "command": exc.command, "reason": exc.reason,
                                    "log": str(exc.log)}
                print(f"{tag}: FAILED in {exc.script}: {exc.reason}\n  command: {exc.command}\n  log: {exc.log}",
                      file=sys.stderr, flush=True)
            if cell.key in failed:
                # A failed stage's frames held its models until the exception was handled, after the stage's
                # own release; a failed cell (an OOM) must not starve the next. A finished one was released.
                _release_memory()
                continue
        ran.append(cell.key)
        print(f"{tag}: pass@1 {100 * results[cell.key]['pass@1']:.2f} ({results[cell.key]['seconds']} s)",
              flush=True)


def _release_memory() -> None:
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(1 if main()["failed"] else 0)
