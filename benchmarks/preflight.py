"""CPU pre-flight of the GPU benchmark run: the code paths of every ``gpu_run.sh`` section on the real
architectures' widths, heads, vocabularies and RoPE settings, cut to one layer and CPU-sized shapes, so that a shape
or config bug shows here and not in the device minutes. The figures are not GPU figures: they go to a temporary
file, never to benchmarks/results.jsonl.

    python -m benchmarks.preflight                     # phi-2, deepseek-coder-1.3b, Llama-3-8B (~11 min, 2 cores)
    python -m benchmarks.preflight --models deepseek-coder-1.3b-base --train_methods lopa --gen_methods none

Exit code 1 (naming the runs) when any method failed. Compilation is off (its CUDA paths cannot run here; the
test suite checks compiled against eager on the CPU). Llama-3's FFT is left out by default: its 128k vocabulary
alone needs ~9 GiB for weights, gradients and AdamW states.
"""
from __future__ import annotations

import contextlib
import tempfile

from benchmarks.common import argument_parser
from utils.registry import get_encoder_spec, get_model_spec

MODELS = ("phi-2", "deepseek-coder-1.3b-base", "Meta-Llama-3-8B")
TRAIN_METHODS = "peft-pt,pt,lopa,peft-lora,lora,idpg,fft"
GEN_METHODS = "hf-generate,none,none-own,lopa,lopa-own,pt,none-own-full"  # as gpu_run.sh


@contextlib.contextmanager
def one_layer(specs):
    """The specs' ``num_hidden_layers`` set to 1 for the duration (every other config value stays real)."""
    saved = [(spec, spec.arch["num_hidden_layers"]) for spec in specs]
    try:
        for spec, _ in saved:
            spec.arch["num_hidden_layers"] = 1
        yield
    finally:
        for spec, layers in saved:
            spec.arch["num_hidden_layers"] = layers


def runs(args, results: str):
    """``(name, bench main, argv)`` for every section asked for."""
    from benchmarks import bench_generate, bench_train

    small = ["--results", results, "--encoder", args.encoder]
    for model in args.models.split(","):
        methods = args.train_methods or (TRAIN_METHODS.replace(",fft", "") if model == "Meta-Llama-3-8B"
                                         else TRAIN_METHODS)
        padding = ["--padding", "--padding_batches", "2", "--data_path", args.data_path] if args.data_path else []
        yield (f"train {model}", bench_train.main,
               ["--model", model, "--methods", methods, "--batch_size", "2", "--seq_len", "64", "--steps", "1",
                "--warmup", "1", "--no_compile", *small, *(padding if model == "phi-2" else [])])
        yield (f"generate {model}", bench_generate.main,
               ["--model", model, "--methods", args.gen_methods, "--batch_sizes", "2", "--new_tokens", "6",
                "--warmup_tokens", "2", "--check_tokens", "4", "--check_rows", "2", "--pad_multiple", "8", *small,
                *(["--data_path", args.data_path] if args.data_path else [])])


def main(argv=None) -> list[str]:
    p = argument_parser(__doc__)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--train_methods", default=None, help=f"default {TRAIN_METHODS} (Llama-3: without fft)")
    p.add_argument("--gen_methods", default=GEN_METHODS)
    p.add_argument("--encoder", default="codebert-base")
    p.add_argument("--data_path", default=None, help="MBPP JSONL: also runs phi-2's padding section on it")
    args = p.parse_args(argv)
    specs = [get_model_spec(m) for m in args.models.split(",")] + [get_encoder_spec(args.encoder)]
    unbuilt = [spec.name for spec in specs if "num_hidden_layers" not in spec.arch]
    if unbuilt:  # only the registry's architecture configs can be cut to one layer
        p.error(f"{', '.join(unbuilt)}: no architecture config in utils/registry.py; --models takes "
                f"{', '.join(MODELS)}, --encoder codebert-base")
    failed = []
    with tempfile.TemporaryDirectory() as tmp, one_layer(specs):
        for name, bench_main, bench_argv in runs(args, f"{tmp}/results.jsonl"):
            print(f"=== {name}", flush=True)
            try:
                bench_main(bench_argv)
            except SystemExit as exc:  # the bench scripts exit naming their failed methods
                failed.append(f"{name}: {exc}")
    print("preflight: " + ("; ".join(failed) if failed else "every run passed"))
    if failed:
        raise SystemExit(1)
    return failed


if __name__ == "__main__":
    main()
