"""Question-answer records generated from a CT-RATE-shaped release (labels + reports).

CT-CHAT's 2.7 M questions were written by Llama 3.1 70B from the CT-RATE reports; offline
we derive questions whose answers follow from the release's CSVs alone, so that the whole
chat path can be trained and tested on the synthetic release (or on the real one):

  yes_no             "Is there cardiomegaly in this CT volume?" -> "Yes." / "No."
                     (type short_answer), from the 18 abnormality labels; over the whole
                     output exactly as many "Yes." as "No."
  multiple_choice    four abnormalities, exactly one present -> "(c) Emphysema."
  short_answer       "Which abnormalities are seen in this CT volume?" -> the positives
  report_generation  "Generate the radiology report ..." -> "Findings: ... Impression: ..."

One record per question (`id` = "<volume stem>_<kind>_<n>", `image` = VolumeName, the
question starts with "<image>\\n").  Every random choice is keyed by (seed, VolumeName),
so a volume's questions do not depend on which other volumes are present; the final
yes/no balancing draws from one generator seeded by `seed`.  Empty label cells (-1) are
never asked about.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence

import numpy as np

from data_pipeline.release import csv_paths, read_csv_rows, resolve_dataset_dir
from data_pipeline.schema import ABNORMALITIES

from ct_rate_jax.chat.conversation import IMAGE_TOKEN, ChatRecord, Turn

KINDS = ("yes_no", "multiple_choice", "short_answer", "report_generation")
# How the abnormality reads inside a question ("Is there <phrase> ...").
_PHRASES = {"Lung nodule": "a lung nodule", "Hiatal hernia": "a hiatal hernia",
            "Pericardial effusion": "a pericardial effusion",
            "Pleural effusion": "a pleural effusion",
            "Mosaic attenuation pattern": "a mosaic attenuation pattern"}
_YES_NO_TEMPLATES = ("Is there {phrase} in this CT volume?",
                     "Does this chest CT show {phrase}?",
                     "Can you see {phrase} in this scan?")
_MULTIPLE_CHOICE_TEMPLATES = (
    "Which of the following abnormalities is seen in this CT volume? {choices}",
    "Which finding is present in this chest CT? {choices}")
_SHORT_ANSWER_TEMPLATES = ("Which abnormalities are seen in this CT volume?",
                           "List the abnormal findings of this chest CT.")
_REPORT_TEMPLATES = ("Generate the radiology report for this CT volume.",
                     "Can you write the report of this chest CT scan?")
NO_ABNORMALITY_ANSWER = "None of the 18 assessed abnormalities is seen."


def phrase(abnormality: str) -> str:
    return _PHRASES.get(abnormality, abnormality.lower())


@dataclasses.dataclass(frozen=True)
class VolumeFacts:
    """What the questions are made from: one row of the labels and reports CSVs."""

    volume_name: str
    labels: tuple[int, ...]  # 18 values in ABNORMALITIES order; 1, 0, or -1 (empty cell)
    findings: str
    impressions: str

    @property
    def stem(self) -> str:
        return self.volume_name.split(".nii")[0]


@dataclasses.dataclass(frozen=True)
class QASettings:
    """How many questions of each kind per volume.

    Attributes:
      yes_no_per_volume: up to this many yes/no questions per volume, half about present
        abnormalities and half about absent ones where the volume has them.
      multiple_choice_per_volume, short_answer_per_volume, report_per_volume: 0 or more.
      seed: keys every random choice (with the VolumeName).
    """

    yes_no_per_volume: int = 4
    multiple_choice_per_volume: int = 1
    short_answer_per_volume: int = 1
    report_per_volume: int = 1
    seed: int = 0

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if field.name != "seed" and getattr(self, field.name) < 0:
                raise ValueError(f"QASettings.{field.name} must be >= 0")


def read_volume_facts(ctrate_root: str, split: str) -> list[VolumeFacts]:
    """Labels and reports of every volume of `split` that has both, sorted by name.

    Only the two CSVs are read (volume files are not needed: training may use
    precomputed encodings).  Raises FileNotFoundError / ValueError naming the CSV.
    """
    paths = csv_paths(resolve_dataset_dir(ctrate_root), split)
    labels = read_csv_rows(paths["labels"], ABNORMALITIES)
    reports = read_csv_rows(paths["reports"], ("Findings_EN", "Impressions_EN"))
    facts = []
    for name in sorted(set(labels) & set(reports)):
        values = []
        for column in ABNORMALITIES:
            cell = (labels[name].get(column) or "").strip()
            try:
                values.append(int(float(cell)) if cell else -1)
            except ValueError:
                raise ValueError(f"{paths['labels']}: {name} has {column} = {cell!r}") from None
        facts.append(VolumeFacts(name, tuple(values), reports[name]["Findings_EN"].strip(),
                                 reports[name]["Impressions_EN"].strip()))
    if not facts:
        raise ValueError(f"no volume of split {split!r} has both a labels row "
                         f"({paths['labels']}) and a report ({paths['reports']})")
    return facts


def _volume_rng(seed: int, volume_name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(volume_name.encode())])


def _record(facts: VolumeFacts, kind: str, index: int, question: str, answer: str,
            question_type: str) -> ChatRecord:
    return ChatRecord(
        id=f"{facts.stem}_{kind}_{index}", image=facts.volume_name,
        turns=(Turn("human", f"{IMAGE_TOKEN}\n{question}", question_type), Turn("gpt", answer)))


def _yes_no(facts, rng, count) -> list[ChatRecord]:
    present = [i for i, v in enumerate(facts.labels) if v == 1]
    absent = [i for i, v in enumerate(facts.labels) if v == 0]
    n_yes = min(len(present), (count + 1) // 2)
    n_no = min(len(absent), count - n_yes)
    chosen = ([(i, True) for i in rng.choice(present, n_yes, replace=False)]
              + [(i, False) for i in rng.choice(absent, n_no, replace=False)])
    records = []
    for n, (i, yes) in enumerate(sorted(chosen)):
        template = _YES_NO_TEMPLATES[rng.integers(len(_YES_NO_TEMPLATES))]
        records.append(_record(facts, "yes_no", n, template.format(phrase=phrase(ABNORMALITIES[i])),
                               "Yes." if yes else "No.", "short_answer"))
    return records


def _multiple_choice(facts, rng, count) -> list[ChatRecord]:
    present = [i for i, v in enumerate(facts.labels) if v == 1]
    absent = [i for i, v in enumerate(facts.labels) if v == 0]
    if not present or len(absent) < 3:
        return []
    records = []
    for n in range(count):
        distractors = rng.choice(absent, 3, replace=False)
        options = [int(rng.choice(present))] + [int(i) for i in distractors]
        order = rng.permutation(4)
        options = [options[k] for k in order]
        letters = "abcd"
        choices = " ".join(f"({letters[k]}) {ABNORMALITIES[i]}" for k, i in enumerate(options))
        correct = int(np.flatnonzero(order == 0)[0])
        template = _MULTIPLE_CHOICE_TEMPLATES[rng.integers(len(_MULTIPLE_CHOICE_TEMPLATES))]
        records.append(_record(facts, "multiple_choice", n, template.format(choices=choices),
                               f"({letters[correct]}) {ABNORMALITIES[options[correct]]}.",
                               "multiple_choice"))
    return records


def _list_answer(names: Sequence[str]) -> str:
    if not names:
        return NO_ABNORMALITY_ANSWER
    names = [names[0]] + [name.lower() for name in names[1:]]
    joined = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return joined + "."


def _short_answer(facts, rng, count) -> list[ChatRecord]:
    if -1 in facts.labels:  # an unknown label would make the list unreliable
        return []
    answer = _list_answer([ABNORMALITIES[i] for i, v in enumerate(facts.labels) if v == 1])
    return [_record(facts, "short_answer", n,
                    _SHORT_ANSWER_TEMPLATES[rng.integers(len(_SHORT_ANSWER_TEMPLATES))],
                    answer, "short_answer") for n in range(count)]


def _report(facts, rng, count) -> list[ChatRecord]:
    if not facts.findings and not facts.impressions:
        return []
    answer = f"Findings: {facts.findings}\nImpression: {facts.impressions}".strip()
    return [_record(facts, "report_generation", n,
                    _REPORT_TEMPLATES[rng.integers(len(_REPORT_TEMPLATES))], answer,
                    "report_generation") for n in range(count)]


def _balance_yes_no(records: list[ChatRecord], seed: int) -> list[ChatRecord]:
    """Drops randomly chosen questions of the majority answer until yes == no."""
    yes_no = [i for i, r in enumerate(records) if question_kind(r) == "yes_no"]
    yes = [i for i in yes_no if records[i].turns[1].value == "Yes."]
    no = [i for i in yes_no if records[i].turns[1].value == "No."]
    surplus, excess = (yes, len(yes) - len(no)) if len(yes) > len(no) else (no, len(no) - len(yes))
    if excess <= 0:
        return records
    dropped = set(np.random.default_rng([seed, 1]).choice(surplus, excess, replace=False).tolist())
    return [r for i, r in enumerate(records) if i not in dropped]


def make_records(facts: Sequence[VolumeFacts], settings: QASettings = QASettings()
                 ) -> list[ChatRecord]:
    """All questions for `facts`, in volume order then KINDS order, yes/no balanced."""
    records = []
    for volume in facts:
        rng = _volume_rng(settings.seed, volume.volume_name)
        records += _yes_no(volume, rng, settings.yes_no_per_volume)
        records += _multiple_choice(volume, rng, settings.multiple_choice_per_volume)
        records += _short_answer(volume, rng, settings.short_answer_per_volume)
        records += _report(volume, rng, settings.report_per_volume)
    return _balance_yes_no(records, settings.seed)


def make_chat_data(ctrate_root: str, split: str, settings: QASettings = QASettings()
                   ) -> list[ChatRecord]:
    """`make_records(read_volume_facts(ctrate_root, split), settings)`."""
    return make_records(read_volume_facts(ctrate_root, split), settings)


def question_kind(record: ChatRecord) -> str:
    """The KINDS entry a generated record's id names."""
    for kind in KINDS:
        if f"_{kind}_" in record.id:
            return kind
    raise ValueError(f"record {record.id} was not made by synthetic_qa")


def summarize(records: Sequence[ChatRecord]) -> dict[str, int]:
    """Counts per kind, plus yes / no answers and distinct volumes."""
    counts = {kind: 0 for kind in KINDS}
    for record in records:
        counts[question_kind(record)] += 1
    counts["yes"] = sum(r.turns[1].value == "Yes." for r in records
                        if question_kind(r) == "yes_no")
    counts["no"] = counts["yes_no"] - counts["yes"]
    counts["volumes"] = len({r.image for r in records})
    return counts
