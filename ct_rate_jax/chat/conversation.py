"""CT-CHAT conversations: LLaVA JSON records, question-type tags, chat-template tokenisation.

A record (one element of the training JSON list, as in the CT-RATE VQA release)::

  {"id": "train_1_a_1_0", "image": "train_1_a_1.nii.gz",
   "conversations": [
     {"from": "human", "value": "<image>\\nIs there cardiomegaly?", "type": "short_answer"},
     {"from": "gpt", "value": "Yes."}, ...]}

The question `type` sits on each human turn (the original's evaluation reads
`conversations[k]["type"]`); one of QUESTION_TYPES.  Its tag is appended to the question
as " <tag>" (CT-CHAT's web UI appends exactly that): conversation, free_response and
description -> <long_answer>; multiple_choice, short_answer, report_generation -> their own.

Tokenisation renders the turns with the tokenizer's own chat template
(`tokenizer.apply_chat_template`), splits the text at `<image>` (as LLaVA's
`tokenizer_image_token` does; the image is moved to the start of its turn, followed by a
newline, as LLaVA's `preprocess_multimodal` does) and records where the visual tokens go.
Labels are IGNORE_INDEX everywhere except the assistant's tokens: from the end of the
template's assistant header up to and including its end-of-turn token, which is what
the original's Llama 3 preprocessing trains on.  Labels are aligned with `input_ids`
(Hugging Face convention: the loss shifts them by one).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

QUESTION_TYPES = ("conversation", "free_response", "description", "multiple_choice",
                  "short_answer", "report_generation")
LONG_ANSWER, SHORT_ANSWER = "<long_answer>", "<short_answer>"
MULTIPLE_CHOICE, REPORT_GENERATION = "<multiple_choice>", "<report_generation>"
TYPE_TAGS = {"conversation": LONG_ANSWER, "free_response": LONG_ANSWER,
             "description": LONG_ANSWER, "multiple_choice": MULTIPLE_CHOICE,
             "short_answer": SHORT_ANSWER, "report_generation": REPORT_GENERATION}
TAG_TOKENS = (MULTIPLE_CHOICE, LONG_ANSWER, SHORT_ANSWER, REPORT_GENERATION)
# The special tokens the original adds to its tokenizer (llava/constants.py), in its
# order.  The short-answer one is spelled "<short_answe>" there, so released tokenizers
# carry that string; the data and the UI write "<short_answer>".
OFFICIAL_ADDED_TOKENS = ("<multiple_choice>", "<long_answer>", "<short_answe>",
                         "<report_generation>")
# CT-CHAT's UI puts this after the image on the first question about a volume, and the
# released models' system prompt tells the model to look for it.
PROVIDED_MARKER = "<provided>"
IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100  # label of a position without loss (PyTorch cross-entropy's default)
IMAGE_PLACEHOLDER_ID = -200  # input id marking where the visual tokens go (as LLaVA)
ROLES = {"human": "user", "gpt": "assistant"}

# The prompt layout CT-CHAT's Llama 3.1 models were trained with, as a chat template for
# `tokenizer.chat_template`.  Their script asks for the conversation version "llama3_1",
# which LLaVA does not know and replaces by its "llama3" conversation: a system header and
# the system text, then header + message + <|eot_id|> per turn, messages not trimmed.  The
# original's system text starts with "<|begin_of_text|>" and its tokenisation adds one
# more, so the sequence starts with two; kept for parity with the released weights.  The
# system prompt itself (CT-CHAT's long instructions in llava/conversation.py) is the
# user's to pass as a system message; without one the system text is empty.
LLAVA_LLAMA3_TEMPLATE = (
    "{{ bos_token }}{{ bos_token }}<|start_header_id|>system<|end_header_id|>\n\n"
    "{% set turns = messages %}"
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
    "{% set turns = messages[1:] %}{% endif %}<|eot_id|>"
    "{% for m in turns %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


@dataclasses.dataclass(frozen=True)
class Turn:
    speaker: str  # "human" or "gpt"
    value: str
    type: str | None = None  # question type, on human turns


@dataclasses.dataclass(frozen=True)
class ChatRecord:
    id: str
    turns: tuple[Turn, ...]
    image: str | None = None  # a VolumeName such as "train_1_a_1.nii.gz"

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {"id": self.id}
        if self.image is not None:
            record["image"] = self.image
        record["conversations"] = [
            {"from": t.speaker, "value": t.value, **({"type": t.type} if t.type else {})}
            for t in self.turns]
        return record


def parse_record(raw: Mapping[str, Any], where: str = "record") -> ChatRecord:
    """Validates one LLaVA JSON record; ValueError naming `where` and the field if bad.

    A record-level "type" applies to every human turn without its own.
    """
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: expected an object, got {type(raw).__name__}")
    conversations = raw.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise ValueError(f"{where}: 'conversations' must be a non-empty list")
    record_type = raw.get("type")
    turns = []
    for i, turn in enumerate(conversations):
        spot = f"{where}: conversations[{i}]"
        if not isinstance(turn, Mapping) or turn.get("from") not in ROLES:
            raise ValueError(f"{spot}: 'from' must be 'human' or 'gpt'")
        if not isinstance(turn.get("value"), str):
            raise ValueError(f"{spot}: 'value' must be a string")
        kind = turn.get("type", record_type if turn["from"] == "human" else None)
        if kind is not None and kind not in QUESTION_TYPES:
            raise ValueError(f"{spot}: unknown type {kind!r}; expected one of {QUESTION_TYPES}")
        turns.append(Turn(turn["from"], turn["value"], kind))
    image = raw.get("image")
    if image is not None and not isinstance(image, str):
        raise ValueError(f"{where}: 'image' must be a string")
    return ChatRecord(id=str(raw.get("id", where)), turns=tuple(turns), image=image)


def read_records(path: str | os.PathLike) -> list[ChatRecord]:
    """A LLaVA training JSON file (a list of records)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"conversation file not found: {path}")
    with open(path, encoding="utf-8") as handle:
        try:
            raw = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(raw, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    return [parse_record(item, f"{path}[{i}]") for i, item in enumerate(raw)]


def write_records(path: str | os.PathLike, records: Sequence[ChatRecord]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump([r.to_json() for r in records], handle, indent=1, ensure_ascii=False)
        handle.write("\n")


def tag_question(text: str, question_type: str | None) -> str:
    """`text` + " <tag>" for the type (unchanged when untyped or already tagged)."""
    if question_type is None:
        return text
    if question_type not in TYPE_TAGS:
        raise ValueError(f"unknown question type {question_type!r}; expected one of "
                         f"{QUESTION_TYPES}")
    if any(tag in text for tag in TAG_TOKENS):
        return text
    return f"{text} {TYPE_TAGS[question_type]}"


def strip_tags(text: str) -> str:
    """The question without `<image>`, `<provided>` and type tags (for evaluation output)."""
    for token in (IMAGE_TOKEN, PROVIDED_MARKER, *TAG_TOKENS):
        text = text.replace(token, "")
    return " ".join(text.split())


def to_messages(record: ChatRecord, *, system_prompt: str | None = None,
                type_tags: bool = True, mark_provided: bool = False) -> list[dict[str, str]]:
    """The record as chat-template messages ({"role", "content"}).

    The conversation must alternate human / gpt starting with human (a leading gpt turn
    is dropped, as the original does).  With an image, `<image>` is moved to the start of
    the turn holding it, or put on the first question when no turn holds one.
    `mark_provided` writes "<image>\\n <provided>" as CT-CHAT's UI does.
    """
    turns = list(record.turns)
    if turns and turns[0].speaker != "human":
        turns = turns[1:]
    for i, turn in enumerate(turns):
        if turn.speaker != ("human" if i % 2 == 0 else "gpt"):
            raise ValueError(f"record {record.id}: turn {i} is from {turn.speaker!r}; turns "
                             "must alternate human, gpt, ...")
    if not turns:
        raise ValueError(f"record {record.id}: no human turn")
    holder = next((i for i, t in enumerate(turns) if IMAGE_TOKEN in t.value), None)
    if record.image is not None and holder is None:
        holder = 0
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    for i, turn in enumerate(turns):
        text = turn.value
        if i == holder:
            body = text.replace(IMAGE_TOKEN, "").strip()
            lead = f"{IMAGE_TOKEN}\n {PROVIDED_MARKER}" if mark_provided else f"{IMAGE_TOKEN}\n"
            text = lead + body
        if turn.speaker == "human" and type_tags:
            text = tag_question(text, turn.type)
        messages.append({"role": ROLES[turn.speaker], "content": text})
    return messages


@dataclasses.dataclass(frozen=True)
class TokenizedChat:
    """input_ids int32[S] with IMAGE_PLACEHOLDER_ID where the image goes; labels int32[S]."""

    input_ids: np.ndarray
    labels: np.ndarray
    image_positions: tuple[int, ...]
    text: str  # the rendered template text, for inspection

    @property
    def loss_mask(self) -> np.ndarray:
        return self.labels != IGNORE_INDEX


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(list(messages), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    if not isinstance(text, str):
        raise ValueError("the tokenizer's chat template did not render a string")
    return text


def assistant_spans(tokenizer, messages: Sequence[Mapping[str, str]]) -> list[tuple[int, int]]:
    """Character spans of the full rendering that belong to the assistant: from after the
    generation prompt to the end of each assistant message's rendering.

    Relies on the template rendering a conversation's prefix as a prefix of the text
    (true of the Llama, Mistral and Vicuna templates); a template that is not is refused.
    """
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True)
        through = _render(tokenizer, messages[:i + 1], add_generation_prompt=False)
        if not (full.startswith(through) and through.startswith(before)):
            raise ValueError("the chat template does not render conversations prefix by "
                             "prefix; cannot tell assistant tokens from the prompt")
        spans.append((len(before), len(through)))
    return spans


def tokenize_chat(tokenizer, messages: Sequence[Mapping[str, str]], *,
                  add_generation_prompt: bool = False) -> TokenizedChat:
    """Renders and tokenises `messages` (see the module docstring for the layout).

    `tokenizer`: a Hugging Face fast tokenizer with a chat template.  For inference pass
    the conversation up to a user turn and `add_generation_prompt=True`.
    """
    text = _render(tokenizer, messages, add_generation_prompt)
    spans = [] if add_generation_prompt else assistant_spans(tokenizer, messages)
    ids, labels, images = [], [], []
    offset = 0
    for index, chunk in enumerate(text.split(IMAGE_TOKEN)):
        if index:
            if any(start <= offset - len(IMAGE_TOKEN) < end for start, end in spans):
                raise ValueError("an assistant message contains <image>")
            images.append(len(ids))
            ids.append(IMAGE_PLACEHOLDER_ID)
            labels.append(IGNORE_INDEX)
        if chunk:
            encoded = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
            for token, (start, _) in zip(encoded["input_ids"], encoded["offset_mapping"]):
                position = offset + start
                ids.append(token)
                labels.append(token if any(s <= position < e for s, e in spans)
                              else IGNORE_INDEX)
        offset += len(chunk) + len(IMAGE_TOKEN)
    return TokenizedChat(np.asarray(ids, np.int32), np.asarray(labels, np.int32),
                         tuple(images), text)


def tokenize_record(tokenizer, record: ChatRecord, **options) -> TokenizedChat:
    """`tokenize_chat(tokenizer, to_messages(record, **options))`."""
    return tokenize_chat(tokenizer, to_messages(record, **options))


def add_tag_tokens(tokenizer, tokens: Sequence[str] = TAG_TOKENS) -> int:
    """Adds the question-type tags as special tokens (one id each); returns how many were
    new.  The LLM's embedding must then grow to len(tokenizer) rows."""
    return tokenizer.add_tokens(list(tokens), special_tokens=True)
