"""Training throughput, MFU and peak memory per method, through the project's code paths, beside plain peft.

Real architectures with random weights (speed does not depend on weight values; nothing is downloaded):
``--model phi-2`` / ``deepseek-coder-1.3b-base`` / ``Meta-Llama-3-8B`` (config values in utils/registry.py).
Methods: fft, lora, pt, idpg, lopa (the project's ``TunedModel`` with its fast paths: regional torch.compile,
fused AdamW, selective logits) and the baselines a user would otherwise pick, ``peft-pt`` and ``peft-lora``
(plain peft, eager, torch AdamW, full logits). Shapes: batch × seq_len random tokens, labels on the last half of
each row (prompts are about half of an MBPP example). ``--padding`` adds useful (non-pad) tokens/s on the real
MBPP train split with dynamic padding (shuffled, and length-grouped) versus the original's fixed length.

Attribution fields of each method's and each padding mode's line (benchmarks/profile_step.py):
``ms_per_step``: the timed wall time of one step (synchronised);
``allocated_before_gib`` (methods): GPU memory still allocated just before the method's model is built (what an
earlier method left behind; the peaks include it);
``peak_gib``: the most memory allocated during the timed steps (``torch.cuda.max_memory_allocated``). Under CUDA
graphs it leaves out the graphs' own memory: allocated when a graph is recorded (in the warm-up), that memory looks
free to the allocator afterwards (pytorch issue #121932), though replays use it;
``run_peak_gib``: the most memory allocated from the model's build to the end of the timed steps, the recordings of
the CUDA graphs included (their memory counts while it is recorded);
``reserved_gib``: the most memory torch's allocator held from the GPU over the same span, the graphs' private pools
and the allocator's cached blocks included (``torch.cuda.max_memory_reserved``): what the run needed of the card;
``gpu_busy_fraction``: kernel + memcpy/memset device time over the wall time of 3 profiled steps run after the
timed ones (near 1: GPU-bound; well below: the GPU waits on the host);
``top_kernels``: the 5 kernels with the most device time, ``[name, ms per step]``;
``kernels_per_step``: kernels, memcpys and memsets a profiled step launched;
``host_ms_per_step``: the host's time to issue one step, without synchronising (near ``ms_per_step``: the
step is host-bound or synchronises inside);
``profiled_ms_per_step``: the wall time of one profiled step (above ``ms_per_step``: the profiler's overhead);
``dynamo_frames_compiled`` / ``dynamo_graph_breaks`` / ``dynamo_unique_graphs``: dynamo's counters over the
method (or padding mode, its untimed pass included): frames compiled (recompilations included), graph breaks,
graphs captured. ``allocated_before_gib`` and the profiled figures are None on the CPU (CUDA only).

    python -m benchmarks.bench_train --model phi-2 --methods fft,lora,pt,idpg,lopa,peft-pt,peft-lora
    python -m benchmarks.bench_train --smoke          # tiny model on the CPU (CI)
"""
from __future__ import annotations

import contextlib
import traceback

import torch

from benchmarks.common import ResultWriter, Timer, argument_parser, peak_flops, train_flops_per_token
from benchmarks.profile_step import dynamo_counts, dynamo_delta, step_figures
from custom_peft import build_model, count_trainable
from custom_peft.packing import attention_width_constant, plan_rows, row_cost
from utils.batching import HostCopy, round_up
from utils.fast_paths import (compile_encoder_layers, compile_layers, compile_prompt_heads, make_adamw,
                              release_compiled)
from utils.registry import get_model_spec

OUR_METHODS = ("fft", "lora", "pt", "idpg", "lopa")
BASELINES = ("peft-pt", "peft-lora")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build(method: str, args):
    """Return ``(step_fn, lm, trainable_count, model)``: one optimizer step on a batch dict. Our methods pack
    padded batches (``model.packing``, the trainer's default); the baselines never do."""
    dev = _device()
    with dev:
        if method in BASELINES:
            from peft import LoraConfig, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

            from utils.models import load_foundation_model

            lm, _ = load_foundation_model(args.model, dtype=args.dtype, random_weights=True, seed=0)
            if method == "peft-pt":
                cfg = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=args.m,
                                         prompt_tuning_init=PromptTuningInit.RANDOM)
            else:
                cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.1, bias="none", task_type=TaskType.CAUSAL_LM,
                                 target_modules=list(get_model_spec(args.model).lora_targets))
            model = get_peft_model(lm, cfg)
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

            def forward(batch):
                return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             labels=batch["labels"]).loss
        else:
            model, _ = build_model(method, args.model, enc_model_type=args.encoder, num_virtual_tokens=args.m,
                                   lp_rank=args.r, dtype=args.dtype, random_weights=True, seed=0)
            lm = model.lm
            model.packing = True
            model.packed_width_multiple = _multiple(args)  # packed rows rounded as the trainer's --pad_to_multiple_of
            encoder = getattr(model.prompt, "encoder", None)
            graphed = bool(args.encoder_graphs and dev.type == "cuda" and encoder is not None and encoder.use_graphs())
            if args.compile:
                compile_layers(lm, **({} if args.compile_mode == "default" else {"mode": args.compile_mode}))
                if args.compile_encoder and encoder is not None and not graphed:
                    compile_encoder_layers(encoder.backbone)
                compile_prompt_heads(model.prompt)  # LOPA's / IDPG's heads, as the trainer's --compile
            opt = make_adamw(model.parameters(), lr=1e-4)

            def forward(batch):
                return model(**batch).loss
    model.train()
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if args.dtype == "bf16" and dev.type == "cuda" \
        else contextlib.nullcontext()

    graphed_steps = args.compile and args.compile_mode == "reduce-overhead" and method not in BASELINES

    def step(batch):
        if graphed_steps:  # a new training step: the CUDA graphs may reuse the last step's memory
            torch.compiler.cudagraph_mark_step_begin()
        with autocast:
            loss = forward(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, lm, count_trainable(model), model


def random_batch(args, vocab: int, enc_vocab: int = 50265) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (args.batch_size, args.seq_len), generator=g)
    labels = ids.clone()
    labels[:, : args.seq_len // 2] = -100
    enc = torch.randint(10, enc_vocab, (args.batch_size, min(args.seq_len, 512)), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "enc_input_ids": enc, "enc_attention_mask": torch.ones_like(enc)}
    return _on_device({**batch, "host": HostCopy(batch["attention_mask"], labels, enc_padded=False)})


def _on_device(batch: dict) -> dict:
    """The batch's tensors on the benchmark's device; its ``HostCopy`` (what the trainer's collator adds) stays."""
    return {k: v.to(_device()) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def measure(step, batches, warmup: int, steps: int):
    """``(seconds, final loss, memory)`` of ``steps`` timed steps after ``warmup`` untimed ones. ``memory`` (GiB,
    None on the CPU): ``peak_gib`` over the timed steps; ``run_peak_gib`` and ``reserved_gib`` since the last
    ``torch.cuda.reset_peak_memory_stats`` before the call (the warm-up's CUDA-graph recordings included)."""
    cuda = torch.cuda.is_available()
    for i in range(warmup):
        step(batches[i % len(batches)])
    before = (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()) if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses = []
    with Timer() as t:
        for i in range(steps):
            losses.append(step(batches[i % len(batches)]).detach())
    memory = dict.fromkeys(("peak_gib", "run_peak_gib", "reserved_gib"))
    if cuda:
        peak, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        memory = {"peak_gib": peak / 2**30, "run_peak_gib": max(peak, before[0]) / 2**30,
                  "reserved_gib": max(reserved, before[1]) / 2**30}
    return t.seconds, float(losses[-1]), memory


def bench_method(method: str, args, writer: ResultWriter) -> None:
    allocated = torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else None
    if torch.cuda.is_available():  # the run's peaks start here: the model's build, the warm-up, the timed steps
        torch.cuda.reset_peak_memory_stats()
    compiles = dynamo_counts()
    step, lm, trainable, model = build(method, args)
    vocab = lm.config.vocab_size
    enc_vocab = 50265 if args.encoder == "codebert-base" else 2048
    batch = random_batch(args, vocab, enc_vocab)
    seconds, loss, memory = measure(step, [batch], args.warmup, args.steps)
    attribution = step_figures(step, [batch])
    tokens = args.batch_size * args.seq_len * args.steps
    tps = tokens / seconds
    fpt = train_flops_per_token(lm, args.seq_len, full_finetune=(method == "fft"))
    peak_fl = peak_flops()
    encoder = getattr(getattr(model, "prompt", None), "encoder", None)
    graphed = encoder is not None and encoder.graphs is not None
    encoder_compiled = bool(args.compile and args.compile_encoder and encoder is not None and not graphed)
    heads_compiled = bool(getattr(getattr(model, "prompt", None), "heads_compiled", False))
    graph_diff = graph_check(encoder, batch, args.dtype == "bf16") if graphed else None
    writer.write("train", model=args.model, method=method, batch_size=args.batch_size, seq_len=args.seq_len,
                 dtype=args.dtype, compile=bool(args.compile and method not in BASELINES),
                 compile_encoder=encoder_compiled, compile_heads=heads_compiled, encoder_graphs=graphed,
                 encoder_graphs_max_diff=graph_diff,
                 compile_mode=args.compile_mode if args.compile and method not in BASELINES else None,
                 tokens_per_s=tps,
                 mfu=(tps * fpt / peak_fl) if peak_fl else None, **memory, trainable_params=trainable,
                 final_loss=loss, steps=args.steps, allocated_before_gib=allocated,
                 ms_per_step=seconds * 1e3 / args.steps, **attribution, **dynamo_delta(compiles))


def graph_check(encoder, batch: dict, bf16: bool) -> float | None:
    """The largest difference between the replayed and the eager encoder's embeddings of ``batch``, in eval mode
    (no dropout), under the benchmark's autocast (bf16 when ``bf16``); None, with the error printed, if the check
    fails."""
    training = encoder.training
    try:
        encoder.eval()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            ids, mask = batch["enc_input_ids"], batch["enc_attention_mask"]
            graphed, eager = encoder(ids, mask, False), encoder._encode(ids, mask, False)
        return float((graphed.float() - eager.float()).abs().max())
    except Exception:
        traceback.print_exc()
        return None
    finally:
        encoder.train(training)


def bench_padding(args, writer: ResultWriter) -> None:
    """Useful tokens/s on the real MBPP train split, ``pt``, four ways: ``fixed`` (every row padded to the
    original's fixed length), ``dynamic`` (the trainer's default: shuffled batches padded to their longest row,
    then packed where cheaper), ``dynamic-unpacked`` (the same with ``--packing False``) and ``dynamic-grouped``
    (``--group_by_length``: length-grouped batches, packed where cheaper). ``decoder_pad_fraction``: the share of
    the positions through the decoder that hold no token (after packing); ``decoder_shapes``: how many distinct
    (rows, width) shapes the mode's batches run in the decoder (CUDA graphs record one graph per shape);
    ``reserved_gib`` (CUDA): the memory torch's allocator holds from the GPU once the mode has run, cumulative over
    the modes in the order listed (the shapes' CUDA graphs keep their memory)."""
    import random

    from benchmarks.bench_tokenizer import bench_tokenizer
    from utils.batching import Collator, LengthGroupedSampler, TaskDataset
    from utils.data import default_data_path, load_task_split
    from utils.tasks import get_task

    path = args.data_path or default_data_path("mbpp")
    if path is None:
        print("padding benchmark skipped: no MBPP data (pass --data_path)")
        return
    task = get_task("mbpp")
    tok = bench_tokenizer(args.smoke)
    records = load_task_split("mbpp", "train", path)
    ds = TaskDataset(task, records, tok, None, num_virtual_tokens=args.m, train=True)
    fixed_len = task.max_lengths(args.m)[1]
    shuffled = list(range(len(ds)))
    random.Random(0).shuffle(shuffled)
    multiple = _multiple(args)
    dynamic = Collator(tok.pad_token_id, pad_to_multiple_of=multiple, prefix_tokens=args.m, host_copy=True)
    grouped = list(LengthGroupedSampler(ds.lengths(), args.batch_size, seed=0))
    modes = {"fixed": (Collator(tok.pad_token_id, pad_to=fixed_len, host_copy=True), shuffled, False),
             "dynamic": (dynamic, shuffled, True), "dynamic-unpacked": (dynamic, shuffled, False),
             "dynamic-grouped": (dynamic, grouped, True)}
    if args.plan_only:  # the layout and FLOP estimate alone: the architecture on the meta device, nothing runs
        from utils.models import load_foundation_model

        with torch.device("meta"):
            lm, _ = load_foundation_model(args.model, dtype=args.dtype, random_weights=True, seed=0)
        step, model = None, None
    else:
        step, lm, _, model = build("pt", args)
    compile_mode = args.compile_mode if args.compile else None
    vocab = lm.config.vocab_size
    width_constant = attention_width_constant(lm)
    fixed_cost_per_token = None
    for mode, (collate, order, packing) in modes.items():
        batches = []
        for i in range(0, len(order) - args.batch_size + 1, args.batch_size):
            b = collate([ds[j] for j in order[i:i + args.batch_size]])
            b.pop("task_ids")
            b["input_ids"] = b["input_ids"].clamp(max=vocab - 1)  # the bench tokenizer may outgrow a tiny vocab
            b["labels"] = b["labels"].where(b["labels"] < 0, b["labels"].clamp(max=vocab - 1))
            b["host"].labels = b["labels"]
            batches.append(_on_device(b))
        batches = batches[: args.padding_batches or None]
        if not batches:
            raise ValueError(f"{path}: fewer MBPP train examples than --batch_size {args.batch_size}")
        useful = sum(int(b["attention_mask"].sum()) for b in batches)
        padded = sum(b["input_ids"].numel() for b in batches)
        work = [_decoder_work(b, args.m, width_constant, packing, multiple) for b in batches]
        through, cost = sum(w[0] for w in work), sum(w[1] for w in work)
        fixed_cost_per_token = fixed_cost_per_token or cost / useful  # orders drop different remainders
        figures = dict(pad_fraction=1 - useful / padded, packing=packing, batches=len(batches),
                       decoder_pad_fraction=1 - (useful + args.m * sum(len(b["input_ids"]) for b in batches)) / through,
                       est_speedup_vs_fixed=fixed_cost_per_token / (cost / useful),
                       decoder_shapes=len({w[2] for w in work}))
        if step is None:
            writer.write("train", model=args.model, method="pt", padding=mode, batch_size=args.batch_size,
                         plan_only=True, **figures)
            continue
        model.packing = packing
        compiles = dynamo_counts()
        for _ in range(untimed_passes(args)):
            for b in batches:
                step(b)
        with Timer() as t:
            for b in batches:
                step(b)
        writer.write("train", model=args.model, method="pt", padding=mode, batch_size=args.batch_size,
                     dtype=args.dtype, compile=bool(args.compile), compile_mode=compile_mode,
                     pad_multiple=multiple,
                     useful_tokens_per_s=useful / t.seconds, tokens_per_s=padded / t.seconds, **figures,
                     ms_per_step=t.seconds * 1e3 / len(batches), **step_figures(step, batches),
                     reserved_gib=torch.cuda.memory_reserved() / 2**30 if torch.cuda.is_available() else None,
                     **dynamo_delta(compiles))


def untimed_passes(args) -> int:
    """Untimed passes over a padding mode's batches before the timed one: every new shape compiles in the first
    (then one dynamic-shape graph serves the rest); under CUDA graphs (``--compile_mode reduce-overhead``) a new
    shape's first run is a warm-up and its second records the graph, so that mode needs two."""
    return 2 if args.compile and args.compile_mode == "reduce-overhead" else 1


def _multiple(args) -> int | None:
    """``--pad_multiple`` as the collator's ``pad_to_multiple_of`` and the model's ``packed_width_multiple``."""
    return args.pad_multiple if args.pad_multiple > 1 else None


def _decoder_work(batch: dict, m: int, width_constant: float, packing: bool,
                  multiple: int | None = None) -> tuple[int, float, tuple[int, int]]:
    """``(positions the decoder runs, their relative FLOPs, (rows, width))`` for ``batch`` with ``m`` virtual tokens
    per row, its packed rows rounded up to ``multiple`` as the model lays them out
    (``TunedModel.packed_width_multiple``)."""
    lengths = (batch["attention_mask"].sum(1) + m).tolist()
    padded_width = batch["input_ids"].shape[1] + m
    rows = plan_rows(lengths, width_constant, multiple, padded_width) if packing else None
    if rows is None:
        num_rows, width = len(lengths), padded_width
    else:
        num_rows, width = len(rows), round_up(max(sum(lengths[i] for i in row) for row in rows), multiple)
    return num_rows * width, row_cost(num_rows, width, width_constant), (num_rows, width)


def main(argv=None) -> None:
    p = argument_parser(__doc__)
    p.add_argument("--model", default="phi-2")
    p.add_argument("--methods", default="fft,lora,pt,idpg,lopa,peft-pt,peft-lora")
    p.add_argument("--encoder", default="codebert-base", help="encoder architecture for idpg/lopa (random weights)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--m", type=int, default=10)
    p.add_argument("--r", type=int, default=1)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no_compile", dest="compile", action="store_false")
    p.add_argument("--eager_encoder", dest="compile_encoder", action="store_false",
                   help="leave lopa/idpg's frozen encoder eager (an A/B: the trainer compiles its layers with the "
                        "decoder's, --compile_encoder)")
    p.add_argument("--compile_mode", default="default", choices=("default", "reduce-overhead"),
                   help="torch.compile mode of the decoder layers (the trainer's --compile_mode); reduce-overhead: "
                        "CUDA graphs of each layer's forward and backward, a step marked before each; its line "
                        "counts cudagraph_skips")
    p.add_argument("--encoder_graphs", action="store_true",
                   help="replay lopa/idpg's frozen encoder from CUDA graphs (the trainer's --encoder_graphs; CUDA "
                        "only); the line records the largest difference from the eager encoder in eval mode")
    p.add_argument("--padding", action="store_true", help="also run the dynamic vs fixed padding comparison")
    p.add_argument("--plan_only", action="store_true",
                   help="the --padding layouts and their FLOP estimate only (no model runs, no methods; any machine)")
    p.add_argument("--padding_batches", type=int, default=0, help="batches per padding mode (0: the whole split)")
    p.add_argument("--pad_multiple", type=int, default=1,
                   help="round padded lengths, and packed rows, up to a multiple of this, as the trainer's "
                        "--pad_to_multiple_of (1: to the longest row, the trainer's default)")
    p.add_argument("--data_path", default=None)
    p.add_argument("--results", default=None, help="JSONL to append to (default benchmarks/results.jsonl)")
    p.add_argument("--smoke", action="store_true", help="tiny model, CPU-sized shapes (CI)")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.encoder, args.batch_size, args.seq_len = "tiny-phi-2", "tiny-roberta", 2, 32
        args.steps, args.warmup, args.dtype, args.compile, args.m = 2, 1, "fp32", False, 4
        args.padding_batches = 2
    if not args.methods.strip(",") and not (args.padding or args.plan_only):
        p.error('--methods "" runs no method: add --padding (the padding comparison alone) or name methods')
    writer = ResultWriter(args.results)
    failures = []
    # torch caps one function's compiled versions per process (8) and every method's decoder layers run
    # transformers' one wrapper: without a reset between methods, later methods would silently train eager
    release_compiled()
    for method in [] if args.plan_only else [m for m in args.methods.split(",") if m]:  # "": --padding alone
        try:
            bench_method(method, args, writer)
        except Exception as exc:  # one failing method must not lose the others' figures
            traceback.print_exc()
            failures.append(f"{method}: {type(exc).__name__}: {exc}")
            compiled = bool(args.compile and method not in BASELINES)
            writer.write("train", model=args.model, method=method, batch_size=args.batch_size, error=failures[-1],
                         compile=compiled, compile_encoder=args.compile_encoder, encoder_graphs=args.encoder_graphs,
                         compile_mode=args.compile_mode if compiled else None)  # the variant asked for, for summarize
        finally:
            release_compiled()
    if args.padding or args.plan_only:
        try:
            bench_padding(args, writer)
        except Exception as exc:  # an error line, so that summarize lists it beside the figures
            traceback.print_exc()
            failures.append(f"padding: {type(exc).__name__}: {exc}")
            writer.write("train", model=args.model, method="pt", padding="all modes", batch_size=args.batch_size,
                         error=failures[-1], compile=bool(args.compile),
                         compile_mode=args.compile_mode if args.compile else None)
    if failures:
        raise SystemExit("failed: " + "; ".join(failures))


if __name__ == "__main__":
    main()
