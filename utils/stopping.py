"""Per-row stopping for batched generation: stop strings on the decoded text, EOS, and a per-row token budget.

``transformers`` ORs the per-row booleans a ``StoppingCriteria`` returns into its unfinished-rows mask: a
finished row is fed padding from then on (it no longer influences anything, and no other row sees it) and the
loop exits once every row has finished. This criterion also records, per row, how many new tokens belong to the
completion, so the caller never has to re-scan the padded tail.

Cost per decoding step: one device-to-host copy of the last few token ids of the rows still running, and one
``batch_decode`` of those short windows — never the whole sequence.
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
        running = [i for i, length in enumerate(self.lengths) if length is None]
        if running:
            width = min(self.window, n_new) if self.stop_sequences else 1
            window = input_ids[:, input_ids.shape[1] - width:].tolist()  # the step's one host sync
            tails = [window[i] for i in running]
            texts = (self.tokenizer.batch_decode(tails, skip_special_tokens=True) if self.stop_sequences
                     else [""] * len(running))
            for i, tail, text in zip(running, tails, texts):
                if tail[-1] in self.eos_token_ids:
                    self.lengths[i] = n_new - 1
                elif any(s in text for s in self.stop_sequences) or n_new >= self.budgets[i]:
                    self.lengths[i] = n_new
        done = [length is not None for length in self.lengths]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def trim(self, new_tokens: torch.Tensor) -> list[list[int]]:
        """Each row's completion ids, from the new-token matrix ``generate`` returned."""
        rows = new_tokens.tolist()
        return [row[:length] if length is not None else row for row, length in zip(rows, self.lengths)]
