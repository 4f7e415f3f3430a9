"""Which statement a sentence of a synthetic report makes.

The report generator (`reports.py`) writes every finding from a small set of templates:
five positive ones per abnormality, five negated ones shared by all, and the
Impressions' "{Name}." (with a side or lobe for two of them).  `statement_key` inverts
that: a sentence written from abnormality X's positive templates gets the key
"X: present", one written from a negated template "X: absent"; any other sentence
(normal-anatomy filler, "No significant pathology was detected.") is its own statement
and keys as its normalised text.

This is text-side metadata only: it says which *sentences* state the same thing, e.g.
that "No pleural effusion was detected." and "Pleural effusion is not present." are one
statement, so that a contrastive loss can treat them as the same text
(`input_pipeline.PipelineConfig.sentence_keys = "synthetic_statement"`).  It never looks
at a volume or its labels.
"""

from __future__ import annotations

import functools
import re

from data_pipeline.schema import ABNORMALITIES
from data_pipeline.synthetic import reports

# What each template placeholder can be filled with (`reports._fill`).
_PLACEHOLDERS = {
    "side": r"(?:on the right|on the left|bilaterally)",
    "Side_adj": r"(?:Right|Left|Bilateral)",
    "size": r"\d+",
    "A_size": r"(?:A|An) \d+",
    "lobe": r"[a-z ]+?",
    "device": r"[a-z ]+?",
}
# The Impressions' sentences for a positive finding (`reports._impression`).
_IMPRESSION_TEMPLATES = ("{Name}.", "{Side_adj} {name}.", "{Name} in the {lobe}.")
_STRIPPED = "\"'()"  # the characters `input_pipeline.report_text` removes


def _strip(text: str) -> str:
    for char in _STRIPPED:
        text = text.replace(char, "")
    return " ".join(text.split())


def _template_regex(template: str, name: str) -> str:
    """A template of abnormality `name` as a regular expression (its own text stripped
    the way training texts are)."""
    parts = []
    for part in re.split(r"(\{\w+\})", _strip(template)):
        field = re.fullmatch(r"\{(\w+)\}", part)
        if field is None:
            parts.append(re.escape(part))
        elif field.group(1) == "Name":
            parts.append(re.escape(name))
        elif field.group(1) == "name":
            parts.append(re.escape(reports.canonical(name)))
        else:
            parts.append(_PLACEHOLDERS[field.group(1)])
    return "".join(parts)


@functools.cache
def _patterns() -> tuple[tuple[re.Pattern, str], ...]:
    patterns = []
    for name in ABNORMALITIES:
        for polarity, templates in (
                ("present", reports.POSITIVE_TEMPLATES[name] + _IMPRESSION_TEMPLATES),
                ("absent", reports.NEGATIVE_TEMPLATES)):
            regex = "|".join(f"(?:{_template_regex(t, name)})" for t in templates)
            patterns.append((re.compile(regex), f"{name}: {polarity}"))
    return tuple(patterns)


def normalised_sentence(sentence: str) -> str:
    """Lower case, quotes and parentheses removed, single spaces."""
    return _strip(sentence).lower()


def statement_key(sentence: str) -> str:
    """"<Abnormality>: present" / "<Abnormality>: absent" for a sentence written from a
    finding's template, else `normalised_sentence(sentence)`.

    >>> statement_key("No evidence of pleural effusion was seen.")
    'Pleural effusion: absent'
    >>> statement_key("Left pleural effusion.")
    'Pleural effusion: present'
    """
    text = _strip(sentence)
    for pattern, key in _patterns():
        if pattern.fullmatch(text):
            return key
    return text.lower()
