"""Post-processing of model completions (spec §6.3–6.5): MBPP stage 1 and 2, and CRUXEval answer extraction.

MBPP stage 1 cuts a completion at the earliest stop string and drops BOS/EOS strings. Stage 2 keeps the
function body (up to the first statement indented less than the body; comments, whose indent Python ignores, do
not count), re-indents it to the prompt's indent unit when the two differ (content-based; the original decided
this by the model name in the file path), ends it at the first body-level ``return`` (joining its continuation
lines) and trims every ``return`` to its longest leading complete expression, found with ``ast`` instead of
tree-sitter/parso.

CRUXEval: the answer is cut out of the text that follows the prompt's final ``[ANSWER]``; the prompt, when
still present, is removed first (with the original's rule for a prompt whose end the tokenizer rendered
differently). Nothing here decides anything from a file path or a model name.
"""
from __future__ import annotations

import ast
import io
import json
import pathlib
import re
import tokenize

from utils.errors import UserError
from utils.fileio import atomic_write_text, check_writable_dir

DEEPSEEK_BOS = "<｜begin▁of▁sentence｜>"
BOS_STRINGS = (DEEPSEEK_BOS, "<|begin_of_text|>", "<s>", "<|startoftext|>")
"""Removed where they lead the text (the DeepSeek BOS is removed everywhere, as in the original)."""
EOS_STRINGS = ("<｜end▁of▁sentence｜>", "<|endoftext|>", "</s>", "<|end_of_text|>", "<|eot_id|>", "<|end|>")
MBPP_STAGE1_STOPS = ("\ndef", "\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n<|/", "\n```") + EOS_STRINGS
"""The spec's stage-1 list (§6.5) plus the EOS strings of the supported tokenizers."""

_INDENT = re.compile(r"[ \t]*")
_RETURN = re.compile(r"return\b")


def cut_at_stop(text: str, stop_sequences) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string; unchanged if none occurs."""
    cut = len(text)
    for stop in stop_sequences:
        if stop:
            pos = text.find(stop, 0, cut + len(stop) - 1)  # one that starts before the cut may end after it
            if pos != -1:
                cut = pos
    return text[:cut]


def strip_bos(text: str) -> str:
    text = text.replace(DEEPSEEK_BOS, "")
    changed = True
    while changed:
        changed = False
        for bos in BOS_STRINGS:
            if text.startswith(bos):
                text, changed = text[len(bos):], True
    return text


def mbpp_stage1(text: str) -> str:
    """Drop BOS strings, then cut at the earliest MBPP stop string or EOS string (spec §6.5 stage 1)."""
    return cut_at_stop(strip_bos(text), MBPP_STAGE1_STOPS)


def first_expression(text: str) -> str | None:
    """The longest prefix of ``text``, ending at a token boundary, that parses as one Python expression.

    ``"a + b) junk"`` gives ``"a + b"``; ``"x if c else y  # note"`` gives ``"x if c else y"``. None if no
    prefix is an expression (for example an unclosed bracket).
    """
    ends = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type in (tokenize.ENDMARKER, tokenize.NEWLINE, tokenize.NL, tokenize.COMMENT,
                            tokenize.INDENT, tokenize.DEDENT):
                continue
            if tok.start[0] > 1:
                break
            ends.append(tok.end[1])
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    first_line = text.split("\n", 1)[0]
    for end in sorted(set(ends), reverse=True):
        candidate = first_line[:end].strip()
        try:
            ast.parse(candidate, mode="eval")
        except (SyntaxError, ValueError):
            continue
        return candidate
    return None


def _trim_return(line: str) -> str:
    """``<indent>return <first complete expression>``; the line unchanged if nothing parses."""
    indent = _INDENT.match(line).group()
    value = line.strip()[len("return"):]
    if not value.strip():
        return indent + "return"
    expr = first_expression(value.strip())
    return line.rstrip() if expr is None else f"{indent}return {expr}"


def _prompt_indent(prompt: str) -> str:
    """The body indent of the prompt's function (the indent of the first indented line after the ``def``)."""
    lines = prompt.split("\n")
    for i, line in enumerate(lines):
        if line.lstrip().startswith("def "):
            for body in lines[i + 1:]:
                if body.strip():
                    return _INDENT.match(body).group()
    return ""


def _reindent(lines: list[str], unit: str, target: str) -> list[str]:
    out = []
    for line in lines:
        lead = _INDENT.match(line).group()
        depth, rest = 0, lead
        while unit and rest.startswith(unit):
            depth, rest = depth + 1, rest[len(unit):]
        out.append(target * depth + rest + line[len(lead):])
    return out


def _continuation_rows(text: str) -> set[int]:
    """0-based indices of the lines that continue a logical line (inside brackets, strings or after ``\\``)."""
    rows: set[int] = set()
    start = None
    skip = (tokenize.INDENT, tokenize.DEDENT, tokenize.NL, tokenize.COMMENT, tokenize.ENCODING)
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if start is None:
                if tok.type in skip or tok.type == tokenize.ENDMARKER:
                    continue
                start = tok.start[0]
            if tok.type == tokenize.NEWLINE:
                rows.update(range(start, tok.end[0]))
                start = None
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    # a statement still open runs to the end of the text: an unclosed bracket or string, or one whose last line starts
    # with '#' (tokenize takes that line for a comment and adds no NEWLINE, even where it closes a string)
    if start is not None:
        rows.update(range(start, text.count("\n") + 1))
    return rows


def _is_code(line: str) -> bool:
    """Whether ``line`` holds code (not blank, not only a comment); a line inside a string is judged by the caller."""
    return bool(line.strip()) and not line.lstrip().startswith("#")


def _statement(lines: list[str], i: int, cont: set[int], deeper_than: int | None) -> tuple[str, int]:
    """The statement starting at line ``i`` joined into one line, and the index after it. Joined: its
    continuation lines, and (``deeper_than`` set) following lines indented deeper than that many characters."""
    statement = lines[i].rstrip()
    i += 1
    while i < len(lines) and (i in cont or (deeper_than is not None and lines[i].strip()
                                            and len(_INDENT.match(lines[i]).group()) > deeper_than)):
        statement = statement.rstrip("\\").rstrip() + " " + lines[i].strip()
        i += 1
    return statement, i


def mbpp_stage2(text: str, prompt: str | None = None) -> str:
    """Keep the function body of a stage-1 completion and trim its returns (spec §6.5 ``cleanup_return``).

    * The body indent is the first line of code's; lines are kept until a statement is indented less
      (continuation lines inside brackets never end the body, nor do comments, whose indent Python ignores;
      comments less indented than the body are dropped where they end the kept lines).
    * A ``return`` at body level ends the body; its continuation lines and the lines indented deeper after
      it are joined onto it (a trailing backslash removed). Every ``return`` is trimmed to its first
      complete expression (the longest prefix that parses).
    * If ``prompt`` is given and its body indent differs from the completion's (tabs against spaces, 2
      against 4 spaces; the completion's is that of its first line of code, not of a comment), the kept lines
      are re-indented to the prompt's unit.
    * Text without a ``return`` keeps its body lines unchanged.
    """
    lines = text.split("\n")
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None:
        return text
    # Python ignores a comment's indent: the first line of code sets the body's (a comment-only text, its first line)
    indent = _INDENT.match(next((line for line in lines[first:] if _is_code(line)), lines[first])).group()
    cont = _continuation_rows(text)
    kept: list[str] = []
    after_body: list[bool] = []  # per kept line: blank, or a comment less indented than the body
    i = first
    while i < len(lines):
        line = lines[i]
        if not _is_code(line) or i in cont:  # blank lines and comments never end the body
            kept.append(line)
            after_body.append(not line.strip() or (i not in cont and len(_INDENT.match(line).group()) < len(indent)))
            i += 1
            continue
        lead = _INDENT.match(line).group()
        if len(lead) < len(indent):
            break
        if _RETURN.match(line.strip()):
            body_level = lead == indent
            statement, i = _statement(lines, i, cont, len(indent) if body_level else None)
            kept.append(_trim_return(statement))
            after_body.append(False)
            if body_level:
                break
            continue
        kept.append(line)
        after_body.append(False)
        i += 1
    while kept and after_body.pop():  # trailing blank lines, and comments that lead what follows the body
        kept.pop()
    target = _prompt_indent(prompt) if prompt else ""
    # the code's unit: a leading comment's indent does not count for Python, so it must not set the unit
    code = next((line for line in kept if _is_code(line)), kept[0] if kept else "")
    unit = _INDENT.match(code).group()
    if target and unit and target != unit:
        kept = _reindent(kept, unit, target)
    return "\n".join(lines[:first] + kept)


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def strip_prompt(text: str, prompt: str) -> str:
    """The part of ``text`` after ``prompt`` (spec §6.4).

    If the text does not start with the exact prompt (tokenizers render its end differently), the prompt is
    cut at the first mismatching character and the text after that point is kept. A text that shares less
    than half the prompt is a bare completion and is returned whole.
    """
    if text.startswith(prompt):
        return text[len(prompt):]
    common = _common_prefix_len(text, prompt)
    return text[common:] if common >= len(prompt) // 2 else text


def extract_cruxeval_answer(completion: str, mode: str, prompt: str | None = None) -> str:
    """The prediction in a CRUXEval completion (the text after the prompt's ``[ANSWER]``).

    output mode: what follows the first ``==``, cut before ``[/ANSWER]``, stripped (a literal).
    input mode: what precedes the first ``==``, from ``f`` of ``assert f`` on, stripped (an ``f(...)`` call).
    The ``==`` is the first one outside brackets and strings (``_assertion_eq``).
    Raw text that still holds the prompt is accepted: pass ``prompt`` to remove it exactly, or leave it None
    to keep what follows the last ``[ANSWER]`` (the generator stops at ``[/ANSWER]``, so that is the model's).
    Both modes cut at ``[/ANSWER]`` first, so ``f(1)\\n[/ANSWER]`` without ``==`` gives ``f(1)``, and an ``==`` after
    it (``2\\n[/ANSWER]\\nassert g(1) == 3``, text a decoder ran on past the stop) is not the answer's.
    """
    if mode not in ("input", "output"):
        raise ValueError(f"mode must be 'input' or 'output', not {mode!r}")
    text = completion
    if prompt is not None:
        text = strip_prompt(text, prompt)
    elif "[ANSWER]" in text:
        text = text.rsplit("[ANSWER]", 1)[1]
    if "[/ANSWER]" in text:  # what follows the answer's end is not the answer, whatever its == say
        text = text.split("[/ANSWER]", 1)[0]
    eq = _assertion_eq(text)
    if mode == "output":
        if eq != -1:
            text = text[eq + 2:]
    else:
        if eq != -1:
            text = text[:eq]
        if "assert f" in text:
            text = "f" + text.split("assert f", 1)[1]
    return text.strip()


def _assertion_eq(text: str) -> int:
    """Index of the ``==`` that splits ``assert f(...) == value``: the first one outside brackets and strings.

    The original split at the first ``==`` anywhere, so a correct ``assert f('a==b') == 2`` (or ``f(x == 1)``)
    became a syntax error. Falls back to the first ``==`` when the text does not tokenize; -1 if there is none at
    the top level.
    """
    plain = text.find("==")
    if plain == -1:
        return -1
    starts = [0]
    for line in io.StringIO(text).readlines():  # the lines tokenize sees (str.splitlines also splits at \x0b)
        starts.append(starts[-1] + len(line))
    depth = 0
    source = text.replace("\r", " ")  # tokenize takes a line that starts with a lone \r for a blank one
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type != tokenize.OP:
                continue
            if tok.string in "([{":
                depth += 1
            elif tok.string in ")]}":
                depth = max(0, depth - 1)
            elif tok.string == "==" and depth == 0:
                return starts[tok.start[0] - 1] + tok.start[1]
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return plain
    return -1  # every == is inside a string or brackets: nothing to split at


# -- files (the CLIs postprocess_mbpp_preds.py and postprocess_cruxeval_preds.py) ---------------------------
def stage_path(path, stage: int) -> pathlib.Path:
    """``<stem>_stage<N>.jsonl`` beside the MBPP predictions ``path``."""
    path = pathlib.Path(path)
    return path.with_name(f"{path.stem}_stage{stage}.jsonl")


def postprocess_mbpp_file(path, problem_file=None, data_path=None, mbpp_split="paper") -> tuple[str, str]:
    """Write ``<stem>_stage1.jsonl`` and ``<stem>_stage2.jsonl`` beside ``path``; returns their paths.

    Prompts (for stage 2) come from ``problem_file``, else the test split of ``data_path`` when given, else
    ``mbpp_test_problems.jsonl`` beside ``path`` (see ``load_mbpp_problems``).
    """
    from utils.evaluation import read_mbpp_solutions_and_problems

    path = pathlib.Path(path)
    solutions, problems = read_mbpp_solutions_and_problems(path, problem_file, data_path, mbpp_split)
    check_writable_dir(path.parent, "--path")  # both stages go beside it
    outputs = []
    for stage in (1, 2):
        out = stage_path(path, stage)
        lines = []
        for sol in solutions:
            text = mbpp_stage1(sol["completion"])
            if stage == 2:
                text = mbpp_stage2(text, problems[sol["task_id"]]["prompt"])
            # mxeval picks its executor by each sample's "language": a file without it would not run there
            lines.append(json.dumps({**sol, "language": sol.get("language", "python"), "completion": text}) + "\n")
        atomic_write_text(out, "".join(lines))
        outputs.append(str(out))
    return outputs[0], outputs[1]


def cruxeval_answers_path(path: pathlib.Path) -> pathlib.Path:
    """``output.json`` for ``output_raw.json`` (any ``output_raw`` in the name), else ``<stem>_answers.json``."""
    if "output_raw" in path.name:
        return path.with_name(path.name.replace("output_raw", "output"))
    return path.with_name(path.stem + "_answers.json")


def postprocess_cruxeval_file(path, mode: str, data_path=None, out=None, official_out=None) -> str:
    """Extract the answers of ``{id: [raw text, ...]}`` into ``{id: [answer, ...]}``; returns the output path.

    The prompts are rebuilt from the dataset (``data_path``, default ../shared/data when present) so that raw
    texts that still hold the prompt lose exactly that prompt. ``official_out``: also write the answers as the
    official CRUXEval script reads them (``official_cruxeval_generations``).
    """
    from utils.evaluation import CRUX_TASKS, check_cruxeval_ids, load_cruxeval_records, read_cruxeval_predictions
    from utils.prediction_files import check_generated_for
    from utils.tasks import cruxeval_prompt

    path = pathlib.Path(path)
    task = f"cruxeval_{mode}_prediction"
    check_generated_for(path, task, lambda recorded: f"pass --mode {CRUX_TASKS[recorded]}" if recorded in CRUX_TASKS
                        else "post-process MBPP predictions with postprocess_mbpp_preds.py")
    raw = read_cruxeval_predictions(path)
    records = load_cruxeval_records(task, None, data_path)
    check_cruxeval_ids(path, raw, records)
    answers = {rid: [extract_cruxeval_answer(text, mode, cruxeval_prompt(records[rid], mode)) for text in texts]
               for rid, texts in raw.items()}
    out_given = out is not None
    out = pathlib.Path(out) if out else cruxeval_answers_path(path)
    if out.resolve() == path.resolve():
        raise UserError(f"{out}: the output would overwrite the input; pass --out")
    check_writable_dir(out.parent, "--out" if out_given else "--path")
    if official_out is not None:  # checked before anything is written
        official_out = pathlib.Path(official_out)
        _check_official_mode_in_path(official_out, mode)
        check_writable_dir(official_out.parent, "--official_out")
    atomic_write_text(out, json.dumps(answers, indent=1) + "\n")
    if official_out is not None:
        atomic_write_text(official_out, json.dumps(official_cruxeval_generations(answers, records)) + "\n")
    return str(out)


def official_cruxeval_generations(answers: dict[str, list[str]], records: dict) -> dict[str, list[str]]:
    """``answers`` as facebookresearch/cruxeval's evaluate_generations.py reads them: every id of the dataset in
    order, an id without answers padded with empty ones (they fail in either mode, and count in its average)."""
    n = max((len(v) for v in answers.values()), default=1)
    order = sorted(records, key=lambda rid: (len(rid), rid))  # sample_2 before sample_10
    return {rid: answers.get(rid, [""] * n) for rid in order}


def _check_official_mode_in_path(path: pathlib.Path, mode: str) -> None:
    # the official script ignores --mode: "input" anywhere in --generations_path means input prediction
    for shown in {str(path), str(path.resolve())}:
        if ("input" in shown) != (mode == "input"):
            need = "must contain" if mode == "input" else "must not contain"
            raise UserError(f"--official_out {shown}: the official CRUXEval script takes the mode from the path, "
                            f"which {need} 'input' for {mode} prediction; e.g. cruxeval_{mode}_generations.json "
                            f"in a directory whose path {need} it")
