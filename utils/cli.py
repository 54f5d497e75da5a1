"""Argument groups the scripts share, and parsing helpers. Scripts stay thin: parse, check, call, report."""
from __future__ import annotations

import argparse
import datetime
import os
import pathlib

from utils.errors import UserError
from utils.fileio import check_writable_dir
from utils.registry import ENCODERS, FOUNDATION_MODELS, TASKS


def str2bool(value: str | bool) -> bool:
    """A real boolean for ``--flag True|False`` (never ``type=bool``, for which "False" is true)."""
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False), got {value!r}")


def positive_int(value: str) -> int:
    """An integer >= 1, checked at parse time (so run_experiment's argument check sees it too)."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every argument's default in --help, unless its help says it in words (a default that depends), or
    there is none to show (None: not given; False: a switch that is off)."""

    def _get_help_string(self, action):
        if "(default" in (action.help or "") or action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


OTHER_NAMES = {"--out": ("--log_dir",), "--log_dir": ("--out",), "--output_dir": ("--log_dir", "--out"),
               "--learning_rate": ("--lr",), "--num_train_epochs": ("--num_epochs",), "--epochs": ("--num_epochs",)}
"""Flags a user may bring from the other scripts here (run_experiment.py's --out is the stages' --log_dir) or from
Hugging Face's Trainer, with the names meant in this project."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors follow the project's one-line ``error:`` form and exit with status 2, and which takes
    no abbreviations: ``--limit 3`` was read as tune_foundation_model.py's ``--limit_train_examples 3``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        if message.startswith("unrecognized arguments: "):  # an abbreviation, say: name the flags it begins
            given = [a.split("=")[0] for a in message.split()[2:] if a.startswith("--")]
            options = [o for o in self._option_string_actions if o.startswith("--")]
            meant = [o for a in given for o in options if o.startswith(a)]
            if meant:
                message += f"; flags are not abbreviated: spell out {' or '.join(meant)}"
            else:  # another script's name for the same setting: --dtype here, --model_dtype there, or the reverse
                alike = [o for a in given for o in options if o.endswith("_" + a[2:]) or a.endswith("_" + o[2:])
                         or o in OTHER_NAMES.get(a, ())]
                if alike:
                    message += f"; did you mean {' or '.join(alike)}?"
        self.exit(2, f"error: {message}\n")


def add_model_args(parser: argparse.ArgumentParser, *, require_task: bool = True) -> None:
    g = parser.add_argument_group("model and data")
    g.add_argument("--task_name", required=require_task, choices=TASKS, metavar="TASK",
                   help=f"one of: {', '.join(TASKS)}")
    g.add_argument("--model_type", required=True, metavar="MODEL",
                   help=f"foundation model, one of: {', '.join(FOUNDATION_MODELS)}")
    g.add_argument("--model_path", default=None, help="local Hugging Face model directory used instead of the hub id")
    g.add_argument("--enc_model_type", default="codesage-small", metavar="ENCODER",
                   help=f"encoder for lopa/idpg, one of: {', '.join(ENCODERS)}")
    g.add_argument("--enc_model_path", default=None, help="local encoder directory used instead of the hub id")
    g.add_argument("--data_path", default=None,
                   help="local JSONL of the task; None: ../shared/data when present, else the public source "
                        "(downloaded and cached)")
    g.add_argument("--mbpp_split", default="paper", choices=("paper", "standard"),
                   help="paper: MBPP/1-487 train, 488-974 test; standard: 601-974 train, 11-510 test")
    g.add_argument("--num_virtual_tokens", type=int, default=10, help="m, soft-prompt length (pt/idpg/lopa)")
    g.add_argument("--lp_rank", type=int, default=1, help="r, LOPA rank")
    g.add_argument("--seed", type=int, default=9876, help="global seed")
    g.add_argument("--log_dir", default=None, help="output directory; None: ./logging/<YYYYmmdd-HHMMSS>")


def check_mbpp_split(task_name: str | None, mbpp_split: str) -> None:
    """``--mbpp_split`` picks MBPP's tasks: with another task it would do nothing, yet config.json would record it
    (and run_experiment's hashes would count it)."""
    if task_name not in (None, "mbpp") and mbpp_split != "paper":
        raise UserError(f"--mbpp_split {mbpp_split} is for --task_name mbpp; {task_name} has one split: drop it")


def check_model_args(args: argparse.Namespace) -> None:
    """Reject unknown names and impossible values before anything heavy loads."""
    from utils.registry import get_encoder_spec, get_model_spec

    get_model_spec(args.model_type)
    if getattr(args, "enc_model_type", None):
        get_encoder_spec(args.enc_model_type)
    for flag in ("num_virtual_tokens", "lp_rank"):
        if getattr(args, flag, 1) < 1:
            raise UserError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    for flag in ("data_path",):
        path = getattr(args, flag, None)
        if path is not None and os.path.isdir(path):
            raise UserError(f"--{flag} {path}: a directory; pass the task's .jsonl file in it")
        if path is not None and not os.path.isfile(path):
            raise UserError(f"--{flag} {path}: no such file")
    for flag in ("model_path", "enc_model_path"):
        path = getattr(args, flag, None)
        if path is not None and not os.path.isdir(path):
            raise UserError(f"--{flag} {path}: not a directory")
        if path is not None and not os.path.isfile(os.path.join(path, "config.json")):
            raise UserError(f"--{flag} {path}: no config.json, so not a Hugging Face model directory; pass a "
                            f"directory written by save_pretrained (or a hub snapshot)")
    check_mbpp_split(getattr(args, "task_name", None), getattr(args, "mbpp_split", "paper"))
    check_log_dir(getattr(args, "log_dir", None))


def check_log_dir(log_dir: str | None) -> None:
    """An existing --log_dir must be a directory (a missing one is created later)."""
    if log_dir is not None and os.path.exists(log_dir) and not os.path.isdir(log_dir):
        raise UserError(f"--log_dir {log_dir}: exists and is not a directory; pass a directory path "
                        f"(it is created when missing)")
    if log_dir is not None:
        check_writable_dir(log_dir, "--log_dir")


_DEFAULT_LOG_DIRS: dict[str, tuple[str, int]] = {}
"""The names ``default_log_dir`` gave in this process: ``{path: (timestamp path, suffix number)}``."""


def default_log_dir() -> str:
    """``logging/<YYYYmmdd-HHMMSS>``, with ``-2``, ``-3``, ... when a run started in the same second has it. The
    name is not taken until ``make_log_dir`` creates it."""
    base = os.path.join("logging", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    path, n = base, 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}"
    _DEFAULT_LOG_DIRS[path] = (base, n)
    return path


def make_log_dir(path: str | os.PathLike) -> pathlib.Path:
    """Create the log directory ``path`` (and its parents) and return it. A name ``default_log_dir`` picked that
    another run has created since (runs started in the same second, as a shell loop with ``&`` starts them) is
    not shared: this run takes the next free ``-N`` instead, and returns that."""
    path = pathlib.Path(path)
    if str(path) not in _DEFAULT_LOG_DIRS:
        path.mkdir(parents=True, exist_ok=True)
        return path
    base, n = _DEFAULT_LOG_DIRS[str(path)]
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            path.mkdir()  # atomic: of two runs, one creates it and the other moves on
            return path
        except FileExistsError:
            n += 1
            path = pathlib.Path(f"{base}-{n}")
