"""Generate test-split predictions for any method, in the files mxeval (MBPP) and CRUXEval read.

    python generate_preds.py --task_name mbpp --model_type phi-2 --load_adapter_from logging/run/final \
        --log_dir logging/run/preds                                   # greedy, batch 16
    accelerate launch generate_preds.py ... --paper_decoding          # the paper's sampling, sharded over GPUs

See docs/GENERATION.md for the options, the output formats and what differs from the original.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

from utils.cli import (ArgumentParser, add_model_args, check_model_args, default_log_dir, make_log_dir, positive_int,
                       str2bool)
from utils.errors import UserError, cli_entry, on_interrupt
from utils.fileio import lock_directory
from utils.registry import METHODS
from utils.tuned_models import (check_trained_on_this_mbpp_split, load_model, resolve_method,
                                 warn_if_tuned_for_another_task)

EXIT_AFTER_BATCHES_ENV = "GENERATE_PREDS_EXIT_AFTER_BATCHES"
"""Testing hook: the main process dies (os._exit, no cleanup) after writing this many batches."""


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser)
    # Taken from the adapter directory unless given (then they must agree with it).
    parser.set_defaults(enc_model_type=None, num_virtual_tokens=None, lp_rank=None)
    g = parser.add_argument_group("what to load")
    g.add_argument("--peft_method", choices=METHODS, default=None,
                   help="default: read from the adapter's adapter_config.json; fft when only a checkpoint is "
                        "given, or a --model_path whose training_config.json says fft; none otherwise")
    g.add_argument("--load_adapter_from", default=None, help="adapter directory (lora, pt, idpg, lopa)")
    g.add_argument("--clf_predictor_path", default=None,
                   help="accepted for the original's commands: the LOPA/IDPG heads live in the adapter directory; "
                        "a directory here is used as --load_adapter_from when that is not given")
    g.add_argument("--load_base_from_path", default=None,
                   help="fft: a Hugging Face model directory, or a single state_dict file (.bin/.pt/.safetensors, "
                        "'module.' and 'backbone.' prefixes allowed) loaded into --model_type")
    g.add_argument("--sharded_checkpoint_dir", default=None,
                   help="fft: a sharded checkpoint directory (an index and its shards: save_pretrained's, or "
                        "zero_to_fp32.py's), the same prefixes allowed")
    g.add_argument("--path_to_data", dest="data_path", default=None, help="the original's name for --data_path")
    g.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="weights and compute dtype")
    d = parser.add_argument_group("decoding (default: greedy, reproducible)")
    # checked when parsed: a bad value found after the fresh start has cleared --log_dir would cost its results
    d.add_argument("--batch_size", type=positive_int, default=16, help="prompts per generate call (per process)")
    d.add_argument("--paper_decoding", action="store_true",
                   help="the paper's sampling: MBPP T=0.6, CRUXEval T=0.2, top-p 0.95, one sample")
    d.add_argument("--do_sample", type=str2bool, nargs="?", const=True, default=None, metavar="BOOL",
                   help="--do_sample or --do_sample True: sample (at the task's paper temperature unless "
                        "--temperature is given); False: greedy")
    d.add_argument("--temperature", type=float, default=None, help="> 0 turns sampling on; 0 means greedy")
    d.add_argument("--top_p", type=float, default=None, help="nucleus sampling (default 1.0; 0.95 with "
                                                             "--paper_decoding)")
    d.add_argument("--top_k", type=int, default=None, help="top-k sampling; 0 turns it off (default 50, "
                                                           "transformers' default, which the original used)")
    d.add_argument("--num_return_sequences", type=int, default=None, help="samples per task (needs sampling)")
    d.add_argument("--num_beams", type=int, default=1, help="accepted for the original's commands; only 1")
    d.add_argument("--fast_decoding", default="auto", choices=("auto", "on", "off"),
                   help="a static KV cache with compiled decoding steps and prompts padded to a multiple of 64 "
                        "(same tokens, several times faster on a GPU; see BENCHMARKS.md); auto: on with CUDA")
    d.add_argument("--decode_loop", default="auto", choices=("auto", "hf", "own"),
                   help="own: greedy decoding in the project's loop, which reads the new tokens back every 8 steps "
                        "instead of every step (greedy only; on an H100 1.35x generate's new tokens/s at batch 64, "
                        "the same tokens as generate's fast path in a check on phi-2; see docs/GENERATION.md); "
                        "hf: transformers' generate; auto: own with fast decoding on a GPU for greedy decoding, when "
                        "the model's generation config sets no logits processor, else hf")
    d.add_argument("--max_new_tokens", type=int, default=None,
                   help="new-token cap per sample (default MBPP 256; CRUXEval 512 minus the prompt length, which "
                        "stays a cap when this is given)")
    r = parser.add_argument_group("run")
    r.add_argument("--limit", type=positive_int, default=None, help="first N test tasks only (smoke runs)")
    r.add_argument("--resume", action="store_true",
                   help="keep the tasks already in --log_dir/generation_progress.jsonl and generate the rest")
    r.add_argument("--overwrite", action="store_true",
                   help="start afresh in a --log_dir that holds an earlier run's progress, predictions or scores "
                        "(deleted); without it (or --resume) such a directory is refused")
    r.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def run_config(args, method: str, gen_config, num_processes: int, enc_model_type: str | None) -> dict:
    """What generate_preds_config.json records (and --resume compares)."""
    def absolute(path):
        return str(pathlib.Path(path).resolve()) if path else None

    return {"task_name": args.task_name, "model_type": args.model_type, "peft_method": method,
            "load_adapter_from": absolute(args.load_adapter_from), "model_path": absolute(args.model_path),
            "load_base_from_path": absolute(args.load_base_from_path),
            "sharded_checkpoint_dir": absolute(args.sharded_checkpoint_dir), "enc_model_type": enc_model_type,
            "enc_model_path": absolute(args.enc_model_path),  # the frozen encoder's weights: LOPA/IDPG prompts
            "data_path": absolute(args.data_path), "mbpp_split": args.mbpp_split, "limit": args.limit,
            "dtype": args.dtype, "generation": gen_config.to_dict(), "batch_size": args.batch_size,
            "num_processes": num_processes}


def check_args(args: argparse.Namespace):
    """The checks that need no file or model (run_experiment --plan runs them too); returns the GenConfig."""
    from utils.generation import resolve_gen_config
    from utils.tasks import get_task

    check_model_args(argparse.Namespace(**{**vars(args), "num_virtual_tokens": args.num_virtual_tokens or 1,
                                           "lp_rank": args.lp_rank or 1}))
    if args.resume and args.overwrite:
        raise UserError("--resume keeps an earlier run's work and --overwrite deletes it: give one of them")
    if args.num_beams != 1:
        raise UserError(f"--num_beams {args.num_beams}: only 1 is supported (the paper samples one sequence)")
    gen_config = resolve_gen_config(get_task(args.task_name), paper_decoding=args.paper_decoding,
                                    do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p,
                                    top_k=args.top_k, num_return_sequences=args.num_return_sequences,
                                    max_new_tokens=args.max_new_tokens, seed=args.seed)
    if args.decode_loop == "own" and gen_config.do_sample:
        raise UserError("--decode_loop own decodes greedily; sampling (--paper_decoding, --do_sample, --temperature) "
                        "needs --decode_loop hf")
    return gen_config


def decoding_path(args: argparse.Namespace, device_type: str, gen_config, generation_config) -> tuple[bool, object]:
    """``(fast, decoder)``: whether fast decoding is on (``--fast_decoding``), and the ``GreedyDecoder`` to decode
    with (``--decode_loop``; None: ``generate``), on ``device_type`` for the model's ``generation_config``."""
    from utils.decode_loop import STEP_COMPILE, GreedyDecoder, own_loop_chosen

    cuda = device_type == "cuda"
    fast = args.fast_decoding == "on" or (args.fast_decoding == "auto" and cuda)
    if not own_loop_chosen(args.decode_loop, fast=fast, device_type=device_type, do_sample=gen_config.do_sample,
                           generation_config=generation_config):
        return fast, None
    return fast, GreedyDecoder(compile_kwargs=STEP_COMPILE if fast and cuda else None)  # compiled on a GPU only


def out_of_memory_message(args: argparse.Namespace, gen_config, log_dir: pathlib.Path, error: str) -> str:
    """What to do when a batch does not fit the GPU (the test set runs longest prompts first, so it is usually the
    first): smaller batches, or bf16, and how to keep the batches already finished."""
    rows = f"{args.batch_size} prompts" + (f" x {gen_config.num_return_sequences} samples"
                                           if gen_config.num_return_sequences > 1 else "")
    resume = "--resume instead of --overwrite" if args.overwrite else "--resume"
    smaller = (f"rerun with {resume} --log_dir {log_dir} and a lower --batch_size (the finished batches are kept)"
               if not gen_config.do_sample else
               f"rerun with a lower --batch_size and --overwrite (sampling draws per batch, so --resume keeps the "
               f"batch size)")
    bf16 = ("; --dtype bf16 halves the weights and the KV cache (a new run: --overwrite, since --resume keeps the "
            "dtype)" if args.dtype == "fp32" else "")
    return f"out of GPU memory decoding batches of {rows} ({error.splitlines()[0]}): {smaller}{bf16}"


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    gen_config = check_args(args)
    method = resolve_method(args)
    warn_if_tuned_for_another_task(args)
    check_trained_on_this_mbpp_split(args)
    on_interrupt("stopped while the model and data loaded, before the run wrote anything: rerun the same command")

    import torch
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list

    from utils.data import default_data_path, load_task_split
    from utils.decode_loop import check_plain_greedy
    from utils.fast_paths import static_cache_kwargs
    from utils.generation import generate_predictions
    from utils.models import check_fits_context
    from utils.prediction_files import (DECODED_BY, ProgressLog, check_fresh_start, check_no_other_task_files,
                                        check_resumable, check_something_to_resume, decoded_by, derived_files,
                                        output_files,
                                        validate_prediction_files, write_config, write_predictions)
    from utils.tasks import get_task

    task = get_task(args.task_name)
    if args.log_dir and not args.resume:  # every process: a refusal on the main one alone would hang the others
        check_no_other_task_files(pathlib.Path(args.log_dir), task)
        if not args.overwrite:
            check_fresh_start(pathlib.Path(args.log_dir), task)
    args.data_path = args.data_path or default_data_path(args.task_name)
    ignore = ("batch_size", "num_processes") if not gen_config.do_sample else ()
    if args.resume:  # what the arguments alone decide, before the model loads (the rest after)
        check_something_to_resume(args.log_dir)
        check_resumable(args.log_dir, run_config(args, method, gen_config, 0, None),
                        (*ignore, "num_processes", "enc_model_type"))
    records = load_task_split(args.task_name, "test", args.data_path, mbpp_split=args.mbpp_split, limit=args.limit)
    model, tokenizer, enc_tokenizer = load_model(args, method)  # fails on a bad checkpoint before any file is written
    try:  # an adapter's m can leave MBPP no prompt budget: say so before the fresh start below clears --log_dir
        max_prompt = task.max_lengths(model.num_virtual_tokens)[0]
    except UserError as exc:
        raise UserError(f"{args.load_adapter_from}: {exc}") from None
    m, budget = model.num_virtual_tokens, gen_config.budget(max_prompt)
    check_fits_context(m + max_prompt + budget, model.lm.config, (f"{m} virtual tokens before " if m else "")
                       + (f"prompts of up to {max_prompt} tokens and {budget} new ones" if task.is_mbpp else
                          f"prompts and generations of up to {max_prompt + budget} tokens"),
                       # MBPP's prompt budget shrinks by m, so only the new tokens can overflow; CRUXEval's total is
                       # fixed without the virtual tokens
                       "lower --max_new_tokens" if task.is_mbpp else "use an adapter with fewer virtual tokens")
    if args.decode_loop == "own":
        check_plain_greedy(model.lm.generation_config)
    accelerator = Accelerator()
    # rank 0 creates it (another -N when a run started in the same second took the default name) and names it to all
    made = str(make_log_dir(args.log_dir or default_log_dir())) if accelerator.is_main_process else None
    log_dir = pathlib.Path(broadcast_object_list([made])[0])
    if accelerator.is_main_process:
        resume = "--resume instead of --overwrite" if args.overwrite else "--resume"
        on_interrupt(f"rerun the same command with {resume} (and --log_dir {log_dir}): it keeps the finished "
                     f"batches and generates the rest")
    fast, decoder = decoding_path(args, accelerator.device.type, gen_config, model.lm.generation_config)
    how = ("the own decoding loop" if decoder else "generate") + (", fast decoding" if fast else "")
    config = run_config(args, method, gen_config, accelerator.num_processes, model.meta.get("enc_model_type"))
    progress = ProgressLog(log_dir)
    lock = None
    try:
        if accelerator.is_main_process:
            lock = lock_directory(log_dir, "--log_dir", "generate_preds.py")  # held until this function returns
            if args.resume:
                check_resumable(log_dir, config, ignore)
                progress.repair()
                config[DECODED_BY] = decoded_by(log_dir, how)
            else:  # a fresh start: no stale results from an earlier run may survive a crash of this one
                progress.reset()
                for name in (*output_files(task), *derived_files(task)):  # (another task's were refused above)
                    (log_dir / name).unlink(missing_ok=True)
                config[DECODED_BY] = [how]
            write_config(log_dir, config)
        accelerator.wait_for_everyone()
        done = progress.read() if args.resume else {}
        todo = [r for r in records if task.record_id(r) not in done]
        model.to(accelerator.device)
        exit_after = int(os.environ.get(EXIT_AFTER_BATCHES_ENV, "0"))
        written = [0]

        def on_batch(fresh: dict, new_tokens: int) -> None:
            progress.append(fresh)
            written[0] += 1
            if exit_after and written[0] >= exit_after:
                os._exit(3)

        start = time.perf_counter()
        try:
            fresh = generate_predictions(model, tokenizer, enc_tokenizer, task, todo, batch_size=args.batch_size,
                                         gen_config=gen_config, accelerator=accelerator,
                                         progress=not args.no_progress, on_batch=on_batch,
                                         generate_kwargs=static_cache_kwargs() if fast else None,
                                         pad_to_multiple_of=64 if fast else None, decoder=decoder)
        except torch.OutOfMemoryError as exc:  # raised on CUDA only; the batches finished before it are kept
            raise UserError(out_of_memory_message(args, gen_config, log_dir, str(exc))) from None
        if accelerator.is_main_process:
            raw = {**done, **fresh}
            paths = write_predictions(log_dir, task, records, raw, gen_config.stop_sequences)
            validate_prediction_files(log_dir, task, [task.record_id(r) for r in records],
                                      gen_config.num_return_sequences)
            print(f"{len(records)} tasks ({len(done)} resumed, {len(fresh)} generated in "
                  f"{time.perf_counter() - start:.1f} s by {how}) -> {', '.join(str(p) for p in paths)}")
        accelerator.wait_for_everyone()
        accelerator.end_training()
    finally:
        if lock is not None:
            lock.close()  # a later run in this process may write here again
    return 0


if __name__ == "__main__":
    sys.exit(main())
