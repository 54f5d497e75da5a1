"""Per-row stopping for batched generation: stop strings on the decoded text, EOS, and a per-row token budget.

``transformers`` ORs the per-row booleans a ``StoppingCriteria`` returns into its unfinished-rows mask: a
finished row is fed padding from then on (it no longer influences anything, and no other row sees it) and the
loop exits once every row has finished. This criterion also records, per row, how many new tokens belong to the
completion, so the caller never has to re-scan the padded tail.

Cost per decoding step: one device-to-host copy of the last few token ids of the rows still running, and one
``batch_decode`` of those short windows — never the whole sequence. ``observe`` takes several steps' tokens at once
(``utils.decode_loop`` calls it every few steps) and judges each step as the per-step call would.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import StoppingCriteria


def window_tokens(stop_sequences: Sequence[str]) -> int:
    """How many trailing tokens to decode so that a stop string ending in the newest token is always seen.

    Every character of a stop string (all are ASCII) comes from at least one token, plus one token that may
    straddle its start and one whose bytes may decode to a replacement character at the window's edge.
    """
    return max((len(s) for s in stop_sequences), default=0) + 2


class StopOnText(StoppingCriteria):
    """Finish a row when its new text contains a stop string, when it emits EOS, or when it reaches its budget.

    ``budgets``: the most new tokens each row may have (length = rows of the expanded batch, i.e. batch ×
    num_return_sequences). ``prompt_len``: the number of ids ``generate`` holds before the first new token; left
    None it is read at the first call (``input_ids`` then holds exactly one new token), which covers both the
    ``input_ids`` path (prompt + new) and the ``inputs_embeds`` path (new tokens only).

    After generation, ``lengths[i]`` is the number of new tokens of row i that form its raw completion: up to and
    including the token that completed a stop string (the caller cuts the text at the stop string itself), up to
    but excluding EOS, or the budget. It is None for a row stopped by something else (e.g. ``max_new_tokens``).
    """

    def __init__(self, tokenizer, stop_sequences: Sequence[str], budgets: Sequence[int],
                 eos_token_ids: Sequence[int] = (), prompt_len: int | None = None):
        self.tokenizer = tokenizer
        self.stop_sequences = tuple(s for s in stop_sequences if s)
        self.window = window_tokens(self.stop_sequences)
        self.budgets = [int(b) for b in budgets]
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.prompt_len = prompt_len
        self.lengths: list[int | None] = [None] * len(self.budgets)

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        rows = input_ids.shape[0]
        if rows != len(self.budgets):
            raise ValueError(f"StopOnText was built for {len(self.budgets)} rows but generate runs {rows}")
        if self.prompt_len is None:
            self.prompt_len = input_ids.shape[1] - 1
        n_new = input_ids.shape[1] - self.prompt_len
        if not self.finished:
            width = self._width(n_new)
            window = input_ids[:, input_ids.shape[1] - width:].tolist()  # the step's one host sync
            self.observe(window, n_new - width, n_new - 1)
        done = [length is not None for length in self.lengths]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    @property
    def finished(self) -> bool:
        """Whether every row has stopped."""
        return all(length is not None for length in self.lengths)

    def _width(self, n_new: int) -> int:
        return min(self.window, n_new) if self.stop_sequences else 1

    def observe(self, new_ids: Sequence[Sequence[int]], offset: int, checked: int) -> bool:
        """Judge, step by step, the steps after ``checked`` up to the newest, exactly as if called after each one.

        ``new_ids[i]``: row i's new tokens from index ``offset`` on (host lists, all rows equally long), which must
        reach back ``window`` tokens before step ``checked + 1`` (or to the first new token). A decoding loop that
        calls this every k steps instead of every step gets the same ``lengths``; the tokens a row made after it
        stopped are cut by ``trim``. Returns whether every row has stopped.
        """
        if len(new_ids) != len(self.budgets):
            raise ValueError(f"StopOnText was built for {len(self.budgets)} rows but got {len(new_ids)}")
        upto = offset + (len(new_ids[0]) if new_ids else 0)
        if checked + 1 - self._width(checked + 1) < offset:
            raise ValueError(f"observe needs the new tokens from index {checked + 1 - self._width(checked + 1)} on, "
                             f"got them from {offset}")
        running = [i for i, length in enumerate(self.lengths) if length is None]
        steps = range(checked + 1, upto + 1)
        tails = [list(new_ids[i][n - self._width(n) - offset:n - offset]) for n in steps for i in running]
        # one decode for all k steps; a row's windows after the step it stops at are decoded but never judged
        texts = (self.tokenizer.batch_decode(tails, skip_special_tokens=True) if self.stop_sequences
                 else [""] * len(tails))
        for j, (tail, text) in enumerate(zip(tails, texts)):
            n_new, i = steps[j // len(running)], running[j % len(running)]
            if self.lengths[i] is not None:
                continue
            if tail[-1] in self.eos_token_ids:
                self.lengths[i] = n_new - 1
            elif any(s in text for s in self.stop_sequences) or n_new >= self.budgets[i]:
                self.lengths[i] = n_new
        return self.finished

    def trim(self, new_tokens: torch.Tensor) -> list[list[int]]:
        """Each row's completion ids, from the new-token matrix ``generate`` returned."""
        rows = new_tokens.tolist()
        return [row[:length] if length is not None else row for row, length in zip(rows, self.lengths)]
