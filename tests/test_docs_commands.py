"""The commands the docs show parse with their scripts' own parsers, and the defaults the docs quote are the parsers'.

Users copy commands from the fenced blocks of README.md and docs/*.md, and from the inline `python ...` commands
of README.md and BENCHMARKS.md: a flag renamed in the code but not in the docs, or a choice removed, would fail
only in a user's shell. Each command that calls a project script is parsed, never run (a test id such as
``README.md:143`` names the doc line where it starts):

* the training scripts: ``utils.train_args.parse_args`` without ``check_files``, its file-system half (data,
  log_dir, resume), so ``path/to/x`` placeholders pass;
* ``generate_preds.py``: its parser and ``check_args``, whose ``check_model_args`` runs with the path flags
  blanked (the registry and value checks stay; the existence checks of --data_path/--model_path/--log_dir go);
* ``run_experiment.py``: its own ``--plan`` into a temporary --out (every stage's arguments, --set included, are
  checked), with the data files left unread;
* the other scripts and ``benchmarks/*.py``: their parsers alone.

A command with ``...`` in it (the rest elided) is parsed with its required arguments relaxed. ``accelerate
launch`` flags go through accelerate's own parser, and every ``config_files/...`` path must exist.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib
import pathlib
import re
import shlex
from unittest import mock

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FENCED_DOCS = ["README.md"] + sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))
INLINE_DOCS = FENCED_DOCS + ["BENCHMARKS.md"]
SCRIPTS = ("tune_foundation_model.py", "tune_fft_baseline.py", "generate_preds.py", "postprocess_mbpp_preds.py",
           "postprocess_cruxeval_preds.py", "evaluate_preds.py", "run_experiment.py")
BENCHMARKS = tuple(f"benchmarks/{p.name}" for p in sorted((ROOT / "benchmarks").glob("*.py"))
                   if p.name not in ("__init__.py", "common.py"))
SHELL_OPERATORS = {"&&", "||", ";", "|", "&"}
COMMAND_START = re.compile(r"(\w+=\S*\s+)*(python3?|accelerate launch|deepspeed)\s")
ELLIPSES = {"...", "\u2026"}  # "the rest of the arguments"
SKIP: dict[str, str] = {
    # "a command's text": "why it cannot be parsed" (none at present)
}


@dataclasses.dataclass
class Command:
    where: str  # doc:line where the command starts
    text: str
    script: str  # "generate_preds.py", "benchmarks/bench_train.py", ...
    argv: list[str]
    launcher: list[str]  # the tokens before the script: ["accelerate", "launch", "--config_file", ...]
    partial: bool = False  # "..." stood for the rest of the arguments


# ---------------------------------------------------------------------------------------------- extraction
def _fenced_lines(text: str):
    """(line number, line) of every line inside a fenced block that is not Python."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = None if fence is not None else stripped[3:].strip() or "text"
        elif fence is not None and fence != "python":
            yield number, line


def _joined(lines):
    """Backslash-continued lines as one, numbered by their first line."""
    start, parts = None, []
    for number, line in lines:
        start = start or number
        if line.rstrip().endswith("\\"):
            parts.append(line.rstrip()[:-1])
            continue
        yield start, " ".join(parts + [line])
        start, parts = None, []


def _all_inline_spans(text: str):
    """(line number, span) of every inline code span outside the fenced blocks; a span may wrap onto the next line."""
    without_fences = re.sub(r"^```.*?^```", lambda m: "\n" * m.group().count("\n"), text, flags=re.S | re.M)
    for match in re.finditer(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", without_fences, flags=re.S):
        yield without_fences.count("\n", 0, match.start()) + 1, " ".join(match.group(2).split())


def _inline_spans(text: str):
    """The inline code spans that are whole commands: `python ...`, `accelerate launch ...`, `deepspeed ...`, maybe
    after VAR=value prefixes."""
    for number, span in _all_inline_spans(text):
        if COMMAND_START.match(span):
            yield number, span


def _script_of(tokens: list[str]) -> int | None:
    """Index of the project script (or `-m` module) in ``tokens``, if one is called."""
    for i, token in enumerate(tokens):
        if token in SCRIPTS + BENCHMARKS:
            return i
        if token == "-m" and i + 1 < len(tokens):
            module_file = tokens[i + 1].replace(".", "/") + ".py"
            return i + 1 if module_file in SCRIPTS + BENCHMARKS else None
    return None


def _commands(where: str, line: str):
    line = re.sub(r"(^|\s)#.*$", "", line)  # a shell comment (shlex would also cut `a#b`)
    if not re.search(r"\.py\b|-m\s+benchmarks\.", line):  # not a command of ours (a file tree, a docker build)
        return
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split, lexer.commenters = True, ""
    tokens, segment = list(lexer), []
    for token in tokens + [";"]:
        if token not in SHELL_OPERATORS:
            segment.append(token)
            continue
        i = _script_of(segment)
        if i is not None:
            script = segment[i] if segment[i].endswith(".py") else segment[i].replace(".", "/") + ".py"
            argv = segment[i + 1:]
            launcher = segment[:i - 1] if segment[i - 1] == "-m" else segment[:i]
            elided = [a for a in argv if a in ELLIPSES]
            yield Command(where, line.strip(), script, [a for a in argv if a not in ELLIPSES], launcher, bool(elided))
        segment = []


def _set_overrides(doc: str, text: str):
    """README's `--set KEY=VALUE` spans, as run_experiment commands of the preset its text is about (placeholders
    N and DIR given values)."""
    for number, span in _all_inline_spans(text):
        if re.fullmatch(r"--set \S+=\S+", span):
            value = re.sub(r"=N$", "=1", span.split()[1])
            yield Command(f"{doc}:{number}", span, "run_experiment.py", ["--preset", "paper-phi-2", "--set", value], [])


def doc_commands() -> list[Command]:
    found = []
    for doc in INLINE_DOCS:
        text = (ROOT / doc).read_text(encoding="utf-8")
        lines = list(_joined(_fenced_lines(text))) if doc in FENCED_DOCS else []
        for number, line in lines + list(_inline_spans(text)):
            found.extend(_commands(f"{doc}:{number}", line))
        found.extend(_set_overrides(doc, text))
    return sorted(found, key=lambda c: (c.where.split(":")[0], int(c.where.split(":")[1])))


COMMANDS = doc_commands()


# ---------------------------------------------------------------------------------------------- parsing
def _module(script: str):
    return importlib.import_module(script.removesuffix(".py").replace("/", "."))


class _Captured(Exception):
    def __init__(self, parser):
        super().__init__("parser captured")
        self.parser = parser


def parser_of(script: str) -> argparse.ArgumentParser:
    """The script's own parser object: its ``main`` runs up to its first ``parse_args`` call, where it stops."""

    def capture(self, args=None, namespace=None):
        raise _Captured(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture):
        try:
            _module(script).main([])
        except _Captured as captured:
            return captured.parser
    raise AssertionError(f"{script}'s main never called parse_args")


def parse_relaxed(script: str, argv: list[str]) -> None:
    """Parse what a command elided with "..." gives: its flags must exist and their values parse."""
    parser = parser_of(script)
    for action in parser._actions:
        action.required = False
    parser.parse_args(argv)


def _unchecked_paths(monkeypatch) -> None:
    """``utils.cli.check_model_args`` (as generate_preds.py and the training config call it) without its
    file-system checks: the path flags are blanked, the registry names and numbers still checked."""
    import generate_preds
    import utils.cli
    import utils.train_config

    paths = dict.fromkeys(("data_path", "model_path", "enc_model_path", "log_dir"))

    def names_only(args):
        utils.cli.check_model_args(argparse.Namespace(**{**vars(args), **paths}))

    for module in (generate_preds, utils.train_config):
        monkeypatch.setattr(module, "check_model_args", names_only)


def parse_command(script: str, argv: list[str], monkeypatch, tmp_path) -> None:
    """Parse ``argv`` as ``script`` does before it loads a model or reads a file (see the module docstring)."""
    if script in ("tune_foundation_model.py", "tune_fft_baseline.py"):
        import utils.train_args as train_args

        _unchecked_paths(monkeypatch)
        monkeypatch.setattr(train_args, "check_files", lambda config: None)
        train_args.parse_args(argv, script="fft" if script == "tune_fft_baseline.py" else "peft")
    elif script == "generate_preds.py":
        import generate_preds

        _unchecked_paths(monkeypatch)
        generate_preds.check_args(generate_preds.build_parser().parse_args(argv))
    elif script == "run_experiment.py":
        import run_experiment
        import utils.experiment_plan

        _unchecked_paths(monkeypatch)  # its stages' generate_preds.py checks run too
        monkeypatch.setattr(utils.experiment_plan, "load_task_split", lambda *args, **kwargs: None)
        monkeypatch.setattr(utils.experiment_plan, "uncached_hub_models", lambda cells: [])
        run_experiment.main(argv + ["--plan", "--out", str(tmp_path / "out")])  # the last --out wins
    elif script in BENCHMARKS:
        parser_of(script).parse_args(argv)
    else:
        _module(script).parse_args(argv)


@pytest.mark.parametrize("command", COMMANDS, ids=[c.where for c in COMMANDS])
def test_documented_command_parses(command, monkeypatch, tmp_path, capsys):
    if command.text in SKIP:
        pytest.skip(SKIP[command.text])
    try:
        if command.partial:
            parse_relaxed(command.script, command.argv)
        else:
            parse_command(command.script, command.argv, monkeypatch, tmp_path)
    except SystemExit as exc:  # argparse's and cli_entry's refusals print one line and exit 2
        error = capsys.readouterr().err.strip().splitlines()
        pytest.fail(f"{command.where}: {command.script} rejects `{command.text}`: "
                    f"{error[-1] if error else f'exit {exc.code}'}")
    except Exception as exc:  # a UserError from a check the parse runs
        pytest.fail(f"{command.where}: {command.script} rejects `{command.text}`: {type(exc).__name__}: {exc}")


def test_the_docs_have_commands():
    """Not vacuous: 57 commands on 2026-11-28 (README.md 22, 7 of them `--set` spans; BENCHMARKS.md 16;
    docs/TRAINING.md 8; docs/EVALUATION.md 6; docs/GENERATION.md 5), every script called by at least one."""
    per_doc = collections.Counter(c.where.split(":")[0] for c in COMMANDS)
    assert len(COMMANDS) >= 50, per_doc
    assert per_doc["README.md"] >= 15 and per_doc["BENCHMARKS.md"] >= 10, per_doc
    assert min(per_doc[f"docs/{name}.md"] for name in ("TRAINING", "GENERATION", "EVALUATION")) >= 5, per_doc
    assert {c.script for c in COMMANDS} >= set(SCRIPTS), "a script no doc command calls"


# ---------------------------------------------------------------------------------------------- launchers, files
def _accelerate_flags(command: Command) -> list[str] | None:
    """The flags between `accelerate launch` and the script (None: not launched so)."""
    tokens = command.launcher
    starts = [i for i in range(len(tokens) - 1) if tokens[i:i + 2] == ["accelerate", "launch"]]
    return tokens[starts[0] + 2:] if starts else None


LAUNCHED = [c for c in COMMANDS if _accelerate_flags(c) is not None]


@pytest.mark.parametrize("command", LAUNCHED, ids=[c.where for c in LAUNCHED])
def test_accelerate_launch_flags(command):
    """``accelerate launch``'s own flags parse with accelerate's parser, and a --config_file exists."""
    from accelerate.commands.launch import launch_command_parser

    args = launch_command_parser().parse_args(_accelerate_flags(command) + [command.script] + command.argv)
    assert args.training_script == command.script
    if args.config_file is not None:
        assert (ROOT / args.config_file).is_file(), f"{command.where}: no {args.config_file}"


def test_config_files_named_by_the_docs_exist():
    named = {(c.where, token) for c in COMMANDS for token in c.launcher + c.argv if token.startswith("config_files/")}
    assert named, "no command names a config_files/ path"
    missing = [f"{where}: {path}" for where, path in sorted(named) if not (ROOT / path).is_file()]
    assert not missing


# ---------------------------------------------------------------------------------------------- flags in prose
def _flag_fragments():
    """Inline spans that name a script and some of its flags without being a whole command:
    `generate_preds.py --resume`, `bench_train --compile_mode reduce-overhead`, ..."""
    names = {s.split("/")[-1].removesuffix(".py"): s for s in SCRIPTS + BENCHMARKS}
    for doc in INLINE_DOCS:
        for number, span in _all_inline_spans((ROOT / doc).read_text(encoding="utf-8")):
            flags = re.findall(r"(?<![\w-])--[A-Za-z]\w*", span)
            scripts = [s for name, s in names.items() if re.search(rf"(?<![\w-]){name}(\.py)?(?![\w-])", span)]
            if flags and scripts and not COMMAND_START.match(span):  # commands are parsed whole above
                yield pytest.param(scripts, flags, id=f"{doc}:{number}")


@pytest.mark.parametrize("scripts, flags", list(_flag_fragments()))
def test_flags_named_beside_a_script_are_its_flags(scripts, flags):
    known = {option for script in scripts for option in parser_of(script)._option_string_actions}
    assert not [f for f in flags if f not in known], f"not a flag of {' or '.join(scripts)}"


OTHER_TOOLS_FLAGS = {
    "--build-arg", "--gpus", "--rm",  # docker
    "--generations_path", "--scored_results_path",  # CRUXEval's evaluate_generations.py
    "--tag", "--safe_serialization", "--max_shard_size",  # DeepSpeed's zero_to_fp32.py
    "--map-root-user",  # unshare
    "--save_steps",  # the original's flag, in TRAINING.md's differences table
    "--update",  # python -m tests.test_golden --update
    "--lora_",  # `--lora_*`
}


def test_every_flag_in_the_docs_exists():
    """A flag in a code span or block of the docs, with or without its script, is some script's (or accelerate
    launch's, or another tool's above): a renamed flag left in the prose shows here."""
    from accelerate.commands.launch import launch_command_parser
    import utils.train_args as train_args

    parsers = [launch_command_parser(), train_args.build_parser("fft")]
    parsers += [parser_of(s) for s in SCRIPTS + BENCHMARKS if hasattr(_module(s), "main")]
    known = OTHER_TOOLS_FLAGS.union(*(p._option_string_actions for p in parsers))
    unknown = []
    for doc in INLINE_DOCS:
        text = (ROOT / doc).read_text(encoding="utf-8")
        for number, span in list(_all_inline_spans(text)) + list(_joined(_fenced_lines(text))):
            unknown += [f"{doc}:{number}: {flag}" for flag in re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", span)
                        if flag not in known]
    assert not unknown


# ---------------------------------------------------------------------------------------------- quoted defaults
LITERALS = {"on": True, "true": True, "off": False, "false": False, "none": None, "all": None, "—": None}
IN_WORDS = {"--pad_to_multiple_of", "--max_length", "--save_total_limit", "--keep_checkpoints"}
"""docs/TRAINING.md's arguments whose default the table describes in words (it depends on other flags)."""


def _literal(text: str):
    text = text.strip().strip("`")
    if text.lower() in LITERALS:
        return LITERALS[text.lower()]
    try:
        return float(text)
    except ValueError:
        return text if re.fullmatch(r"[\w-]+", text) else ValueError(text)


def _training_table():
    """(flags, default cell, notes cell) of each row of docs/TRAINING.md's arguments table."""
    text = (ROOT / "docs/TRAINING.md").read_text(encoding="utf-8")
    section = text.split("\n## Arguments", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`--") and cells[1]:
            yield re.findall(r"`(--\w+)`", cells[0]), cells[1], cells[2]


def test_training_defaults_quoted_in_the_docs(monkeypatch):
    """docs/TRAINING.md's default column against the parsers: `A (PEFT), B (FFT)` per script, `x / y` for two
    flags; `--save_every`'s default is resolved when the config is built (the parser's is None)."""
    import utils.train_args as train_args
    from utils.train_config import SaveEvery

    _unchecked_paths(monkeypatch)
    parsers = {kind: train_args.build_parser(kind) for kind in ("peft", "fft")}
    configs = {kind: train_args.config_from_namespace(parsers[kind].parse_args(
        ["--task_name", "mbpp", "--model_type", "tiny-llama", "--log_dir", "path/to/run"]
        + (["--peft_method", "lopa"] if kind == "peft" else [])), kind) for kind in parsers}
    rows = list(_training_table())
    assert len(rows) >= 25, "docs/TRAINING.md's arguments table was not found"
    checked = 0
    for flags, cell, _ in rows:
        if set(flags) & IN_WORDS:
            continue
        per_script = re.fullmatch(r"(.+) \(PEFT\), (.+) \(FFT\)", cell)
        for kind, value in zip(("peft", "fft"), per_script.groups() if per_script else (cell, cell)):
            values = [_literal(v) for v in value.split(" / ")] if len(flags) > 1 else [_literal(value)]
            assert len(values) == len(flags), f"docs/TRAINING.md: {flags} | {cell}"
            for flag, quoted in zip(flags, values):
                assert not isinstance(quoted, ValueError), f"{flag}: default {cell!r} is words: add it to IN_WORDS"
                action = parsers[kind]._option_string_actions.get(flag)
                if action is None:  # a PEFT-only flag (--encoder_dropout, --lora_*)
                    continue
                actual = action.default
                if flag == "--save_every":  # None in the parser: the config resolves it per script
                    actual, quoted = str(configs[kind].output.save_every), str(SaveEvery.parse(int(quoted)))
                assert actual == quoted, f"docs/TRAINING.md says {flag} defaults to {cell!r} ({kind}); it is {actual!r}"
                checked += 1
    assert checked >= 40, checked  # 55 on 2026-11-28
    schedulers = next(notes for flags, _, notes in rows if flags == ["--lr_scheduler_type"])
    quoted = schedulers.split("schedule: ", 1)[1].split(", ")
    assert quoted == list(parsers["peft"]._option_string_actions["--lr_scheduler_type"].choices)


def test_decoding_defaults_quoted_in_the_docs():
    """docs/GENERATION.md's decoding table (default and --paper_decoding) against resolve_gen_config."""
    from utils.generation import resolve_gen_config
    from utils.tasks import get_task

    text = (ROOT / "docs/GENERATION.md").read_text(encoding="utf-8")
    rows = {cells[0]: cells[1:3] for line in text.split("\n## Decoding", 1)[1].splitlines()
            if len(cells := [c.strip() for c in line.strip().strip("|").split("|")]) == 3}
    patterns = {"temperature": r"T = ([\d.]+)", "top_p": r"top-p ([\d.]+)", "top_k": r"top-k (\d+)",
                "max_new_tokens": r"(\d+) new tokens", "max_total_tokens": r"(\d+) tokens in all",
                "num_return_sequences": r"(\d+) sample\b"}
    checked = 0
    for row, task in (("MBPP", "mbpp"), ("CRUXEval", "cruxeval_input_prediction")):
        for cell, paper in zip(rows[row], (False, True)):
            config = resolve_gen_config(get_task(task), paper_decoding=paper)
            assert config.do_sample == cell.startswith("sampling"), (row, cell)
            for field, pattern in patterns.items():
                if match := re.search(pattern, cell):
                    assert float(match.group(1)) == getattr(config, field), (row, cell, field)
                    checked += 1
    assert checked >= 10, checked


def test_the_code_map_lists_every_module_and_only_modules_that_exist():
    """docs/EXTENDING.md's code map: each module of utils/ and custom_peft/ in it (a new module without a line, or
    a line for a module moved away, fails here)."""
    section = (ROOT / "docs" / "EXTENDING.md").read_text().split("## Code map", 1)[1]
    named = set(re.findall(r"`((?:utils|custom_peft)/[a-z_0-9]+\.py)`", section))
    modules = {str(p.relative_to(ROOT)) for d in ("utils", "custom_peft") for p in (ROOT / d).glob("*.py")
               if p.name != "__init__.py"}
    assert len(modules) > 30  # 40 today: the glob found them
    assert modules - named == set() and named - modules == set()
