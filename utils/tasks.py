"""The three tasks: how a record becomes a prompt and a target, the stop strings, and the length limits.

MBPP uses the MBXP/mxeval record (``prompt`` is the signature plus a docstring with doctests; the target is
``canonical_solution``). CRUXEval uses the direct (no chain-of-thought) few-shot format with ``[PYTHON]`` and
``[ANSWER]`` tags; the instruction sentences are this project's own wording.
"""
from __future__ import annotations

from dataclasses import dataclass

from utils.errors import UserError
from utils.registry import check_task

# the spec's stage-1 stop strings (§6.5) less its EOS string, which generation stops at as a token
MBPP_STOP_SEQUENCES = ("\ndef", "\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n<|/", "\n```")
CRUXEVAL_STOP_SEQUENCES = ("[/ANSWER]",)

# Length limits of the paper's runs (spec §1.2). MBPP subtracts the m virtual tokens; CRUXEval does not.
MBPP_MAX_PROMPT, MBPP_MAX_NEW = 325, 256
CRUXEVAL_MAX_LENGTH = 512

_OUTPUT_INSTRUCTION = (
    "Below is a Python function f and an assertion that calls it on a given input. Work out what f returns "
    "for that input and replace the ?? with that value written as a literal (no expressions and no function "
    "calls). Give the whole completed assertion between [ANSWER] and [/ANSWER], as in these examples."
)
_INPUT_INSTRUCTION = (
    "Below is a Python function f and an assertion f(??) == output. Find an input for which f returns that "
    "output; several may exist, give just one. Give the whole completed assertion between [ANSWER] and "
    "[/ANSWER], as in these examples."
)
_OUTPUT_SHOTS = (
    ("def f(n):\n    return n", "17", "17"),
    ('def f(s):\n    return s + "a"', '"x9j"', '"x9ja"'),
)
_INPUT_SHOTS = (
    ("def f(my_list):\n    count = 0\n    for i in my_list:\n        if len(i) % 2 == 0:\n            count += 1\n"
     "    return count", '["mq", "px", "zy"]', "3"),
    ("def f(s1, s2):\n    return s1 + s2", '"ba", "nana"', '"banana"'),
)


def _block(code: str, inp: str, out: str, mode: str, answered: bool) -> str:
    query = f"assert f({inp}) == ??" if mode == "output" else f"assert f(??) == {out}"
    text = f"[PYTHON]\n{code}\n{query}\n[/PYTHON]\n[ANSWER]"
    if answered:
        text += f"\nassert f({inp}) == {out}\n[/ANSWER]"
    return text


def cruxeval_prompt(record: dict, mode: str) -> str:
    """The few-shot prompt for one CRUXEval record; it ends with ``[ANSWER]`` (no newline)."""
    if mode not in ("input", "output"):
        raise ValueError(f"mode must be 'input' or 'output', not {mode!r}")
    instruction, shots = (_OUTPUT_INSTRUCTION, _OUTPUT_SHOTS) if mode == "output" else (_INPUT_INSTRUCTION,
                                                                                       _INPUT_SHOTS)
    parts = [instruction] + [_block(c, i, o, mode, True) for c, i, o in shots]
    parts.append(_block(record["code"], record["input"], record["output"], mode, False))
    return "\n\n".join(parts)


def cruxeval_target(record: dict) -> str:
    return f"\nassert f({record['input']}) == {record['output']}\n[/ANSWER]\n"


@dataclass(frozen=True)
class Task:
    name: str
    stop_sequences: tuple[str, ...]
    paper_temperature: float
    id_field: str
    required_fields: tuple[str, ...]

    @property
    def is_mbpp(self) -> bool:
        return self.name == "mbpp"

    @property
    def mode(self) -> str | None:
        """``input`` or ``output`` for CRUXEval; None for MBPP."""
        return None if self.is_mbpp else self.name.split("_")[1]

    def record_id(self, record: dict) -> str:
        return record[self.id_field]

    def prompt(self, record: dict) -> str:
        return record["prompt"] if self.is_mbpp else cruxeval_prompt(record, self.mode)

    def target(self, record: dict) -> str:
        """The supervised text (EOS is appended as a token id at tokenization)."""
        return record["canonical_solution"] if self.is_mbpp else cruxeval_target(record)

    def max_lengths(self, num_virtual_tokens: int) -> tuple[int, int]:
        """``(max_prompt_tokens, max_total_tokens)`` without the virtual tokens, as in the paper's runs."""
        if self.is_mbpp:
            if num_virtual_tokens >= MBPP_MAX_PROMPT:  # a budget of 0 or less would slice as [-0:], the whole prompt
                raise UserError(f"--num_virtual_tokens {num_virtual_tokens}: MBPP's prompt budget is "
                                f"{MBPP_MAX_PROMPT} - m tokens, which leaves none; use m < {MBPP_MAX_PROMPT}")
            return MBPP_MAX_PROMPT - num_virtual_tokens, MBPP_MAX_PROMPT + MBPP_MAX_NEW - num_virtual_tokens
        return CRUXEVAL_MAX_LENGTH - 1, CRUXEVAL_MAX_LENGTH


_MBPP_FIELDS = ("task_id", "prompt", "canonical_solution", "entry_point", "test")
_CRUX_FIELDS = ("id", "code", "input", "output")
TASK_SPECS = {
    "mbpp": Task("mbpp", MBPP_STOP_SEQUENCES, 0.6, "task_id", _MBPP_FIELDS),
    "cruxeval_input_prediction": Task("cruxeval_input_prediction", CRUXEVAL_STOP_SEQUENCES, 0.2, "id", _CRUX_FIELDS),
    "cruxeval_output_prediction": Task("cruxeval_output_prediction", CRUXEVAL_STOP_SEQUENCES, 0.2, "id",
                                       _CRUX_FIELDS),
}


def get_task(task_name: str) -> Task:
    return TASK_SPECS[check_task(task_name)]
