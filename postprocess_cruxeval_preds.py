"""CRUXEval post-processing (spec §6.4): extract the answers from raw completions into output.json.

    python postprocess_cruxeval_preds.py --path logging/run/output_raw.json --mode output

Raw texts may be bare completions (what follows the prompt's [ANSWER]) or still hold the prompt; the prompt
is rebuilt from the dataset (--data_path, default ../shared/data when present) to remove it exactly.
Score the result with evaluate_preds.py.
"""
from __future__ import annotations

import argparse

from utils.cli import ArgumentParser
from utils.errors import cli_entry
from utils.postprocess import postprocess_cruxeval_file


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--path", required=True, help="JSON {id: [raw completion, ...]}")
    p.add_argument("--mode", required=True, choices=("input", "output"), help="the CRUXEval task the file is for")
    p.add_argument("--data_path", default=None, help="the CRUXEval JSONL (to rebuild the prompts)")
    p.add_argument("--out", default=None, help="output file (default: output.json beside --path)")
    p.add_argument("--official_out", default=None,
                   help="also write the answers for facebookresearch/cruxeval's evaluate_generations.py: every id "
                        "of the data (the missing ones empty, so failed); the path must name the mode ('input' in "
                        "it for input prediction, not for output), which that script reads from it")
    return p.parse_args(argv)


@cli_entry
def main(argv=None) -> str:
    args = parse_args(argv)
    out = postprocess_cruxeval_file(args.path, args.mode, args.data_path, args.out, args.official_out)
    print(f"answers: {out}" + (f"\nfor the official script: {args.official_out}" if args.official_out else ""))
    return out


if __name__ == "__main__":
    main()
