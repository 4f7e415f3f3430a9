r"""Chat with a fine-tuned CT-CHAT model about one CT volume.

  python -m experiments.chat --checkpoint CHECKPOINT --volume SCAN \
         [--question "Is there cardiomegaly in this CT volume?" | --batch q.jsonl --out a.jsonl]
         [--type short_answer] [--max-new-tokens 128] [--temperature 0] [--top-p 1]

CHECKPOINT is a CT-CHAT checkpoint directory (`ct_rate_jax.chat.checkpoint`): a
finetune_chat workdir or its model/, or the output of experiments.convert_ctchat.
SCAN is a NIfTI file, a DICOM series folder (brought to the training grid with
`data_pipeline.user_scans`, the project's preprocessing) or a precomputed CT-ViT
encoding `.npz` (key `arr`).  With `--question` the answer is printed and the command
exits; with `--batch` every line {"question": ..., "type": ...} (optional "id") gets a
line {"id", "question", "answer"} in `--out`; with neither, an interactive session streams
each reply token by token (the conversation so far is the context; empty line or
Ctrl-D ends it).  The question type adds CT-CHAT's tag (`<short_answer>`, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterator

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ct_rate_jax.chat import conversation as conv
from ct_rate_jax.chat.multimodal import expand_image_placeholders
from ct_rate_jax.chat.projector import load_encoding
from experiments.cli import read_json_lines, run_command


def load_visual_input(path: str, model, preprocessing) -> dict[str, np.ndarray]:
    """{"tokens": float32[1, T, h, w, E]} for an .npz, else {"volume": float32[1, D, H, W]}."""
    if path.endswith(".npz"):
        return {"tokens": load_encoding(path, model.config.projector.mm_context_size)}
    if model.vision is None:
        raise ValueError(f"{path}: this model has no vision encoder (it was trained on "
                         "precomputed encodings); pass a CT-ViT encoding .npz")
    if not preprocessing:
        raise ValueError("the checkpoint records no preprocessing for volumes")
    from data_pipeline.input_pipeline import normalise_hu
    from data_pipeline.preprocess import PreprocessConfig
    from data_pipeline.user_scans import iter_user_volumes

    config = PreprocessConfig(**{k: tuple(v) if isinstance(v, list) else v
                                 for k, v in preprocessing.items()})
    errors: list[tuple[str, str]] = []
    volumes = list(iter_user_volumes(path, config, errors=errors))
    if not volumes:
        raise ValueError(f"{path}: no readable scan" + "".join(
            f"\n  {where}: {why}" for where, why in errors))
    if len(volumes) > 1:
        raise ValueError(f"{path} holds {len(volumes)} scans "
                         f"({', '.join(name for name, _, _ in volumes[:5])}); pass one")
    _, volume_hu, _ = volumes[0]
    return {"volume": normalise_hu(volume_hu, config.hu_window)[None]}


@nnx.jit
def _visual_tokens(model, visual):
    return model.visual_tokens(visual)


class ChatSession:
    """A conversation about one volume: the visual tokens are computed once."""

    def __init__(self, model, tokenizer, visual: dict[str, np.ndarray], *,
                 max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0):
        from ct_rate_jax.models.llm_generate import SamplingConfig

        self.model, self.tokenizer = model, tokenizer
        self.visual_bnh = _visual_tokens(model, {k: jnp.asarray(v) for k, v in visual.items()})
        stops = tuple({tokenizer.eos_token_id, *model.config.llm.eos_token_ids} - {None})
        self.sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                                       top_p=top_p, stop_token_ids=stops,
                                       pad_token_id=tokenizer.pad_token_id or 0)
        self.seed = seed
        self.messages: list[dict[str, str]] = []

    def _embeds(self, question: str, question_type: str | None):
        first = not self.messages
        text = (conv.IMAGE_TOKEN + "\n" + question) if first else question
        messages = self.messages + [{"role": "user",
                                     "content": conv.tag_question(text, question_type)}]
        chat = conv.tokenize_chat(self.tokenizer, messages, add_generation_prompt=True)
        example = expand_image_placeholders(chat, self.visual_bnh.shape[1],
                                            fill_id=self.tokenizer.pad_token_id or 0)
        from ct_rate_jax.chat.multimodal import insert_visual_tokens

        ids = jnp.asarray(example["input_ids"])[None]
        embeds = insert_visual_tokens(self.model.llm.embed(ids), self.visual_bnh,
                                      jnp.asarray(example["visual_mask"])[None])
        return messages, embeds

    def reply_stream(self, question: str, question_type: str | None = None
                     ) -> Iterator[str]:
        """Yields the reply's text piece by piece; the turn joins the conversation."""
        import jax

        from ct_rate_jax.models.llm_generate import stream

        messages, embeds = self._embeds(question, question_type)
        mask = jnp.ones(embeds.shape[:2], bool)
        tokens: list[int] = []
        shown = ""
        for step in stream(self.model.llm, inputs_embeds=embeds, attention_mask=mask,
                           sampling=self.sampling, rng=jax.random.key(self.seed)):
            token = int(step[0])
            if token in self.sampling.stop_token_ids:
                break
            tokens.append(token)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # wait for a multi-byte character to complete
                yield text[len(shown):]
                shown = text
        answer = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        self.messages = messages + [{"role": "assistant", "content": answer}]

    def ask(self, question: str, question_type: str | None = None) -> str:
        """The whole reply (the session keeps the turn)."""
        return "".join(self.reply_stream(question, question_type)).strip()


def read_batch(path: str) -> list[dict]:
    items = []
    for number, item in read_json_lines(path):
        if not isinstance(item.get("question"), str):
            raise ValueError(f"{path}:{number}: expected an object with a 'question' string")
        if item.get("type") is not None and item["type"] not in conv.QUESTION_TYPES:
            raise ValueError(f"{path}:{number}: unknown type {item['type']!r} (known: "
                             f"{', '.join(conv.QUESTION_TYPES)})")
        items.append(item)
    return items


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="finetune_chat workdir (or its model/) or convert_ctchat --out")
    parser.add_argument("--volume", required=True,
                        help="NIfTI file, DICOM series folder or CT-ViT encoding .npz")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--question", help="answer this question and exit")
    mode.add_argument("--batch", help="JSON lines {question, type?, id?}; needs --out")
    parser.add_argument("--out", help="answers JSON lines (with --batch)")
    parser.add_argument("--type", default=None, choices=conv.QUESTION_TYPES,
                        help="question type of --question / interactive questions (adds its tag)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.batch and not args.out:
        parser.error("--batch needs --out")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from ct_rate_jax.chat.checkpoint import load_ctchat_model

    if not os.path.exists(args.volume):
        raise FileNotFoundError(f"--volume {args.volume} does not exist")
    model, tokenizer, saved = load_ctchat_model(args.checkpoint)
    visual = load_visual_input(args.volume, model, saved.get("preprocessing"))
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, seed=args.seed)
    if args.question is not None:
        print(ChatSession(model, tokenizer, visual, **options).ask(args.question, args.type))
        return 0
    if args.batch:
        items = read_batch(args.batch)
        with open(args.out + ".tmp", "w", encoding="utf-8") as f:
            for number, item in enumerate(items):
                session = ChatSession(model, tokenizer, visual, **options)  # independent
                answer = session.ask(item["question"], item.get("type", args.type))
                f.write(json.dumps({"id": item.get("id", number), "question": item["question"],
                                    "answer": answer}) + "\n")
        os.replace(args.out + ".tmp", args.out)
        print(f"{len(items)} answers written to {args.out}")
        return 0
    session = ChatSession(model, tokenizer, visual, **options)
    print(f"Chatting about {args.volume}. Empty line or Ctrl-D ends.")
    while True:
        try:
            question = input("you> ").strip()
        except EOFError:
            break
        if not question:
            break
        sys.stdout.write("ct-chat> ")
        for piece in session.reply_stream(question, args.type):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
