"""Train the small byte-level BPE that tiny models use, and write it to utils/assets/.

The file is committed, so nothing here runs at test time; rerun this only to change the tokenizer.
Corpus: the Python standard library's own sources (on every machine, no download), read in sorted order.
"""
from __future__ import annotations

import pathlib
import sysconfig

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL = ["<|endoftext|>", "<s>", "</s>", "<pad>"]
OUT = pathlib.Path(__file__).resolve().parents[1] / "utils" / "assets" / "code_bpe_2048.json"


def corpus(limit_chars: int = 1_700_000):
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="ignore")
        total += len(text)
        yield text
        if total > limit_chars:
            return


def main() -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(OUT))
    print(f"wrote {OUT} ({tok.get_vocab_size()} tokens)")


if __name__ == "__main__":
    main()
