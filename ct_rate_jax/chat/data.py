"""CT-CHAT training data: LLaVA JSON records + volumes (prepared shards) or encodings.

  records (conversation.read_records)  --tokenize_record, expand_image_placeholders-->
  examples {input_ids, labels, visual_mask, image}  --ChatBatches-->  padded batches with
  `volume` float32[B, D, H, W] (from the shards, `normalise_hu`) or `tokens` [B, T, h, w, E]
  (from `<encodings>/<image>.npz`, `projector.load_encoding`).

`ChatBatches` is deterministic in (seed, step): batch k of epoch e takes rows
[k*B, (k+1)*B) of the permutation `default_rng((seed, e))`, so a resumed run continues
with exactly the batches it would have seen (its state is the step number).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ct_rate_jax.chat import conversation as conv
from ct_rate_jax.chat.multimodal import expand_image_placeholders, pad_batch
from ct_rate_jax.chat.projector import encoding_path, load_encoding

# Llama-3-style chat template (prefix-stable, as `conversation.assistant_spans` needs).
DEMO_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% set c = '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim"
    " + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set c = bos_token + c %}{% endif %}{{ c }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
DEMO_SPECIAL_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                       "<|eot_id|>", "<pad>")


def train_demo_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str):
    """A byte-level BPE tokenizer trained on `texts` with the Llama-3-style template and
    the question-type tags, saved as a Hugging Face tokenizer directory `out_dir`.

    For the random-init demo LLM only; a real CT-CHAT uses its base LLM's tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(DEMO_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                        eos_token="<|eot_id|>", pad_token="<pad>",
                                        chat_template=DEMO_CHAT_TEMPLATE)
    conv.add_tag_tokens(tokenizer)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def record_texts(records: Sequence[conv.ChatRecord]) -> list[str]:
    """Every turn's text with the template's role names (the tokenizer's corpus)."""
    texts = ["system user assistant"]
    for record in records:
        texts.extend(turn.value for turn in record.turns)
    return texts


def make_examples(tokenizer, records: Sequence[conv.ChatRecord], num_visual_tokens: int,
                  max_length: int) -> list[dict[str, Any]]:
    """Tokenised records with the image placeholder widened; `image` kept for the volume."""
    examples = []
    for record in records:
        chat = conv.tokenize_record(tokenizer, record)
        example = expand_image_placeholders(chat, num_visual_tokens,
                                            fill_id=tokenizer.pad_token_id or 0,
                                            max_length=max_length)
        example["image"] = record.image
        examples.append(example)
    return examples


def load_shard_volumes(shard_dir: str, names: set[str] | None = None,
                       hu_window: tuple[float, float] = (-1000.0, 1000.0)
                       ) -> dict[str, np.ndarray]:
    """VolumeName -> float32[D, H, W] in [-1, 1] for the records of a shard folder
    (only `names` when given)."""
    import grain

    from data_pipeline import schema
    from data_pipeline.input_pipeline import normalise_hu, shard_paths

    source = grain.sources.ArrayRecordDataSource(shard_paths(shard_dir))
    volumes = {}
    for index in range(len(source)):
        record = schema.decode_record(source[index])
        if names is None or record.volume_name in names:
            volumes[record.volume_name] = normalise_hu(record.volume_hu, hu_window)
    if names is not None and (missing := sorted(names - volumes.keys())):
        raise ValueError(f"{len(missing)} image(s) of the chat data are not in the shards "
                         f"{shard_dir}, e.g. {missing[:3]}")
    return volumes


def load_encodings(folder: str, names: set[str], context_size: int | None = None
                   ) -> dict[str, np.ndarray]:
    """VolumeName -> float32[T, h, w, E] from `<folder>/<name>.npz` (key `arr`)."""
    encodings = {}
    for name in sorted(names):
        path = encoding_path(folder, name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no encoding for {name}: {path} does not exist")
        encodings[name] = load_encoding(path, context_size)[0]
    return encodings


class ChatBatches:
    """Padded training batches; `images` maps image name -> volume or token grid.

    `image_key` is "volume" (live encoder) or "tokens" (precomputed encodings).
    """

    def __init__(self, examples: Sequence[dict[str, Any]], images: dict[str, np.ndarray],
                 *, batch_size: int, length: int, image_key: str, seed: int = 0,
                 pad_id: int = 0):
        if len(examples) < batch_size:
            raise ValueError(f"{len(examples)} training examples, fewer than the batch size "
                             f"{batch_size}")
        self.examples, self.images = list(examples), images
        self.batch_size, self.length, self.image_key = batch_size, length, image_key
        self.seed, self.pad_id = seed, pad_id
        self.batches_per_epoch = len(self.examples) // batch_size

    def batch(self, step: int) -> dict[str, np.ndarray]:
        epoch, k = divmod(step, self.batches_per_epoch)
        order = np.random.default_rng((self.seed, epoch)).permutation(len(self.examples))
        rows = [self.examples[i] for i in order[k * self.batch_size:(k + 1) * self.batch_size]]
        return collate(rows, self.images, self.length, self.image_key, self.pad_id)


def collate(rows: Sequence[dict[str, Any]], images: dict[str, np.ndarray], length: int,
            image_key: str, pad_id: int = 0) -> dict[str, np.ndarray]:
    batch = pad_batch(rows, length, pad_id=pad_id)
    del batch["positions"]
    batch[image_key] = np.stack([images[row["image"]] for row in rows])
    return batch
