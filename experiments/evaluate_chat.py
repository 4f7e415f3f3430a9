r"""Scores generated CT-CHAT answers against reference answers, per question type.

  python -m experiments.evaluate_chat --answers answers.jsonl --references valid.json --out DIR
  python -m experiments.evaluate_chat --references valid.json --write-batch questions.jsonl

--references is a LLaVA JSON list (the validation questions: records with
`conversations`, the answer being the "gpt" turn after each typed "human" turn) or JSON
lines {"id", "question", "type", "answer"}.  A record's question is identified by the
record id when it has one question, else by "<id>#<k>" (k = 0, 1, ... its questions in
order); --write-batch writes exactly these ids, with the question, type and image, as
the JSON lines `python -m experiments.chat --batch` reads.  --answers holds one JSON line
{"id", "answer"} per question (what `experiments.chat --batch --out` writes).

DIR receives scores.json (per question type, per the original's four categories and
`all`: BLEU-1..4, METEOR, ROUGE-L, CIDEr, and accuracy of yes / no and multiple-choice
questions), scores.csv (the same as a table) and per_question.jsonl.  Metrics and their
caveats: ct_rate_jax.chat.chat_metrics and docs/chat.md ("Evaluating answers").
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from typing import Any

from experiments import cli


def _question_items(record) -> list[dict[str, Any]]:
    """(question, type, reference answer) of each typed human turn followed by an answer."""
    from ct_rate_jax.chat.conversation import strip_tags

    items = []
    turns = record.turns
    for k in range(len(turns) - 1):
        if turns[k].speaker == "human" and turns[k + 1].speaker == "gpt":
            items.append({"question": strip_tags(turns[k].value), "type": turns[k].type,
                          "reference": turns[k + 1].value, "image": record.image})
    if len(items) == 1:
        items[0]["id"] = record.id
    else:
        for k, item in enumerate(items):
            item["id"] = f"{record.id}#{k}"
    return items


def read_references(path: str) -> dict[str, dict[str, Any]]:
    """question id -> {"id", "question", "type", "reference", "image"}."""
    from ct_rate_jax.chat import conversation as conv

    if not os.path.isfile(path):
        raise FileNotFoundError(f"references not found: {path}")
    items = []
    if path.endswith(".jsonl"):
        for number, line in cli.read_json_lines(path):
            missing = [k for k in ("id", "question", "answer") if k not in line]
            if missing:
                raise ValueError(f"{path} line {number}: missing {missing}")
            items.append({"id": str(line["id"]), "question": line["question"],
                          "type": line.get("type"), "reference": line["answer"],
                          "image": line.get("image")})
    else:
        for record in conv.read_records(path):
            items.extend(_question_items(record))
    by_id: dict[str, dict[str, Any]] = {}
    for item in items:
        if item["id"] in by_id:
            raise ValueError(f"{path}: question id {item['id']!r} appears twice")
        if item["type"] not in conv.QUESTION_TYPES:
            raise ValueError(f"{path}: question {item['id']!r} has type {item['type']!r}; "
                             f"expected one of {conv.QUESTION_TYPES}")
        by_id[item["id"]] = item
    if not by_id:
        raise ValueError(f"{path} holds no question with an answer")
    return by_id


def read_answers(path: str) -> dict[str, str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"answers not found: {path}")
    answers = {}
    for number, line in cli.read_json_lines(path):
        if "id" not in line or not isinstance(line.get("answer"), str):
            raise ValueError(f"{path} line {number}: expected {{\"id\": ..., \"answer\": str}}")
        if str(line["id"]) in answers:
            raise ValueError(f"{path}: id {line['id']!r} answered twice")
        answers[str(line["id"])] = line["answer"]
    return answers


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.evaluate_chat",
        description="BLEU-1..4, METEOR, ROUGE-L, CIDEr and closed-question accuracy of "
                    "generated answers, per question type.")
    parser.add_argument("--references", required=True,
                        help="LLaVA JSON list, or JSON lines {id, question, type, answer}")
    parser.add_argument("--answers", help="JSON lines {id, answer}")
    parser.add_argument("--out", help="output directory (scores.json, scores.csv, "
                                      "per_question.jsonl)")
    parser.add_argument("--write-batch", "--write_batch", dest="write_batch",
                        help="instead of scoring: write the questions as chat --batch input")
    parser.add_argument("--allow-missing", "--allow_missing", dest="allow_missing",
                        action="store_true", help="score the answered questions only")
    parser.add_argument("--no-meteor", "--no_meteor", dest="meteor", action="store_false",
                        help="skip METEOR (it starts a Java process)")
    args = parser.parse_args(argv)
    if not args.write_batch and not (args.answers and args.out):
        parser.error("give --answers and --out, or --write-batch")
    return args


def write_batch(references: dict[str, dict[str, Any]], path: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for item in references.values():
            handle.write(json.dumps({"id": item["id"], "question": item["question"],
                                     "type": item["type"], "image": item["image"]}) + "\n")
    print(f"wrote {len(references)} questions to {path}")


def work(args: argparse.Namespace) -> dict[str, Any] | None:
    from ct_rate_jax.chat import chat_metrics

    references = read_references(args.references)
    if args.write_batch:
        write_batch(references, args.write_batch)
        return None
    answers = read_answers(args.answers)
    unknown = sorted(set(answers) - set(references))
    if unknown:
        raise ValueError(f"{args.answers}: {len(unknown)} answer id(s) not in "
                         f"{args.references}, e.g. {unknown[:5]}")
    missing = [i for i in references if i not in answers]
    if missing and not args.allow_missing:
        raise ValueError(f"{args.answers}: {len(missing)} of {len(references)} questions have "
                         f"no answer, e.g. {missing[:5]} (--allow-missing scores the rest)")
    items = [{**ref, "prediction": answers[i]} for i, ref in references.items() if i in answers]
    scores = chat_metrics.score_answers(items, meteor=args.meteor)
    os.makedirs(args.out, exist_ok=True)
    summary = {"references": args.references, "answers": args.answers,
               "answered": len(items), "missing": len(missing), "groups": scores}
    with open(os.path.join(args.out, "scores.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    columns = ["count", *chat_metrics.METRIC_NAMES, "accuracy", "accuracy_count"]
    with open(os.path.join(args.out, "scores.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["group", *columns])
        for group, values in scores.items():
            writer.writerow([group, *("" if values.get(c) is None else values[c]
                                      for c in columns)])
    with open(os.path.join(args.out, "per_question.jsonl"), "w", encoding="utf-8") as handle:
        for item in items:
            kind = chat_metrics.closed_question_kind(item["type"], item["reference"])
            correct = (None if kind is None else
                       chat_metrics.is_correct(kind, item["prediction"], item["reference"]))
            handle.write(json.dumps({k: item[k] for k in ("id", "type", "question", "reference",
                                                          "prediction")}
                                    | {"closed": kind, "correct": correct}) + "\n")
    _print_table(scores, columns)
    if "METEOR_note" in scores.get("all", {}):
        print(f"METEOR {scores['all']['METEOR_note']}", file=sys.stderr)
    return summary


def _print_table(scores: dict[str, dict[str, Any]], columns: list[str]) -> None:
    print(f"{'group':<28}" + "".join(f"{c[:9]:>10}" for c in columns[:-1]))
    for group, values in scores.items():
        cells = []
        for c in columns[:-1]:
            v = values.get(c)
            cells.append(f"{'-':>10}" if v is None else
                         f"{v:>10d}" if isinstance(v, int) else f"{v:>10.4f}")
        print(f"{group:<28}" + "".join(cells))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return cli.run_command(lambda: work(args))


if __name__ == "__main__":
    raise SystemExit(main())
