"""Conversations: LLaVA records, type tags, chat-template tokenisation with exact token and
label layouts (a tiny byte-level BPE tokenizer with a Llama-3-style template, built here)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from ct_rate_jax.chat import conversation as conv
from ct_rate_jax.chat.data import DEMO_CHAT_TEMPLATE
from ct_rate_jax.chat.multimodal import expand_image_placeholders, insert_visual_tokens, pad_batch

# The Llama-3-style, prefix-stable template that the chat demo uses.
LLAMA3_STYLE_TEMPLATE = DEMO_CHAT_TEMPLATE
SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["Is there cardiomegaly? Yes. No, there is no pleural effusion. user assistant "
              "system Describe the findings. You are a radiology assistant."] * 4
    backend.train_from_iterator(corpus, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                 eos_token="<|eot_id|>", chat_template=LLAMA3_STYLE_TEMPLATE)
    assert conv.add_tag_tokens(hf) == 4
    return hf


def _record(**overrides):
    raw = {"id": "train_1_a_1_0", "image": "train_1_a_1.nii.gz", "conversations": [
        {"from": "human", "value": "Is there cardiomegaly?\n<image>", "type": "short_answer"},
        {"from": "gpt", "value": "Yes."},
        {"from": "human", "value": "Describe the findings.", "type": "description"},
        {"from": "gpt", "value": "No pleural effusion."}]}
    raw.update(overrides)
    return raw


def test_records_round_trip_and_errors(tmp_path):
    record = conv.parse_record(_record())
    assert record.turns[0].type == "short_answer" and record.turns[1].type is None
    path = tmp_path / "chat.json"
    conv.write_records(path, [record])
    assert json.loads(path.read_text())[0] == _record()
    assert conv.read_records(path) == [record]
    with pytest.raises(ValueError, match=r"conversations\[1\]: 'from' must be"):
        conv.parse_record({"conversations": [{"from": "human", "value": "a"},
                                             {"from": "bot", "value": "b"}]})
    with pytest.raises(ValueError, match=r"unknown type 'essay'"):
        conv.parse_record(_record(type="essay", conversations=[{"from": "human", "value": "a"}]))
    path.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        conv.read_records(path)


def test_tags_and_messages():
    assert conv.tag_question("Is it?", "short_answer") == "Is it? <short_answer>"
    for kind in ("conversation", "free_response", "description"):
        assert conv.tag_question("Why?", kind) == "Why? <long_answer>"
    assert conv.tag_question("Pick (a) x (b) y", "multiple_choice").endswith(" <multiple_choice>")
    assert conv.tag_question("Report. <report_generation>", "report_generation") == (
        "Report. <report_generation>")
    assert conv.strip_tags("<image>\n <provided>Is it? <short_answer>") == "Is it?"
    messages = conv.to_messages(conv.parse_record(_record()), system_prompt="Be brief.")
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<image>\nIs there cardiomegaly? <short_answer>"},
        {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": "Describe the findings. <long_answer>"},
        {"role": "assistant", "content": "No pleural effusion."}]
    provided = conv.to_messages(conv.parse_record(_record()), mark_provided=True,
                                type_tags=False)
    assert provided[0]["content"] == "<image>\n <provided>Is there cardiomegaly?"
    bad = _record(conversations=[{"from": "human", "value": "a"}, {"from": "human", "value": "b"}])
    with pytest.raises(ValueError, match="must alternate"):
        conv.to_messages(conv.parse_record(bad))


def _segments(ids, mask):
    """Runs of consecutive positions where mask is True, as id lists."""
    runs, current = [], []
    for token, on in zip(ids, mask):
        if on:
            current.append(int(token))
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_token_and_label_layout(tokenizer):
    record = conv.parse_record(_record())
    chat = conv.tokenize_record(tokenizer, record)
    ids = chat.input_ids
    header = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
    at = len(tokenizer(header, add_special_tokens=False)["input_ids"])
    assert chat.image_positions == (at,)
    assert tokenizer.decode(ids[:at]) == header
    assert ids[at] == conv.IMAGE_PLACEHOLDER_ID and chat.labels[at] == conv.IGNORE_INDEX
    assert tokenizer.decode(ids[at + 1:at + 3]).startswith("\nIs")
    assert list(ids).count(conv.IMAGE_PLACEHOLDER_ID) == 1
    text_ids = ids[ids != conv.IMAGE_PLACEHOLDER_ID]
    assert tokenizer.decode(text_ids) == chat.text.replace("<image>", "")
    # The tags are single tokens once added.
    assert tokenizer.convert_tokens_to_ids("<short_answer>") in ids.tolist()
    assert tokenizer.convert_tokens_to_ids("<long_answer>") in ids.tolist()
    # Loss only on the two answers, each with its end-of-turn token.
    answers = _segments(chat.labels, chat.loss_mask)
    assert [tokenizer.decode(a) for a in answers] == [
        "Yes.<|eot_id|>", "No pleural effusion.<|eot_id|>"]
    np.testing.assert_array_equal(chat.labels[chat.loss_mask], ids[chat.loss_mask])
    # The prompt side ends with the assistant header right before each answer.
    first = int(np.argmax(chat.loss_mask))
    assert tokenizer.decode([t for t in ids[:first] if t >= 0]).endswith(
        "<short_answer><|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_generation_prompt_has_no_labels(tokenizer):
    record = conv.parse_record(_record(conversations=[
        {"from": "human", "value": "<image>\nIs there cardiomegaly?", "type": "short_answer"}]))
    chat = conv.tokenize_chat(tokenizer, conv.to_messages(record), add_generation_prompt=True)
    assert not chat.loss_mask.any()
    assert chat.text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_template_that_is_not_prefix_stable_is_refused(tokenizer):
    import copy
    odd = copy.copy(tokenizer)
    odd.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                         "{% if loop.last %} END{% endif %}\n{% endfor %}")
    with pytest.raises(ValueError, match="prefix by prefix"):
        conv.tokenize_record(odd, conv.parse_record(_record()))


def test_visual_tokens_are_spliced_in_place(tokenizer):
    chat = conv.tokenize_record(tokenizer, conv.parse_record(_record()))
    at = chat.image_positions[0]
    example = expand_image_placeholders(chat, 3, fill_id=7)
    assert len(example["input_ids"]) == len(chat.input_ids) + 2
    np.testing.assert_array_equal(np.flatnonzero(example["visual_mask"]), [at, at + 1, at + 2])
    assert (example["labels"][example["visual_mask"]] == conv.IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="cuts through the visual tokens"):
        expand_image_placeholders(chat, 3, max_length=at + 2)
    short = expand_image_placeholders(chat, 3, max_length=at + 5)
    batch = pad_batch([example, short], length=len(example["input_ids"]) + 1)
    assert batch["attention_mask"].sum(1).tolist() == [len(example["input_ids"]), at + 5]
    assert (batch["labels"][1, at + 5:] == conv.IGNORE_INDEX).all()

    text = jnp.zeros((2, batch["input_ids"].shape[1], 4))
    visual = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4) + 1
    merged = np.asarray(insert_visual_tokens(text, visual, jnp.asarray(batch["visual_mask"])))
    np.testing.assert_array_equal(merged[:, at:at + 3], np.asarray(visual))
    assert not merged[:, :at].any() and not merged[:, at + 3:].any()


def test_llava_llama3_template_reproduces_the_original_prompt(tokenizer):
    """The string LLaVA's "llama3" Conversation.get_prompt builds (system text prefixed with
    <|begin_of_text|>, MPT separators), plus the BOS its tokenisation adds."""
    import copy
    llava = copy.copy(tokenizer)
    llava.chat_template = conv.LLAVA_LLAMA3_TEMPLATE
    record = conv.parse_record(_record())
    messages = conv.to_messages(record, system_prompt=". You are a radiology assistant.")
    chat = conv.tokenize_chat(llava, messages)
    system = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
              ". You are a radiology assistant.")
    roles = ("<|start_header_id|>user<|end_header_id|>\n\n",
             "<|start_header_id|>assistant<|end_header_id|>\n\n")
    expected = "<|begin_of_text|>" + system + "<|eot_id|>" + "".join(
        roles[i % 2] + m["content"] + "<|eot_id|>" for i, m in enumerate(messages[1:]))
    assert chat.text == expected
    assert chat.input_ids[:2].tolist() == [tokenizer.bos_token_id] * 2
    assert [tokenizer.decode(a) for a in _segments(chat.labels, chat.loss_mask)] == [
        "Yes.<|eot_id|>", "No pleural effusion.<|eot_id|>"]
    prompt = conv.tokenize_chat(llava, messages[:2], add_generation_prompt=True)
    assert prompt.text == (system.join(["<|begin_of_text|>", "<|eot_id|>"]) + roles[0]
                           + messages[1]["content"] + "<|eot_id|>" + roles[1])
