"""Scores for generated CT-CHAT answers against reference answers, per question type.

BLEU-1..4, METEOR, ROUGE-L and CIDEr(-D) come from `pycocoevalcap` (the MS-COCO caption
evaluation code), the same scorers CT-CHAT's own evaluation
(`evaluations/new_llm_metrics.py`) calls, on the same input: whole answers split on
whitespace, no PTB tokenisation (that step needs Java and the original skips it).
BLEU is the corpus score (n-gram counts pooled over the answers), the others the mean
over answers.  CIDEr's n-gram weights come from the evaluated references themselves, so
it depends on the set (a single answer always scores 0).  METEOR is the bundled
Meteor 1.5 jar and needs a `java` on PATH; without one it is reported as None with the
reason, never replaced by another implementation.

Accuracy is computed for closed questions: yes / no questions (the reference answer
starts with "yes" or "no") compare that first word; multiple-choice questions compare
the option letter (the first "(a)"-style letter, or a leading "a)" / "a."), or the
whole normalised answer when the reference names no letter.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

# The original's evaluation groups question types into four categories.
CATEGORIES = {"conversation": "long_answer", "free_response": "long_answer",
              "description": "long_answer", "multiple_choice": "multiple_choice",
              "short_answer": "short_answer", "report_generation": "report_generation"}
# Stop / template tokens the original strips from generated answers.
_STRIP_TOKENS = ("<s>", "</s>", "<|eot_id|>", "<|end_of_text|>")
_LETTER = re.compile(r"\(([a-z])\)")
_LEADING_LETTER = re.compile(r"^([a-z])[).:]\s")
_WORDS = re.compile(r"[a-z0-9]+")
METRIC_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def clean_answer(text: str) -> str:
    """A generated answer without stop tokens, on one line (words kept apart)."""
    for token in _STRIP_TOKENS:
        text = text.replace(token, "")
    return " ".join(text.split())


def _normalised(text: str) -> str:
    return " ".join(_WORDS.findall(text.lower()))


def yes_no(text: str) -> str | None:
    """"yes" / "no" when the answer starts with that word, else None."""
    words = _WORDS.findall(text.lower())
    return words[0] if words and words[0] in ("yes", "no") else None


def option_letter(text: str) -> str | None:
    """The chosen option of a multiple-choice answer: "(b) Emphysema." -> "b"."""
    lowered = text.strip().lower()
    found = _LETTER.search(lowered) or _LEADING_LETTER.match(lowered + " ")
    return found.group(1) if found else None


def closed_question_kind(question_type: str, reference: str) -> str | None:
    """"yes_no", "multiple_choice" or None (an open question: no accuracy)."""
    if yes_no(reference) is not None:
        return "yes_no"
    if question_type == "multiple_choice":
        return "multiple_choice"
    return None


def is_correct(kind: str, prediction: str, reference: str) -> bool:
    if kind == "yes_no":
        return yes_no(prediction) == yes_no(reference)
    expected = option_letter(reference)
    if expected is not None:
        return option_letter(prediction) == expected
    return _normalised(prediction) == _normalised(reference)


def meteor_available() -> bool:
    return shutil.which("java") is not None


def _stop_meteor(scorer) -> None:
    """Ends the Meteor Java process now (pycocoevalcap only does so on garbage collection)."""
    scorer.meteor_p.stdin.close()
    scorer.meteor_p.kill()
    scorer.meteor_p.wait()


def text_scores(predictions: Sequence[str], references: Sequence[Sequence[str]], *,
                meteor: bool = True, meteor_scorer=None) -> dict[str, Any]:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr of `predictions[i]` against the reference
    answers `references[i]` (one or more each), with pycocoevalcap.

    METEOR is None (with "METEOR_note") when `meteor` is False or Java is missing;
    `meteor_scorer` (a running pycocoevalcap `Meteor`) saves starting a new Java
    process, which loads Meteor's paraphrase table each time.
    """
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError as error:
        raise ImportError("text metrics need pycocoevalcap (pip install "
                          "'ct-rate-jax[chat-eval]')") from error
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return {}
    res = {i: [clean_answer(p)] for i, p in enumerate(predictions)}
    gts = {i: [clean_answer(r) for r in refs] for i, refs in enumerate(references)}
    if any(not refs for refs in gts.values()):
        raise ValueError("every prediction needs at least one reference answer")
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores: dict[str, Any] = {f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)}
    scores["METEOR"] = None
    if meteor and meteor_scorer is not None:
        scores["METEOR"] = float(meteor_scorer.compute_score(gts, res)[0])
    elif meteor and meteor_available():
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        try:
            scores["METEOR"] = float(scorer.compute_score(gts, res)[0])
        finally:
            _stop_meteor(scorer)
    else:
        scores["METEOR_note"] = ("not computed: " + ("--no-meteor" if not meteor else
                                 "METEOR 1.5 (pycocoevalcap) needs java on PATH"))
    scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return scores


def score_answers(items: Sequence[Mapping[str, Any]], *, meteor: bool = True
                  ) -> dict[str, dict[str, Any]]:
    """Scores per group: each question type, each of the original's four categories
    (`category:long_answer`, ...) and `all`.

    items: {"type": question type, "prediction": str, "reference": str}.
    Returns group -> {"count", text metrics, and for closed questions "accuracy",
    "accuracy_count" (how many were closed)}.
    """
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for item in items:
        for group in (item["type"], f"category:{CATEGORIES[item['type']]}", "all"):
            groups.setdefault(group, []).append(item)
    result = {}
    meteor_scorer = None
    if meteor and items and meteor_available():
        from pycocoevalcap.meteor.meteor import Meteor

        meteor_scorer = Meteor()  # one Java process for every group
    try:
        for group, members in sorted(groups.items()):
            result[group] = _group_scores(members, meteor, meteor_scorer)
    finally:
        if meteor_scorer is not None:
            _stop_meteor(meteor_scorer)
    return result


def _group_scores(members, meteor: bool, meteor_scorer) -> dict[str, Any]:
    scores: dict[str, Any] = {"count": len(members)}
    scores.update(text_scores([m["prediction"] for m in members],
                              [[m["reference"]] for m in members], meteor=meteor,
                              meteor_scorer=meteor_scorer))
    closed = [(kind, m) for m in members
              if (kind := closed_question_kind(m["type"], m["reference"])) is not None]
    if closed:
        correct = sum(is_correct(kind, m["prediction"], m["reference"]) for kind, m in closed)
        scores["accuracy"] = correct / len(closed)
        scores["accuracy_count"] = len(closed)
    return scores
