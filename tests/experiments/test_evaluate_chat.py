"""experiments.evaluate_chat and chat_metrics: hand-checked scores on tiny answer sets."""

from __future__ import annotations

import json
import shutil

import pytest

from ct_rate_jax.chat import chat_metrics
from experiments import evaluate_chat

pytest.importorskip("pycocoevalcap")


def _record(rid, turns, image="valid_1_a_1.nii.gz"):
    conversations = []
    for question, kind, answer in turns:
        conversations.append({"from": "human", "value": f"<image>\n{question} <short_answer>",
                              "type": kind})
        conversations.append({"from": "gpt", "value": answer})
    return {"id": rid, "image": image, "conversations": conversations}


REFERENCES = [
    _record("r1", [("Is there cardiomegaly in this CT volume?", "short_answer", "Yes.")]),
    _record("r2", [("Is there emphysema in this CT volume?", "short_answer", "No.")]),
    _record("r3", [("Which is seen? (a) Atelectasis (b) Emphysema (c) Mosaic attenuation "
                    "pattern (d) Lung nodule", "multiple_choice", "(b) Emphysema.")]),
    _record("r4", [("Generate the report.", "report_generation", "the heart is enlarged"),
                   ("Describe the image.", "free_response", "the cat sat on the mat")]),
]
ANSWERS = {"r1": "Yes, there is.<|eot_id|>", "r2": "Yes.", "r3": "(b) Emphysema.",
           "r4#0": "the heart is normal", "r4#1": "the cat sat on a mat"}


def test_closed_question_parsing():
    assert chat_metrics.yes_no("Yes, there is.") == "yes"
    assert chat_metrics.yes_no("No.") == "no"
    assert chat_metrics.yes_no("There is no nodule.") is None
    assert chat_metrics.option_letter("(c) Mosaic attenuation pattern.") == "c"
    assert chat_metrics.option_letter("b) Emphysema") == "b"
    assert chat_metrics.option_letter("Emphysema") is None
    assert chat_metrics.clean_answer("<s> Yes.\nIt is.</s><|eot_id|>") == "Yes. It is."
    assert chat_metrics.is_correct("multiple_choice", "Emphysema.", "emphysema")


def test_perfect_answers_and_the_set_dependence_of_cider():
    refs = [["there is a nodule in the left lung"], ["the heart is enlarged"]]
    perfect = chat_metrics.text_scores([r[0] for r in refs], refs, meteor=False)
    assert perfect["BLEU-1"] == pytest.approx(1.0) and perfect["BLEU-4"] == pytest.approx(1.0)
    assert perfect["ROUGE-L"] == pytest.approx(1.0)
    assert perfect["CIDEr"] == pytest.approx(10.0)  # CIDEr-D of an exact match: 10
    assert perfect["METEOR"] is None and "--no-meteor" in perfect["METEOR_note"]
    single = chat_metrics.text_scores(["the heart is enlarged"], [["the heart is enlarged"]],
                                      meteor=False)
    assert single["CIDEr"] == 0.0  # one reference document: every n-gram has IDF 0


def test_cli_scores_per_type_and_category(tmp_path):
    references = tmp_path / "valid.json"
    references.write_text(json.dumps(REFERENCES))
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"id": i, "question": "q", "answer": a}) + "\n"
                               for i, a in ANSWERS.items()))
    out = tmp_path / "scores"
    assert evaluate_chat.main(["--answers", str(answers), "--references", str(references),
                               "--out", str(out), "--no-meteor"]) == 0
    groups = json.loads((out / "scores.json").read_text())["groups"]
    assert sorted(groups) == sorted([
        "all", "short_answer", "multiple_choice", "report_generation", "free_response",
        "category:short_answer", "category:multiple_choice", "category:report_generation",
        "category:long_answer"])
    # "the cat sat on a mat" vs "the cat sat on the mat": 5 of 6 unigrams, 3 of 5 bigrams,
    # longest common subsequence 5 of 6 words.
    free = groups["free_response"]
    assert free["BLEU-1"] == pytest.approx(5 / 6)
    assert free["BLEU-2"] == pytest.approx((5 / 6 * 3 / 5) ** 0.5)
    assert free["ROUGE-L"] == pytest.approx(5 / 6)
    assert "accuracy" not in free
    assert groups["category:long_answer"]["count"] == 1
    assert groups["short_answer"]["accuracy"] == 0.5  # "Yes, there is." right; "Yes." wrong
    assert groups["multiple_choice"]["accuracy"] == 1.0
    assert groups["multiple_choice"]["ROUGE-L"] == pytest.approx(1.0)
    assert groups["all"]["accuracy"] == pytest.approx(2 / 3)
    assert groups["all"]["accuracy_count"] == 3 and groups["all"]["count"] == 5
    # "the heart is normal" vs "the heart is enlarged": 3/4 unigrams, 2/3 bigrams, 1/2 trigrams.
    expected_bleu3 = (3 / 4 * 2 / 3 * 1 / 2) ** (1 / 3)
    assert groups["report_generation"]["BLEU-3"] == pytest.approx(expected_bleu3)
    rows = (out / "scores.csv").read_text().splitlines()
    assert rows[0].startswith("group,count,BLEU-1") and len(rows) == 10
    per_question = [json.loads(line)
                    for line in (out / "per_question.jsonl").read_text().splitlines()]
    assert [(q["id"], q["correct"]) for q in per_question] == [
        ("r1", True), ("r2", False), ("r3", True), ("r4#0", None), ("r4#1", None)]
    assert per_question[0]["question"] == "Is there cardiomegaly in this CT volume?"


def test_write_batch_and_errors(tmp_path, capsys):
    references = tmp_path / "valid.json"
    references.write_text(json.dumps(REFERENCES))
    batch = tmp_path / "questions.jsonl"
    assert evaluate_chat.main(["--references", str(references), "--write-batch", str(batch)]) == 0
    lines = [json.loads(line) for line in batch.read_text().splitlines()]
    assert [line["id"] for line in lines] == list(ANSWERS)
    assert lines[3] == {"id": "r4#0", "question": "Generate the report.",
                        "type": "report_generation", "image": "valid_1_a_1.nii.gz"}

    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"id": "r1", "answer": "Yes."}) + "\n")
    out = str(tmp_path / "o")
    assert evaluate_chat.main(["--answers", str(answers), "--references", str(references),
                               "--out", out, "--no-meteor"]) == 1
    assert "4 of 5 questions have no answer" in capsys.readouterr().err
    assert evaluate_chat.main(["--answers", str(answers), "--references", str(references),
                               "--out", out, "--no-meteor", "--allow-missing"]) == 0
    capsys.readouterr()
    answers.write_text(json.dumps({"id": "zzz", "answer": "Yes."}) + "\n")
    assert evaluate_chat.main(["--answers", str(answers), "--references", str(references),
                               "--out", out]) == 1
    assert "not in" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([_record("x", [("q", "chit_chat", "a")])]))
    assert evaluate_chat.main(["--references", str(bad), "--write-batch", str(batch)]) == 1
    assert "unknown type 'chit_chat'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR 1.5 needs java")
def test_meteor_with_the_bundled_jar():
    from pycocoevalcap.meteor.meteor import Meteor

    refs = [["there is a nodule in the left lung"], ["the heart is enlarged"]]
    scorer = Meteor()  # one Java start (it loads Meteor's paraphrase table)
    try:
        perfect = chat_metrics.text_scores([r[0] for r in refs], refs, meteor_scorer=scorer)
        wrong = chat_metrics.text_scores(["no nodule", "normal lungs"], refs,
                                         meteor_scorer=scorer)
    finally:
        chat_metrics._stop_meteor(scorer)
    assert 0.9 < perfect["METEOR"] <= 1.0
    assert 0.0 <= wrong["METEOR"] < 0.3
