"""Fine-tuned model directories: a `checkpoint_io` model directory plus finetune.json.

Both fine-tuning commands write an ordinary model directory (`save_converted`), so
everything that reads a converted release reads them too (evaluation, export,
`convert_official --to-torch`):

  ClassFine  the CT-CLIP weights (unchanged) and the head as `extras`
             {"classifier.weight", "classifier.bias"}: the layout of the converted
             CT_LiPro_v2.pt; conversion.json variant "lipro"
  VocabFine  the fine-tuned CT-CLIP weights; conversion.json variant "vocabfine"

finetune.json records how: method, the starting checkpoint, the data (manifest
sha256), the tokenizer and report-text settings the data was read with (evaluation
reuses them), every training setting and the loss history.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from ct_rate_jax import checkpoint_io

FINETUNE_FILE = "finetune.json"
CLASSFINE, VOCABFINE, CTCLIP = "ClassFine", "VocabFine", "CT-CLIP"


def write_finetune_record(directory: str, record: Mapping[str, Any]) -> str:
    path = os.path.join(directory, FINETUNE_FILE)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    return path


def read_finetune_record(directory: str) -> dict | None:
    path = os.path.join(directory, FINETUNE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_conversion_record(directory: str) -> dict | None:
    path = os.path.join(directory, checkpoint_io.CONVERSION_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def model_kind(directory: str | None, extras: Mapping[str, Any]) -> str:
    """"ClassFine" (a linear head in the extras: ours or the converted LiPro release),
    "VocabFine" (our run or the converted release) or "CT-CLIP"."""
    if "classifier.weight" in extras:
        return CLASSFINE
    if directory:
        finetune = read_finetune_record(directory) or {}
        conversion = read_conversion_record(directory) or {}
        if finetune.get("method") == VOCABFINE or conversion.get("variant") == "vocabfine":
            return VOCABFINE
    return CTCLIP
