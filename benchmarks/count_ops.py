"""Operation counts behind BENCHMARKS.md's host-cost estimates (any machine; deterministic; no timing).

On a GPU each eager torch operation costs the host some microseconds to issue, whatever its size, and a compiled
region costs one launch per kernel. Where the host sets a step's pace, these counts are what its work scales with:

* ``encoder``: operations an eager forward of the frozen encoder dispatches (CodeBERT-base's architecture; random
  weights, a short batch: the count does not depend on the width), without and with its training dropout;
* ``decode_step``: operations of one eager decoding step of phi-2's architecture through ``generate`` (its 32 layers at
  a small width; ``hf-generate``'s per-step time divided by it gives the host's cost per operation);
* ``layer_graphs``: the operations and matrix products in the forward and backward graphs AOT autograd hands
  inductor for one decoder layer of deepseek-coder-1.3b's structure (small width), per method. Each matrix product
  stays its own kernel launch after inductor fuses the pointwise work around it;
* ``outside_layers``: the operations of one eager training step (forward, backward, optimizer) outside the decoder
  layers, per method (deepseek's structure at a small width): what LOPA's encoder and heads add to PT's step.

    python -m benchmarks.count_ops            # prints one JSON line per count
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import benchmarks.common  # noqa: F401  (puts the project root on sys.path)
from benchmarks.common import argument_parser
from utils import registry
from utils.registry import FoundationModelSpec

SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4, vocab_size=2048)
MATMULS = {"aten.mm.default", "aten.addmm.default", "aten.bmm.default"}


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def encoder_ops(encoder: str = "codebert-base") -> dict:
    from utils.encoders import load_encoder

    enc = load_encoder(encoder, random_weights=True)[0]
    ids = torch.randint(5, 1000, (2, 16))
    out = {}
    for name, train in (("eval", False), ("train", True)):
        enc.train(train)
        with torch.no_grad(), CountOps() as ops:
            enc(ids, torch.ones_like(ids), padded=False)
        out[name] = ops.count
    return {"count": "encoder", "encoder": encoder, "ops_eval": out["eval"], "ops_train": out["train"],
            "note": "on the CPU, SDPA with dropout falls back to unfused attention: train overstates a GPU's"}


def decode_step_ops() -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = dict(registry.PHI2_ARCH, **SMALL)
    model_type = arch.pop("model_type")
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **arch)).eval()
    ids = torch.randint(5, 1000, (1, 128))
    counts = []
    for new in (8, 16):
        with torch.no_grad(), CountOps() as ops:
            lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                        do_sample=False, pad_token_id=0)
        counts.append(ops.count)
    return {"count": "decode_step", "model": "phi-2", "layers": arch["num_hidden_layers"],
            "ops_per_step": (counts[1] - counts[0]) / 8}


SMALL_DEEPSEEK = "deepseek-coder-1.3b-base (small width)"


@contextlib.contextmanager
def small_deepseek(layers: int):
    """Within the block, ``SMALL_DEEPSEEK`` is a registry model type: deepseek-coder-1.3b's structure at a small width
    with ``layers`` layers (built offline, like the tiny models)."""
    arch = dict(registry.DEEPSEEK_1_3B_ARCH, **SMALL, num_hidden_layers=layers)
    registry.FOUNDATION_MODELS[SMALL_DEEPSEEK] = FoundationModelSpec(
        SMALL_DEEPSEEK, None, ("q_proj", "k_proj", "v_proj"), 64, arch, tiny=True, adds_bos=True)
    try:
        yield SMALL_DEEPSEEK
    finally:
        registry.FOUNDATION_MODELS.pop(SMALL_DEEPSEEK, None)


def layer_graph_ops(methods=("pt", "lora", "lopa")) -> list[dict]:
    from torch._dynamo.backends.common import aot_autograd

    from benchmarks.bench_train import random_batch
    from custom_peft import build_model
    from utils.fast_paths import compile_layers

    rows = []
    try:
        with small_deepseek(layers=2) as name:
            for method in methods:
                torch.compiler.reset()
                graphs = collections.defaultdict(list)

                def counter(kind):
                    def compile_graph(gm, example_inputs):
                        calls = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
                        graphs[kind].append((len(calls), sum(c in MATMULS for c in calls)))
                        return gm.forward
                    return compile_graph

                model, _ = build_model(method, name, enc_model_type="tiny-roberta", num_virtual_tokens=10, seed=0)
                model.packing = True
                model.train()
                compile_layers(model.lm, backend=aot_autograd(fw_compiler=counter("forward"),
                                                              bw_compiler=counter("backward")))
                model(**random_batch(argparse.Namespace(batch_size=2, seq_len=32), 2048, 2048)).loss.backward()
                # the graphs every layer but the first runs: LoRA's first layer has its own (its input needs no
                # gradient); forward graphs compile in layer order, backward ones in reverse
                (fw_ops, fw_mm), (bw_ops, bw_mm) = graphs["forward"][-1], graphs["backward"][0]
                rows.append({"count": "layer_graphs", "model": "deepseek-coder-1.3b-base", "method": method,
                             "forward_ops": fw_ops, "forward_matmuls": fw_mm, "backward_ops": bw_ops,
                             "backward_matmuls": bw_mm, "graphs": len(graphs["forward"]) + len(graphs["backward"])})
    finally:
        torch.compiler.reset()
    return rows


def outside_layer_ops(methods=("pt", "lopa")) -> list[dict]:
    """Operations of one eager training step (forward, backward, optimizer) outside the decoder layers, per method:
    a 1-layer model's count minus the per-layer count of a 2-layer one (deepseek's structure at a small width,
    CodeBERT-base's encoder, batch 2 × 16, after one warm step; CPU AdamW, unfused)."""
    from benchmarks.bench_train import random_batch
    from custom_peft import build_model
    from utils.fast_paths import make_adamw

    counts = {}
    for layers in (1, 2):
        with small_deepseek(layers) as name:
            for method in methods:
                model, _ = build_model(method, name, enc_model_type="codebert-base", random_weights=True, seed=0)
                model.packing = True
                model.train()
                opt = make_adamw(model.parameters(), lr=1e-4)
                batch = random_batch(argparse.Namespace(batch_size=2, seq_len=16), 1000, 1000)
                for _ in range(2):  # the second step counts: the first one creates the optimizer's state
                    ops = [CountOps() for _ in range(3)]
                    with ops[0]:
                        loss = model(**batch).loss
                    with ops[1]:
                        loss.backward()
                    with ops[2]:
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                counts[method, layers] = [o.count for o in ops]
    rows = []
    for method in methods:
        one, two = counts[method, 1], counts[method, 2]
        outside = [2 * a - b for a, b in zip(one, two)]
        rows.append({"count": "outside_layers", "model": "deepseek-coder-1.3b-base", "method": method,
                     "forward_ops": outside[0], "backward_ops": outside[1], "optimizer_ops": outside[2],
                     "per_layer_forward_ops": two[0] - one[0], "per_layer_backward_ops": two[1] - one[1]})
    return rows


def main(argv=None) -> list[dict]:
    p = argument_parser(__doc__)
    p.add_argument("--only", choices=("encoder", "decode_step", "layer_graphs", "outside_layers"), default=None)
    args = p.parse_args(argv)
    rows = []
    if args.only in (None, "encoder"):
        rows.append(encoder_ops())
    if args.only in (None, "decode_step"):
        rows.append(decode_step_ops())
    if args.only in (None, "layer_graphs"):
        rows.extend(layer_graph_ops())
    if args.only in (None, "outside_layers"):
        rows.extend(outside_layer_ops())
    for row in rows:
        print(json.dumps(row))
    return rows


if __name__ == "__main__":
    main()
