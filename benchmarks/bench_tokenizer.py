"""A 32k byte-level BPE trained on the Python standard library: real-looking token counts for benchmarks.

The paper's models' tokenizers cannot be downloaded on the benchmark machines; padding and generation lengths
only need a code tokenizer of similar granularity. Trained once per machine (a few seconds), then cached.
"""
from __future__ import annotations

import pathlib
import sysconfig

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CACHE = pathlib.Path.home() / ".cache" / "lopa-peft" / "bench_bpe_32k.json"


def bench_tokenizer(small: bool = False) -> PreTrainedTokenizerFast:
    if small:
        from utils.models import tiny_tokenizer

        return tiny_tokenizer()
    if not CACHE.exists():
        stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
        files = sorted(stdlib.rglob("*.py"))[:3000]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=32000, special_tokens=["<|endoftext|>"], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator((f.read_text(encoding="utf-8", errors="ignore") for f in files), trainer=trainer)
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(CACHE))
    return PreTrainedTokenizerFast(tokenizer_file=str(CACHE), bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
