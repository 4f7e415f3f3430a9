"""Report tokenisation for the text tower, built on the Hugging Face `tokenizers` library.

No jax/flax here: this module runs inside Grain worker processes.

* `load_tokenizer` reads a `tokenizer.json`, or builds the classic BERT WordPiece
  tokenizer from a `vocab.txt` (CXR-BERT, PubMedBERT and MiniLM ship one).
* `train_wordpiece_tokenizer` trains a small lowercase WordPiece vocabulary, e.g. on
  the synthetic reports of the demo.
* `TextEncoder` turns report strings into fixed-length int32 ids and attention masks.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import (Tokenizer, decoders, models, normalizers, pre_tokenizers, processors,
                        trainers)

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)  # in this order: [PAD] has id 0


def _bert_pipeline(tokenizer: Tokenizer, *, lowercase: bool, strip_accents: bool | None = None,
                   chinese_chars: bool = True, cls: str = CLS, sep: str = SEP,
                   special_tokens: Sequence[str] = SPECIAL_TOKENS) -> Tokenizer:
    """Attaches BERT's normaliser, pre-tokeniser, decoder and "[CLS] $A [SEP]" template."""
    # strip_accents=None follows `lowercase`, as in the original BERT BasicTokenizer.
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=chinese_chars, strip_accents=strip_accents,
        lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    # Special tokens written in the text stay whole (never lowercased or split).
    tokenizer.add_special_tokens(
        [t for t in special_tokens if tokenizer.token_to_id(t) is not None])
    cls_id, sep_id = tokenizer.token_to_id(cls), tokenizer.token_to_id(sep)
    if cls_id is None or sep_id is None:
        raise ValueError(f"The vocabulary has no {cls} or {sep} token.")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, cls_id), (sep, sep_id)])
    return tokenizer


def _read_vocab(vocab_file: Path) -> dict[str, int]:
    # One token per line; the line number is the id (BERT's load_vocab).
    with open(vocab_file, encoding="utf-8") as f:
        return {line.rstrip("\n"): i for i, line in enumerate(f)}


def wordpiece_from_vocab(vocab_file: str | Path) -> Tokenizer:
    """The BERT WordPiece tokenizer of a `vocab.txt`, configured like `BertTokenizer`.

    Options (do_lower_case, strip_accents, tokenize_chinese_chars, special token names)
    come from a `tokenizer_config.json` next to the vocabulary when present.
    """
    vocab_file = Path(vocab_file)
    options = {}
    config_file = vocab_file.parent / "tokenizer_config.json"
    if config_file.is_file():
        options = json.loads(config_file.read_text())

    def special(name: str, default: str) -> str:
        token = options.get(name, default)
        # Newer configs may store {"content": "[CLS]", ...} instead of a string.
        return token["content"] if isinstance(token, dict) else token

    unk, cls, sep = special("unk_token", UNK), special("cls_token", CLS), special("sep_token", SEP)
    specials = (special("pad_token", PAD), unk, cls, sep, special("mask_token", MASK))
    tokenizer = Tokenizer(models.WordPiece(_read_vocab(vocab_file), unk_token=unk,
                                           max_input_chars_per_word=100))
    return _bert_pipeline(tokenizer, lowercase=options.get("do_lower_case", True),
                          strip_accents=options.get("strip_accents"),
                          chinese_chars=options.get("tokenize_chinese_chars", True),
                          cls=cls, sep=sep, special_tokens=specials)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Loads a tokenizer from a `tokenizer.json`, a `vocab.txt` or a directory holding one.

    A directory's `tokenizer.json` is preferred over its `vocab.txt`.  Padding and
    truncation saved in a `tokenizer.json` are switched off, so every source behaves
    alike: lengths are `TextEncoder`'s business.
    """
    path = Path(path)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return _from_json_file(path / "tokenizer.json")
        if (path / "vocab.txt").is_file():
            return wordpiece_from_vocab(path / "vocab.txt")
        raise FileNotFoundError(f"Neither tokenizer.json nor vocab.txt in {path}.")
    if not path.is_file():
        raise FileNotFoundError(f"No tokenizer at {path}.")
    if path.suffix == ".json":
        return _from_json_file(path)
    return wordpiece_from_vocab(path)


def _from_json_file(path: Path) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def train_wordpiece_tokenizer(texts: Iterable[str], vocab_size: int,
                              out_path: str | Path) -> Tokenizer:
    """Trains a lowercase BERT-style WordPiece tokenizer and saves it as JSON.

    Special tokens get the ids [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4.
    `out_path` is the JSON file to write, or a directory that receives `tokenizer.json`.
    """
    tokenizer = Tokenizer(models.WordPiece(unk_token=UNK, max_input_chars_per_word=100))
    # The trainer sees normalised, pre-tokenised words, so the pipeline comes first.
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                        continuing_subword_prefix="##", show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    _bert_pipeline(tokenizer, lowercase=True)

    out_path = Path(out_path)
    if out_path.suffix != ".json":
        out_path = out_path / "tokenizer.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_path))
    return tokenizer


class TextEncoder:
    """Encodes reports into fixed-length `int32[max_length]` ids and attention masks.

    Sequences longer than `max_length` are truncated before the final [SEP] (which is
    kept, as Hugging Face does); shorter ones are right-padded with the pad id and a 0
    mask.  Pickling stores only the tokenizer's JSON, so instances can be shipped to
    Grain worker processes; the Rust tokenizer is rebuilt there on first use.
    """

    def __init__(self, tokenizer: Tokenizer | str | Path, max_length: int,
                 pad_token: str = PAD):
        if not isinstance(tokenizer, Tokenizer):
            tokenizer = load_tokenizer(tokenizer)
        if max_length < 2:
            raise ValueError(f"max_length must leave room for [CLS] and [SEP], got {max_length}.")
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"The vocabulary has no pad token {pad_token!r}.")
        self.max_length = max_length
        self.pad_token = pad_token
        self._pad_id = pad_id
        self._tokenizer_json = tokenizer.to_str()
        self._tokenizer: Tokenizer | None = None

    @classmethod
    def from_path(cls, path: str | Path, max_length: int) -> TextEncoder:
        return cls(load_tokenizer(path), max_length)

    @property
    def tokenizer(self) -> Tokenizer:
        """The configured tokenizer (truncation and padding to max_length enabled)."""
        if self._tokenizer is None:
            tokenizer = Tokenizer.from_str(self._tokenizer_json)
            tokenizer.enable_truncation(max_length=self.max_length)
            tokenizer.enable_padding(pad_id=self.pad_id, pad_token=self.pad_token,
                                     length=self.max_length)
            self._tokenizer = tokenizer
        return self._tokenizer

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def vocab_size(self) -> int:
        """Number of ids, added special tokens included (the embedding table size)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """text -> (input_ids int32[max_length], attention_mask int32[max_length])."""
        encoding = self.tokenizer.encode(text)
        return (np.asarray(encoding.ids, np.int32),
                np.asarray(encoding.attention_mask, np.int32))

    def encode_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """N texts -> (input_ids int32[N, max_length], attention_mask int32[N, max_length])."""
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = np.asarray([e.ids for e in encodings], np.int32).reshape(-1, self.max_length)
        mask = np.asarray([e.attention_mask for e in encodings], np.int32)
        return ids, mask.reshape(-1, self.max_length)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_tokenizer"] = None  # rebuilt lazily from _tokenizer_json
        return state
