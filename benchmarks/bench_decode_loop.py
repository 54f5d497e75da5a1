"""Host time per decoding step of each decoding loop, on a model whose own work is small.

On a GPU with CUDA graphs a decoding step's model work is one graph launch, so what the loop around it does on the
host decides whether the host keeps up. This measures that loop work where it can be measured without a GPU: the
CPU, a tiny model (``tiny-llama``: 3 layers, width 64), greedy decoding with the stop check at MBPP's window width
(stop strings that never occur, and no EOS, so every row makes every token). Loops:

* ``hf-generate``: ``TunedModel.generate`` with transformers' dynamic cache (``--fast_decoding off``);
* ``hf-static``: the same with the static cache (``--fast_decoding on``; transformers compiles only on a GPU);
* ``own-k8`` / ``own-k1``: ``utils.decode_loop.GreedyDecoder`` reading the tokens back every 8 steps / every step;
* ``own-end``: the same reading back only at the end, where one stop check judges every step at once.

``ms_per_step`` leaves the prefill out: (time for ``--new_tokens`` tokens - time for 1) / (``--new_tokens`` - 1),
fastest of ``--repeats`` each. The model's work is the same in every loop, so the differences between lines are
loop costs on this CPU (the device machine's host is slower). They are not GPU figures.

    python -m benchmarks.bench_decode_loop
    python -m benchmarks.bench_decode_loop --smoke
"""
from __future__ import annotations


import torch

from benchmarks.bench_generate import mbpp_test_records
from benchmarks.common import ResultWriter, Timer, argument_parser
from custom_peft.build import build_model
from utils.batching import Collator, encode_example
from utils.decode_loop import GreedyDecoder
from utils.stopping import StopOnText, window_tokens
from utils.tasks import MBPP_STOP_SEQUENCES, get_task

NEVER = ("\x00" * (window_tokens(MBPP_STOP_SEQUENCES) - 2),)
"""A stop string as long as MBPP's longest, which decoded text never holds: same decoding work, no early stop."""


def _batch(tok, batch_size: int, data_path: str | None) -> dict:
    task = get_task("mbpp")
    batch = Collator(tok.pad_token_id, padding_side="left")(
        [encode_example(task, r, tok, tok, num_virtual_tokens=0, train=False)
         for r in mbpp_test_records(data_path, batch_size)])
    return {k: batch[k] for k in ("input_ids", "attention_mask")}


def decode(model, tok, loop: str, batch: dict, new_tokens: int) -> torch.Tensor:
    rows = batch["input_ids"].shape[0]
    criterion = StopOnText(tok, NEVER, [new_tokens] * rows)
    if loop.startswith("own"):
        every = {"own-k8": 8, "own-k1": 1, "own-end": new_tokens}[loop]
        return model.decode_greedy(GreedyDecoder(check_every=every), **batch, max_new_tokens=new_tokens,
                                   criterion=criterion, pad_token_id=tok.pad_token_id)
    from transformers import StoppingCriteriaList

    from utils.fast_paths import static_cache_kwargs

    extra = static_cache_kwargs() if loop == "hf-static" else {}
    return model.generate(**batch, do_sample=False, max_new_tokens=new_tokens, pad_token_id=tok.pad_token_id,
                          stopping_criteria=StoppingCriteriaList([criterion]), **extra)


def main(argv=None) -> None:
    p = argument_parser(__doc__)
    p.add_argument("--loops", default="hf-generate,hf-static,own-k1,own-k8,own-end")
    p.add_argument("--batch_sizes", default="1,16,64")
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure; the fastest is kept")
    p.add_argument("--data_path", default=None)
    p.add_argument("--results", default=None)
    p.add_argument("--smoke", action="store_true", help="a few tokens (CI)")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch_sizes, args.new_tokens, args.repeats = "1,3", 10, 1
    writer = ResultWriter(args.results)
    model, tok = build_model("none", "tiny-llama", seed=0)
    model.eval()
    model.lm.generation_config.eos_token_id = None  # every row makes every token
    for rows in [int(b) for b in args.batch_sizes.split(",")]:
        batch = _batch(tok, rows, args.data_path)
        tokens = {}
        for loop in args.loops.split(","):
            decode(model, tok, loop, batch, args.new_tokens)  # warm-up
            best = {}
            for n in (1, args.new_tokens):  # a 1-token run times the prefill, which the difference leaves out
                for _ in range(args.repeats):
                    with Timer() as t:
                        out = decode(model, tok, loop, batch, n)
                    best[n] = min(best.get(n, t.seconds), t.seconds)
            tokens[loop] = out
            steps = args.new_tokens - 1
            writer.write("decode-loop", model="tiny-llama", method=loop, batch_size=rows, new_tokens=args.new_tokens,
                         made=int(out.shape[1]), prompt_len=int(batch["input_ids"].shape[1]),
                         seconds=best[args.new_tokens], prefill_seconds=best[1],
                         ms_per_step=(best[args.new_tokens] - best[1]) / steps * 1e3,
                         same_tokens_as_first=bool(torch.equal(out, next(iter(tokens.values())))))

if __name__ == "__main__":
    main()
