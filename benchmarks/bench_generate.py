"""Generation speed: new tokens/s for greedy decoding of MBPP test prompts, through ``TunedModel.generate``.

Methods: ``none``, ``pt``, ``lopa`` with the project's fast path (static KV cache, compiled decoding, prompts
padded to a multiple of 64 so shapes repeat), ``<method>-eager`` without it, ``<method>-own`` with the project's
own greedy loop (``utils/decode_loop.py``: static cache, compiled step, the tokens read back every 8 steps instead
of every step, attention over the cache positions in use rounded up to 64, its step compiled once for every
shape), ``<method>-own-full`` the same loop attending over the whole static cache (the A/B for those buckets),
``<method>-own-static`` the same loop compiled once per shape and bucket (the A/B for the symbolic shapes' cost
per step), and ``hf-generate``: plain ``model.generate``
with the default dynamic cache, the baseline a user would otherwise pick. Real architectures with random weights;
EOS is disabled so every row makes exactly ``--new_tokens`` tokens. Prompt lengths come from the real MBPP test
prompts under a 32k code BPE (benchmarks/bench_tokenizer.py).

    python -m benchmarks.bench_generate --model phi-2 --batch_sizes 1,16,64
    python -m benchmarks.bench_generate --model phi-2 --check_only   # fast and own loop vs eager tokens only
    python -m benchmarks.bench_generate --smoke
"""
from __future__ import annotations

import gc
import logging
import traceback

import torch

from benchmarks.bench_tokenizer import bench_tokenizer
from benchmarks.common import ResultWriter, Timer, argument_parser
from custom_peft.build import MethodConfig, _wrap
from utils.batching import Collator, encode_example
from utils.data import default_data_path, load_task_split
from utils.decode_loop import KV_BUCKET, STEP_COMPILE, GreedyDecoder
from utils.fast_paths import static_cache_kwargs
from utils.models import load_foundation_model
from utils.stopping import StopOnText
from utils.tasks import get_task


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def mbpp_test_records(data_path: str | None, count: int) -> list[dict]:
    """The first ``count`` MBPP test records (repeated when there are fewer), from ``data_path``, the default data,
    or the built-in fixture."""
    path = data_path or default_data_path("mbpp")
    if path is None:
        from utils.fixtures import write_fixture_data
        import tempfile

        path = write_fixture_data(tempfile.mkdtemp())["mbpp"]
    records = load_task_split("mbpp", "test", path)
    return (records * (count // len(records) + 1))[:count]


def prompt_batches(args, batch_size: int, vocab: int) -> dict:
    task = get_task("mbpp")
    tok = bench_tokenizer(args.smoke)
    records = mbpp_test_records(args.data_path, batch_size)
    examples = [encode_example(task, r, tok, tok, num_virtual_tokens=args.m, train=False) for r in records]
    batch = Collator(tok.pad_token_id, tok.pad_token_id, padding_side="left", pad_to_multiple_of=args.pad_multiple)(
        examples)
    batch.pop("task_ids")
    batch["input_ids"] = batch["input_ids"].clamp(max=vocab - 1)
    batch["enc_input_ids"] = batch["enc_input_ids"].clamp(max=args.enc_vocab - 1)[:, :512]
    batch["enc_attention_mask"] = batch["enc_attention_mask"][:, :512]
    return {k: v.to(_device()) for k, v in batch.items()}


def build_lm(args):
    with _device():
        lm, _ = load_foundation_model(args.model, dtype=args.dtype, random_weights=True, seed=0)
    lm.eval()
    lm.generation_config.eos_token_id = None  # every row makes exactly --new_tokens tokens
    return lm


OWN_SUFFIXES = ("-own", "-own-full", "-own-static")
"""Methods decoded by the project's loop: bucketed KV view and symbolic shapes (the default), whole cache, one
compilation per shape and bucket."""


def own_loop(method: str) -> bool:
    return method.endswith(OWN_SUFFIXES)


def wrap(lm, method: str, args):
    """One base model serves every method, so compiled decoding (and its shapes) is shared between them."""
    base = method.split("-own")[0].removesuffix("-eager")
    base = "none" if base == "hf-generate" else base
    cfg = MethodConfig(base, num_virtual_tokens=args.m, enc_model_type=args.encoder)
    with _device():
        model = _wrap(cfg, args.model, lm, dtype=args.dtype, seed=0, random_weights=True)
    return model.eval()


def run(model, method: str, batch: dict, new_tokens: int, fast: bool, decoder=None, logits_out=None, **extra):
    if own_loop(method):  # no stop strings, no EOS: every row runs to new_tokens
        criterion = StopOnText(None, (), [new_tokens] * batch["input_ids"].shape[0])
        return model.decode_greedy(decoder, **batch, max_new_tokens=new_tokens, criterion=criterion,
                                   logits_out=logits_out)
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, **extra)
    if method == "hf-generate":
        out = model.lm.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
        return out[:, batch["input_ids"].shape[1]:]
    if fast:
        kwargs.update(static_cache_kwargs())
    return model.generate(**batch, **kwargs)


class _CudagraphSkips(logging.Handler):
    """Why inductor ran a compiled graph without CUDA graphs (torch logs the reason only for CUDA graphs; the
    counter also counts CPU graphs, which never use them)."""

    LOGGER = "torch._inductor.cudagraph_utils.__cudagraphs"

    def __init__(self):
        super().__init__(logging.WARNING)
        self.reasons: list[str] = []
        logger = logging.getLogger(self.LOGGER)
        logger.setLevel(logging.WARNING)
        logger.addHandler(self)

    def emit(self, record) -> None:
        self.reasons.append(record.getMessage())

    @staticmethod
    def count() -> int:
        from torch._dynamo.utils import counters

        return int(counters["inductor"]["cudagraph_skips"])


def bench(args, writer: ResultWriter, lm) -> list[str]:
    failures = []
    vocab = lm.config.vocab_size
    skips = _CudagraphSkips()
    shared = own_decoder(args)  # one for all -own methods: they share the base model, hence its compiled step
    for method in args.methods.split(","):
        fast = not method.endswith("-eager") and method != "hf-generate"
        # the A/Bs' own decoders (their static caches, their graphs) live for their method only
        decoder = (own_decoder(args, kv_bucket=None) if method.endswith("-own-full") else
                   own_decoder(args, dynamic_shapes=False) if method.endswith("-own-static") else shared)
        try:
            model = wrap(lm, method, args)
        except Exception as exc:
            traceback.print_exc()
            failures.append(f"{method}: {exc}")
            continue
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            try:
                batch = prompt_batches(args, bs, vocab)
                skipped_before, reasons_before = skips.count(), len(skips.reasons)
                # Warm up this shape; the fast path warms up at full length, since a longer static cache than
                # any before it means a new compilation.
                with Timer() as warmup:
                    run(model, method, batch, args.new_tokens if fast else args.warmup_tokens, fast, decoder)
                with Timer() as t:
                    out = run(model, method, batch, args.new_tokens, fast, decoder)
                made = out.shape[0] * out.shape[1]
                writer.write("generate", model=args.model, method=method, batch_size=bs, dtype=args.dtype,
                             fast_path=fast, decode_loop="own" if own_loop(method) else "hf",
                             check_every=decoder.check_every if own_loop(method) else None,
                             kv_bucket=decoder.kv_bucket if own_loop(method) else None,
                             dynamic_shapes=decoder.dynamic_shapes if own_loop(method) else None,
                             warmup_seconds=warmup.seconds, new_tokens=args.new_tokens,
                             prompt_len=int(batch["input_ids"].shape[1]),
                             new_tokens_per_s=made / t.seconds, seconds=t.seconds,
                             cudagraph_skips=skips.count() - skipped_before,
                             cudagraph_skip_reasons=sorted(set(skips.reasons[reasons_before:]))[:5])
            except Exception as exc:
                traceback.print_exc()
                failures.append(f"{method} bs={bs}: {type(exc).__name__}: {exc}")
                writer.write("generate", model=args.model, method=method, batch_size=bs, error=failures[-1])
        del model, decoder
        gc.collect()
    return failures


def own_decoder(args, kv_bucket: int | None = KV_BUCKET, dynamic_shapes: bool = True) -> GreedyDecoder:
    """The project's greedy loop, its step compiled with CUDA graphs on a GPU (eager on the CPU, as generate)."""
    return GreedyDecoder(check_every=args.check_every, kv_bucket=kv_bucket, dynamic_shapes=dynamic_shapes,
                         compile_kwargs=STEP_COMPILE if _device().type == "cuda" else None)


def divergence_report(eager: torch.Tensor, fast: torch.Tensor, eager_logits: torch.Tensor,
                      fast_logits: torch.Tensor) -> dict:
    """Where and why two greedy decodings of the same batch part: tokens ``(B, T)`` and the per-step logits
    ``(B, T, V)`` that chose them. Up to a row's first differing step both paths saw the same prefix, so their
    logits there are comparable; after it they are not.

    A divergence counts as a near tie when the eager top-1 minus top-2 gap at that step is not larger than the
    noise floor: the largest logit difference between the paths on the steps before any row's divergence. The
    difference at the divergence step itself is no yardstick: greedy picked each path's argmax there, so the gap
    is at most twice that difference whatever caused it (a bug that moves logits a lot passes any such test).
    A bug that moves every step's logits raises the floor too: ``eager_logit_absmax`` sets the floor against the
    logits' scale (bf16 keeps 8 significant bits, so at scale ~5 one rounding step is 1/32).
    """
    diff = (eager_logits.float() - fast_logits.float()).abs().amax(dim=-1)  # (B, T)
    top2 = eager_logits.float().topk(2, dim=-1).values
    gap = top2[..., 0] - top2[..., 1]
    steps = eager.shape[1]
    differs = eager != fast
    first = [int(row.nonzero()[0]) if row.any() else None for row in differs]
    ends = torch.tensor([steps if f is None else f for f in first], device=diff.device)
    before = torch.arange(steps, device=diff.device) < ends[:, None]
    floor = float(diff[before].max()) if before.any() else None
    gaps = [None if f is None else float(gap[b, f]) for b, f in enumerate(first)]
    # Without a step where the paths agreed there is no noise floor: every divergence is then suspect.
    suspect = [g for g in gaps if g is not None and (floor is None or g > floor)]
    return dict(first_divergence=first, gap_at_divergence=gaps,
                logit_diff_at_divergence=[None if f is None else float(diff[b, f]) for b, f in enumerate(first)],
                max_logit_diff_before_divergence=floor, divergences_not_near_ties=len(suspect),
                eager_logit_absmax=float(eager_logits.float().abs().max()),
                first_step_max_logit_diff=[float(d) for d in diff[:, 0]],
                first_step_top1_agrees=(eager_logits[:, 0].argmax(-1) == fast_logits[:, 0].argmax(-1)).tolist())


def agreement(args, writer: ResultWriter, lm) -> None:
    """Greedy tokens of the fast path vs the eager path on the same model and batch (random weights in bf16
    have nearly flat logits, so a few argmax flips between kernels are possible; reported, not asserted).
    Per row ``first_divergence`` (None: identical), the eager top-1/top-2 ``gap_at_divergence`` and the paths'
    ``logit_diff_at_divergence``; ``divergences_not_near_ties`` (should be 0) counts gaps above the noise floor
    ``max_logit_diff_before_divergence``; ``first_step_*`` compare the logits set by the prompt and soft prompt
    alone. A ``<method>-own`` line compares the project's own loop with eager the same way, and counts its rows
    identical to the fast path's."""
    decoder = own_decoder(args)
    for method in ("none", "lopa"):
        model = wrap(lm, method, args)
        batch = prompt_batches(args, args.check_rows, lm.config.vocab_size)
        traced = dict(return_dict_in_generate=True, output_logits=True)
        eager = run(model, method, batch, args.check_tokens, fast=False, **traced)
        fast = run(model, method, batch, args.check_tokens, fast=True, **traced)
        same = eager.sequences == fast.sequences
        writer.write("generate-check", model=args.model, method=method, batch_size=args.check_rows,
                     tokens=args.check_tokens,
                     dtype=args.dtype, identical_rows=int(same.all(dim=1).sum()),
                     token_agreement=float(same.float().mean()),
                     **divergence_report(eager.sequences, fast.sequences, torch.stack(eager.logits, dim=1),
                                         torch.stack(fast.logits, dim=1)))
        own_logits = []
        own = run(model, f"{method}-own", batch, args.check_tokens, fast=True, decoder=decoder,
                  logits_out=own_logits)
        same = eager.sequences == own
        writer.write("generate-check", model=args.model, method=f"{method}-own", batch_size=args.check_rows,
                     tokens=args.check_tokens, dtype=args.dtype, identical_rows=int(same.all(dim=1).sum()),
                     token_agreement=float(same.float().mean()),
                     identical_rows_vs_fast=int((fast.sequences == own).all(dim=1).sum()),
                     **divergence_report(eager.sequences, own, torch.stack(eager.logits, dim=1),
                                         torch.stack(own_logits, dim=1)))


def main(argv=None) -> None:
    p = argument_parser(__doc__)
    p.add_argument("--model", default="phi-2")
    p.add_argument("--methods",
                   default="hf-generate,none,none-own,lopa,lopa-own,pt,pt-own,none-own-full,none-own-static")
    p.add_argument("--encoder", default="codebert-base")
    p.add_argument("--enc_vocab", type=int, default=50265)
    p.add_argument("--batch_sizes", default="1,16,64")
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--warmup_tokens", type=int, default=8)
    p.add_argument("--check_tokens", type=int, default=32)
    p.add_argument("--check_rows", type=int, default=4, help="prompts in the fast-vs-eager check")
    p.add_argument("--check_every", type=int, default=8, help="-own methods: steps between reading tokens back")
    p.add_argument("--no_check", dest="check", action="store_false")
    p.add_argument("--check_only", action="store_true",
                   help="only the fast-vs-eager check (generate-check lines, the -own loop's included): no timing")
    p.add_argument("--m", type=int, default=10)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--pad_multiple", type=int, default=64)
    p.add_argument("--data_path", default=None)
    p.add_argument("--results", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU (CI)")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.encoder, args.enc_vocab, args.dtype, args.m = "tiny-phi-2", "tiny-roberta", 2048, "fp32", 4
        args.batch_sizes, args.new_tokens, args.warmup_tokens, args.check_tokens = "1,3", 6, 2, 6
        args.pad_multiple = 8
    if args.check_only and not args.check:
        p.error("--check_only with --no_check leaves nothing to run")
    writer = ResultWriter(args.results)
    lm = build_lm(args)
    failures = [] if args.check_only else bench(args, writer, lm)
    if args.check:
        try:
            agreement(args, writer, lm)
        except Exception as exc:
            traceback.print_exc()
            failures.append(f"check: {exc}")
    if failures:
        raise SystemExit("failed: " + "; ".join(failures))


if __name__ == "__main__":
    main()
