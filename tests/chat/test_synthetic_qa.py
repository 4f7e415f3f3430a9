"""Synthetic question-answer records: answers follow the labels, yes/no balance,
determinism, and the make_chat_data command on a synthetic release."""

import json
import re
import subprocess
import sys

import pytest

from ct_rate_jax.chat import synthetic_qa as qa
from ct_rate_jax.chat.conversation import QUESTION_TYPES, parse_record
from data_pipeline.schema import ABNORMALITIES, NUM_ABNORMALITIES

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def _facts(seed=0, count=12):
    import numpy as np
    rng = np.random.default_rng(seed)
    facts = []
    for n in range(count):
        labels = tuple(int(v) for v in (rng.random(NUM_ABNORMALITIES) < 0.3))
        if n == 0:
            labels = (-1,) + labels[1:]  # an empty label cell
        facts.append(qa.VolumeFacts(f"train_{n + 1}_a_1.nii.gz", labels,
                                    f"Findings of volume {n}.", f"Impression {n}."))
    return facts


def _asked_abnormality(question):
    for name in ABNORMALITIES:
        if qa.phrase(name) in question:
            return name
    raise AssertionError(question)


def test_answers_follow_the_labels():
    facts = {f.volume_name: f for f in _facts()}
    records = qa.make_records(list(facts.values()))
    counts = qa.summarize(records)
    assert counts["yes"] == counts["no"] > 0
    assert counts["multiple_choice"] > 0 and counts["short_answer"] == len(facts) - 1
    assert counts["report_generation"] == len(facts)
    for record in records:
        assert record.turns[0].type in QUESTION_TYPES
        assert record.turns[0].value.startswith("<image>\n")
        parse_record(record.to_json())  # valid LLaVA JSON
        volume, kind = facts[record.image], qa.question_kind(record)
        question, answer = record.turns[0].value, record.turns[1].value
        if kind == "yes_no":
            index = ABNORMALITIES.index(_asked_abnormality(question))
            assert volume.labels[index] != -1
            assert answer == ("Yes." if volume.labels[index] == 1 else "No.")
        elif kind == "multiple_choice":
            options = re.findall(r"\(([abcd])\) ([A-Z][a-z ]+?)(?= \(|$)", question)
            assert [letter for letter, _ in options] == list("abcd")
            present = [(letter, name) for letter, name in options
                       if volume.labels[ABNORMALITIES.index(name)] == 1]
            assert len(present) == 1 and answer == f"({present[0][0]}) {present[0][1]}."
        elif kind == "short_answer":
            named = [n for n in ABNORMALITIES if n.lower() in answer.lower()]
            positives = [n for n, v in zip(ABNORMALITIES, volume.labels) if v == 1]
            assert sorted(named) == sorted(positives) or (
                not positives and answer == qa.NO_ABNORMALITY_ANSWER)
        else:
            assert answer == f"Findings: {volume.findings}\nImpression: {volume.impressions}"


def test_deterministic_per_seed_and_per_volume():
    facts = _facts()
    first = [r.to_json() for r in qa.make_records(facts, qa.QASettings(seed=3))]
    assert first == [r.to_json() for r in qa.make_records(facts, qa.QASettings(seed=3))]
    assert first != [r.to_json() for r in qa.make_records(facts, qa.QASettings(seed=4))]
    # A volume's questions do not depend on the other volumes (no yes/no questions here,
    # since balancing is global).
    settings = qa.QASettings(yes_no_per_volume=0, seed=3)
    alone = qa.make_records(facts[5:6], settings)
    together = [r for r in qa.make_records(facts, settings) if r.image == facts[5].volume_name]
    assert alone == together
    with pytest.raises(ValueError, match="yes_no_per_volume must be >= 0"):
        qa.QASettings(yes_no_per_volume=-1)


@pytest.mark.slow
def test_make_chat_data_command(tmp_path, capsys):
    from data_pipeline.synthetic import generate_release
    generate_release(str(tmp_path / "release"), 8, seed=0, min_prevalence=0.3, workers=1)
    out = tmp_path / "chat" / "train.json"
    command = [sys.executable, "-m", "experiments.make_chat_data", "--ctrate-root",
               str(tmp_path / "release"), "--split", "train", "--out", str(out), "--seed", "1"]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    records = json.loads(out.read_text())
    assert re.search(rf"wrote {len(records)} questions about \d+ volumes", run.stdout)
    first = out.read_bytes()
    assert subprocess.run(command, cwd=REPO, capture_output=True, timeout=120).returncode == 0
    assert out.read_bytes() == first
    from experiments.make_chat_data import main
    assert main(command[3:4] + [str(tmp_path / "nowhere")] + command[5:]) == 1
    assert "is not a CT-RATE release" in capsys.readouterr().err
