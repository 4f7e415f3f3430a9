r"""Writes CT-CHAT training questions (LLaVA JSON) generated from a CT-RATE-shaped release.

  python -m experiments.make_chat_data --ctrate-root DIR --split train --out FILE.json \
      [--seed 0] [--yes-no-per-volume 4] [--multiple-choice-per-volume 1] \
      [--short-answer-per-volume 1] [--report-per-volume 1]

Reads only the release's labels and reports CSVs (see ct_rate_jax/chat/synthetic_qa.py
and docs/chat.md); the same arguments give a byte-identical file.
"""

from __future__ import annotations

import argparse
import os
import sys

from experiments import cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.make_chat_data",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--ctrate-root", required=True,
                        help="the release's dataset/ folder or the folder containing it")
    parser.add_argument("--split", required=True, choices=("train", "valid"))
    parser.add_argument("--out", required=True, help="FILE.json to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--yes-no-per-volume", type=int, default=4)
    parser.add_argument("--multiple-choice-per-volume", type=int, default=1)
    parser.add_argument("--short-answer-per-volume", type=int, default=1)
    parser.add_argument("--report-per-volume", type=int, default=1)
    return parser.parse_args(argv)


def make(args: argparse.Namespace) -> dict[str, int]:
    from ct_rate_jax.chat import conversation, synthetic_qa

    if not args.out.endswith(".json"):
        raise ValueError(f"--out {args.out} must end in .json")
    settings = synthetic_qa.QASettings(
        yes_no_per_volume=args.yes_no_per_volume,
        multiple_choice_per_volume=args.multiple_choice_per_volume,
        short_answer_per_volume=args.short_answer_per_volume,
        report_per_volume=args.report_per_volume, seed=args.seed)
    records = synthetic_qa.make_chat_data(args.ctrate_root, args.split, settings)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    temporary = args.out + ".tmp"
    conversation.write_records(temporary, records)
    os.replace(temporary, args.out)  # never leave a half-written file under the real name
    counts = synthetic_qa.summarize(records)
    print(f"wrote {len(records)} questions about {counts['volumes']} volumes to {args.out}: "
          + ", ".join(f"{counts[k]} {k}" for k in synthetic_qa.KINDS)
          + f" ({counts['yes']} yes / {counts['no']} no)")
    return counts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return cli.run_command(lambda: make(args))


if __name__ == "__main__":
    sys.exit(main())
