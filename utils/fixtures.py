"""Small, self-written MBPP- and CRUXEval-format files, for tests and smoke runs when ../shared/data is absent.

The records are this project's own toy problems (not copies of the benchmarks), with correct canonical
solutions and outputs, numbered so that each split of each task holds ten.
"""
from __future__ import annotations

import json
import pathlib

from utils.fileio import atomic_write_text

_MBPP_PROBLEMS = [
    ("add_two", "a, b", "Write a function to add two numbers.", "return a + b", [("1, 2", "3"), ("0, 0", "0"),
                                                                                 ("-1, 1", "0")]),
    ("square", "x", "Write a function to square a number.", "return x * x", [("2", "4"), ("3", "9"), ("0", "0")]),
    ("rev", "s", "Write a function to reverse a string.", "return s[::-1]", [("'ab'", "'ba'"), ("''", "''"),
                                                                           ("'abc'", "'cba'")]),
    ("is_even", "n", "Write a function to check if a number is even.", "return n % 2 == 0",
     [("2", "True"), ("3", "False"), ("0", "True")]),
    ("first", "xs", "Write a function to get the first element of a list.", "return xs[0]",
     [("[1, 2]", "1"), ("[5]", "5"), ("['a', 'b']", "'a'")]),
    ("count_a", "s", "Write a function to count the letter a in a string.", "return s.count('a')",
     [("'banana'", "3"), ("'xyz'", "0"), ("'a'", "1")]),
]
# Generated ones fill each split up to ten problems (tests batch and shard up to eight tasks).
_MBPP_PROBLEMS += [
    (f"add_{k}", "x", f"Write a function to add {k} to a number.", f"return x + {k}",
     [("0", str(k)), ("1", str(1 + k)), ("-2", str(k - 2))])
    for k in range(1, 15)
]
_MBPP_NUMBERS = [1, 2, 3, 488, 489, 490] + [4, 5, 6, 7, 8, 9, 10, 491, 492, 493, 494, 495, 496, 497]

_CRUX_PROBLEMS = [
    ("def f(x):\n    return x + 1", "1", "2"),
    ("def f(s):\n    return s.upper()", "'ab'", "'AB'"),
    ("def f(xs):\n    return sorted(xs)", "[3, 1, 2]", "[1, 2, 3]"),
    ("def f(a, b):\n    return a * b", "3, 4", "12"),
    ("def f(s):\n    return s[::-1]", "'abc'", "'cba'"),
    ("def f(d):\n    return len(d)", "{1: 2, 3: 4}", "2"),
]
_CRUX_PROBLEMS += [(f"def f(x):\n    return x * {k}", str(k), str(k * k)) for k in range(2, 16)]
_CRUX_NUMBERS = [0, 1, 2, 400, 401, 402] + [3, 4, 5, 6, 7, 8, 9, 403, 404, 405, 406, 407, 408, 409]


def mbpp_records() -> list[dict]:
    records = []
    for number, (name, args, text, body, cases) in zip(_MBPP_NUMBERS, _MBPP_PROBLEMS):
        doctests = "".join(f"    >>> {name}({a})\n    {r}\n" for a, r in cases)
        prompt = f'\n\ndef {name}({args}):\n    """\n    {text}\n{doctests}    """\n'
        asserts = "".join(f"    assert candidate({a}) == {r}\n" for a, r in cases)
        records.append({
            "task_id": f"MBPP/{number}", "prompt": prompt, "canonical_solution": f"    {body}",
            "entry_point": name, "test": f"\n\nMETADATA = {{}}\n\n\ndef check(candidate):\n{asserts}\n",
            "language": "python", "description": text,
        })
    return records


def cruxeval_records() -> list[dict]:
    return [{"code": c, "input": i, "output": o, "id": f"sample_{n}"}
            for n, (c, i, o) in zip(_CRUX_NUMBERS, _CRUX_PROBLEMS)]


def write_jsonl(path: pathlib.Path, records: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    # whole or not at all: runs sharing an --out may write the smoke preset's copy while another reads it
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def write_fixture_data(out_dir: str | pathlib.Path) -> dict:
    out_dir = pathlib.Path(out_dir)
    return {"mbpp": write_jsonl(out_dir / "mbpp.jsonl", mbpp_records()),
            "cruxeval": write_jsonl(out_dir / "cruxeval.jsonl", cruxeval_records())}
