"""finetune_chat end to end at a tiny size, on precomputed encodings: the loss falls, the
run resumes from its checkpoint, writes the inference model and the yes/no evaluation;
then experiments.chat answers from that model (--question and --batch)."""

import json
import os

import numpy as np
import pytest

from ct_rate_jax.chat import conversation as conv
from ct_rate_jax.chat.projector import encoding_path, save_encoding
from ct_rate_jax.models.llm_config import LLMConfig


def _data(root, count=16):
    """Yes/no questions whose answer is carried by the encoding (its sign pattern)."""
    rng = np.random.default_rng(0)
    records = []
    os.makedirs(root / "enc", exist_ok=True)
    for i in range(count):
        name = f"train_{i}_a_1.nii.gz"
        present = i % 2 == 0
        tokens = rng.normal(size=(2, 2, 2, 8)).astype(np.float32)
        tokens[..., 0] = 3.0 if present else -3.0
        save_encoding(encoding_path(str(root / "enc"), name), tokens)
        records.append(conv.parse_record({
            "id": f"train_{i}_a_1_yes_no_0", "image": name,
            "conversations": [{"from": "human", "value": "<image>\nIs there a nodule?",
                               "type": "short_answer"},
                              {"from": "gpt", "value": "Yes." if present else "No."}]}))
    conv.write_records(root / "train.json", records)
    return records


def _run(workdir, root, steps):
    from experiments.finetune_chat import finetune

    return finetune(workdir=str(workdir), llm=LLMConfig.tiny(num_hidden_layers=1),
                    projector_queries=2, projector_heads=2, stage="full",
                    train_json=str(root / "train.json"), eval_json=str(root / "train.json"),
                    train_encodings=str(root / "enc"), eval_encodings=str(root / "enc"),
                    encoding_width=8, tokenizer_vocab_size=300, global_batch_size=8,
                    num_steps=steps, learning_rate=3e-3, warmup_steps=1, log_every=1,
                    checkpoint_every=4)


@pytest.mark.slow
def test_finetune_resume_and_chat(tmp_path, capsys):
    _data(tmp_path)
    workdir = tmp_path / "run"
    _run(workdir, tmp_path, 8)
    losses = [json.loads(line)["loss"] for line in open(workdir / "metrics.jsonl")]
    assert len(losses) == 8 and losses[-1] < 0.8 * losses[0]
    result = _run(workdir, tmp_path, 10)
    assert "resumed from" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl")]
    assert steps == list(range(1, 11))  # continues at 9, nothing replayed
    evaluation = json.loads((workdir / "eval.json").read_text())
    assert evaluation["yes_no_questions"] == 16 and result["yes_no_answered"] > 0

    # <workdir>/model/ is a CT-CHAT checkpoint directory (the format convert_ctchat writes).
    from ct_rate_jax.chat.checkpoint import read_chat_config

    assert read_chat_config(workdir / "model")["source"]["step"] == 10

    # The chat command on that model (in process): one question, then a batch file.
    from experiments import chat

    command = ["--checkpoint", str(workdir), "--volume",
               str(tmp_path / "enc" / "train_0_a_1.npz"), "--max-new-tokens", "4"]
    assert chat.main(command + ["--question", "Is there a nodule?",
                                "--type", "short_answer"]) == 0
    once = capsys.readouterr().out.strip()
    (tmp_path / "q.jsonl").write_text(
        json.dumps({"id": "a", "question": "Is there a nodule?", "type": "short_answer"})
        + "\n" + json.dumps({"question": "Is there a nodule?", "type": "short_answer"}) + "\n")
    assert chat.main(command + ["--batch", str(tmp_path / "q.jsonl"),
                                "--out", str(tmp_path / "a.jsonl")]) == 0
    answers = [json.loads(line) for line in open(tmp_path / "a.jsonl")]
    assert [a["id"] for a in answers] == ["a", 1]
    # Greedy: the same question gets the same answer as --question printed.
    assert answers[0]["answer"] == answers[1]["answer"] == once
    (tmp_path / "bad.jsonl").write_text('{"question": "x", "type": "poem"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: unknown type 'poem'"):
        chat.main(command + ["--batch", str(tmp_path / "bad.jsonl"), "--out",
                             str(tmp_path / "b.jsonl")])
