r"""Fine-tunes CT-CHAT (CT-ViT -> projector -> LLM) on LLaVA-style question-answer JSON.

  python -m experiments.finetune_chat --gin experiments/configs/chat_demo.gin \
         [--gin_param K=V ...] [--workdir DIR] [--steps N]

Stages (`finetune.stage`): "projector" (stage 1, feature alignment), "lora" (stage 2: LoRA
on the LLM, rank/alpha configurable, + projector), "full" (the LLM and the projector).
`finetune.train_vision` also trains the CT-ViT encoder.  Rerunning in the same workdir
resumes from the newest orbax checkpoint (model + optimizer; the data order is a
function of the step).  Metrics go to <workdir>/metrics.jsonl; the run ends by writing the
inference model to <workdir>/model/ (a `ct_rate_jax.chat.checkpoint` directory, LoRA
merged, which `experiments.chat --checkpoint <workdir>` reads) and, with `eval_json`, the held-out
yes/no accuracy to <workdir>/eval.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx

from ct_rate_jax import sharding
from ct_rate_jax.chat import conversation as conv
from ct_rate_jax.chat import data as chat_data
from ct_rate_jax.chat import lora, synthetic_qa
from ct_rate_jax.chat.checkpoint import save_chat_checkpoint
from ct_rate_jax.chat.multimodal import expand_image_placeholders
from ct_rate_jax.chat.model import CTChat, CTChatConfig, vision_filter
from ct_rate_jax.chat.projector import ProjectorConfig
from ct_rate_jax.models.ctvit import CTViTConfig
from ct_rate_jax.models.llm_config import LLMConfig
from ct_rate_jax.training import checkpoints
from ct_rate_jax.training.metrics_writer import MetricsWriter
from experiments import gin_setup
from experiments.synthetic_setup import SyntheticData, ensure_synthetic_data

FLAGS = flags.FLAGS
# --gin, --gin_param, --workdir and --steps: experiments/gin_setup.py.

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
gin.external_configurable(LLMConfig)
gin.external_configurable(synthetic_qa.QASettings)


def _records(json_path: str | None, synthetic: SyntheticData | None, split: str,
             settings: synthetic_qa.QASettings, workdir: str) -> list[conv.ChatRecord]:
    """The chat JSON, or questions made from the synthetic release (saved in workdir)."""
    if json_path:
        return conv.read_records(json_path)
    if synthetic is None:
        raise ValueError(f"finetune.{split}_json is not set and there is no synthetic_data")
    records = synthetic_qa.make_chat_data(synthetic.release_dir, split, settings)
    conv.write_records(os.path.join(workdir, f"chat_{split}.json"), records)
    return records


def _images(records, shard_dir, encodings_dir, context_size):
    names = {r.image for r in records}
    if encodings_dir:
        return chat_data.load_encodings(encodings_dir, names, context_size), "tokens"
    if not shard_dir:
        raise ValueError("set finetune.train_shards / eval_shards (prepared volumes) or "
                         "finetune.train_encodings / eval_encodings (precomputed CT-ViT tokens)")
    return chat_data.load_shard_volumes(shard_dir, names), "volume"


def _preprocessing(shard_dir: str | None) -> dict[str, Any] | None:
    """The shards' preprocessing (chat applies it to user scans); None for encodings."""
    if shard_dir is None:
        return None
    with open(os.path.join(shard_dir, "manifest.json"), encoding="utf-8") as f:
        recorded = json.load(f).get("preprocessing", {})
    keys = ("target_spacing_mm", "target_shape", "hu_window", "min_slices",
            "clip_before_resample")
    return {k: recorded[k] for k in keys if k in recorded}


def yes_no_accuracy(model: CTChat, tokenizer, records, images, image_key: str,
                    batch_size: int = 32) -> dict[str, float]:
    """Greedy first answer token of each yes/no question vs its reference.

    The prompt is the question with the generation prompt; the model's argmax over the
    whole vocabulary at the last prompt position (what greedy decoding emits first) is
    decoded and read as yes / no / other.
    """
    questions = [r for r in records if len(r.turns) > 1
                 and r.turns[1].value.strip().lower().rstrip(".") in ("yes", "no")]
    if not questions:
        return {}
    n = model.config.num_visual_tokens
    examples = []
    for record in questions:
        messages = conv.to_messages(record)[:1]
        chat = conv.tokenize_chat(tokenizer, messages, add_generation_prompt=True)
        example = expand_image_placeholders(chat, n, fill_id=tokenizer.pad_token_id)
        example["image"] = record.image
        examples.append(example)
    length = max(len(e["input_ids"]) for e in examples)

    @nnx.jit
    def first_tokens(model, batch, last):
        logits = model(batch)
        return jnp.argmax(jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0], -1)

    correct = answered = 0
    for start in range(0, len(examples), batch_size):
        rows = examples[start:start + batch_size]
        rows = rows + [rows[0]] * (batch_size - len(rows))  # one compiled shape
        batch = chat_data.collate(rows, images, length, image_key, tokenizer.pad_token_id)
        last = np.asarray([len(r["input_ids"]) - 1 for r in rows], np.int32)
        tokens = np.asarray(first_tokens(model, batch, last))
        for record, token in zip(questions[start:start + batch_size], tokens):
            said = tokenizer.decode([int(token)]).strip().lower()
            reference = record.turns[1].value.strip().lower()
            answered += said.startswith(("yes", "no"))
            correct += bool(said) and reference.startswith(said.rstrip("."))
    return {"yes_no_accuracy": correct / len(questions),
            "yes_no_answered": answered / len(questions), "yes_no_questions": len(questions)}


@gin.configurable(denylist=["workdir_override", "steps_override"])
def finetune(workdir: str = gin.REQUIRED,
             llm: LLMConfig = gin.REQUIRED,
             ctvit: CTViTConfig | None = None,
             projector_queries: int = 256,
             projector_heads: int = 8,
             projector_width: int | None = None,
             projector_type: str = "attn_pool+mlp2x_gelu",
             stage: str = "lora",
             lora_rank: int = 128,
             lora_alpha: float = 256.0,
             lora_dropout: float = 0.05,
             lora_targets: Any = lora.ALL_LINEAR,
             train_vision: bool = False,
             train_json: str | None = None,
             eval_json: str | None = None,
             train_shards: str | None = None,
             eval_shards: str | None = None,
             train_encodings: str | None = None,
             eval_encodings: str | None = None,
             encoding_width: int = 512,
             synthetic_data: SyntheticData | None = None,
             qa_settings: synthetic_qa.QASettings = synthetic_qa.QASettings(),
             eval_qa_settings: synthetic_qa.QASettings = synthetic_qa.QASettings(
                 multiple_choice_per_volume=0, short_answer_per_volume=0, report_per_volume=0),
             tokenizer_vocab_size: int = 1024,
             max_length: int = 128,
             global_batch_size: int = 16,
             num_steps: int = 1000,
             learning_rate: float = 2e-4,
             warmup_steps: int = 30,
             weight_decay: float = 0.0,
             grad_accum_steps: int = 1,
             mesh_shape: tuple[int, int, int] = (-1, 1, 1),
             compute_dtype: str = "float32",
             remat: bool = False,
             seed: int = 0,
             log_every: int = 10,
             checkpoint_every: int = 200,
             keep_checkpoints: int = 2,
             workdir_override: str | None = None,
             steps_override: int | None = None) -> dict[str, Any]:
    """Fine-tunes CT-CHAT; returns the last logged metrics (and the evaluation).

    The LLM here is initialised at random with `llm` (vocab_size is set from the
    tokenizer, trained on the training questions when no tokenizer is given): the demo
    setting.  `ctvit` None = precomputed encodings (`*_encodings` folders of `.npz`,
    width `encoding_width`); otherwise volumes from prepared shards (`*_shards`, or the
    synthetic release's).  `grad_accum_steps` > 1 sums micro-batch gradients with
    `optax.MultiSteps` (the update happens every k-th step).
    """
    workdir = workdir_override or workdir
    num_steps = steps_override if steps_override is not None else num_steps
    if stage not in lora.STAGES:
        raise ValueError(f"finetune.stage must be one of {lora.STAGES}, got {stage!r}")
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"finetune.compute_dtype must be one of {sorted(COMPUTE_DTYPES)}")
    if num_steps < 0 or global_batch_size <= 0 or log_every <= 0 or checkpoint_every <= 0:
        raise ValueError("finetune.num_steps must be >= 0 and global_batch_size, log_every, "
                         "checkpoint_every > 0")
    os.makedirs(workdir, exist_ok=True)

    # --- Data. ---
    if synthetic_data is not None:
        ensure_synthetic_data(synthetic_data, log=print)
        train_shards = train_shards or synthetic_data.shard_dir("train")
        eval_shards = eval_shards or synthetic_data.shard_dir("valid")
    train_records = _records(train_json, synthetic_data, "train", qa_settings, workdir)
    eval_records = (_records(eval_json, synthetic_data, "valid", eval_qa_settings, workdir)
                    if eval_json or synthetic_data is not None else [])
    tokenizer_dir = os.path.join(workdir, "tokenizer")
    if os.path.exists(os.path.join(tokenizer_dir, "tokenizer.json")):
        from ct_rate_jax.models.llm_weights import load_tokenizer
        tokenizer = load_tokenizer(tokenizer_dir)
    else:
        tokenizer = chat_data.train_demo_tokenizer(chat_data.record_texts(train_records),
                                                   tokenizer_vocab_size, tokenizer_dir)
    context = ctvit.dim if ctvit is not None else encoding_width
    llm = dataclasses.replace(llm, vocab_size=len(tokenizer),
                              bos_token_id=tokenizer.bos_token_id,
                              eos_token_ids=(tokenizer.eos_token_id,),
                              pad_token_id=tokenizer.pad_token_id)
    config = CTChatConfig(
        llm=llm, ctvit=ctvit,
        projector=ProjectorConfig(hidden_size=llm.hidden_size, mm_projector_type=projector_type,
                                  mm_hidden_size=projector_width or context,
                                  mm_context_size=context, n_queries=projector_queries,
                                  n_heads=projector_heads))
    examples = chat_data.make_examples(tokenizer, train_records, config.num_visual_tokens,
                                       max_length)
    length = max(len(e["input_ids"]) for e in examples)
    images, image_key = _images(train_records,
                                None if ctvit is None else train_shards,
                                train_encodings if ctvit is None else None, context)
    batches = chat_data.ChatBatches(examples, images, batch_size=global_batch_size,
                                    length=length, image_key=image_key, seed=seed,
                                    pad_id=tokenizer.pad_token_id)

    # --- Model, optimizer and their shardings. ---
    mesh = sharding.make_mesh(*mesh_shape)
    if global_batch_size % sharding.data_parallel_size(mesh):
        raise ValueError(f"finetune.global_batch_size {global_batch_size} is not divisible by "
                         f"the data-parallel size {sharding.data_parallel_size(mesh)}")
    dtype = COMPUTE_DTYPES[compute_dtype]
    wrt = lora.trainable_filter(stage)
    if train_vision:
        if ctvit is None:
            raise ValueError("finetune.train_vision needs a live encoder (finetune.ctvit)")
        wrt = nnx.Any(wrt, vision_filter())
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(warmup_steps, 1),
                                                  max(num_steps, warmup_steps + 1))
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, weight_decay=weight_decay))
    if grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=grad_accum_steps)

    def build():
        model = CTChat(config, rngs=nnx.Rngs(params=seed, dropout=seed + 1), dtype=dtype,
                       remat=remat)
        if stage == "lora":
            lora.apply_lora(model.llm, lora_targets, rank=lora_rank, alpha=lora_alpha,
                            dropout=lora_dropout, rngs=nnx.Rngs(params=seed + 2,
                                                                dropout=seed + 3))
        return model, nnx.Optimizer(model, tx, wrt=wrt)

    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    shardings = sharding.state_shardings(abstract, mesh)
    with jax.set_mesh(mesh):
        state = jax.jit(lambda: nnx.split(build())[1], out_shardings=shardings)()
    checkpointer = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"),
                                            max_to_keep=keep_checkpoints)
    start_step = checkpointer.latest_step() or 0
    if start_step:
        state, _, _ = checkpointer.restore(start_step, abstract, shardings)
        print(f"resumed from {checkpointer.directory}/{start_step}")
    with open(os.path.join(workdir, "config.gin"), "w", encoding="utf-8") as f:
        f.write(gin.config_str())
    model, _ = nnx.merge(graphdef, state)
    print(f"stage {stage}: {lora.count_parameters(model, wrt):,} trainable of "
          f"{lora.count_parameters(model):,} parameters; {len(examples)} examples of "
          f"{length} positions; mesh {dict(mesh.shape)}; steps {start_step} -> {num_steps}")

    @jax.jit
    def train_step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)
        model.train()
        diff = nnx.DiffState(0, wrt)
        (loss, metrics), grads = nnx.value_and_grad(lambda m: m.loss(batch), argnums=diff,
                                                    has_aux=True)(model)
        optimizer.update(model, grads)
        metrics = dict(metrics, grad_norm=optax.global_norm(grads))
        return nnx.state((model, optimizer)), metrics

    writer = MetricsWriter(workdir, total_steps=num_steps, start_step=start_step)
    last: dict[str, Any] = {}
    t0, seen = time.perf_counter(), 0
    with jax.set_mesh(mesh):
        for step in range(start_step, num_steps):
            batch = sharding.host_batch_to_global(batches.batch(step), mesh)
            state, metrics = train_step(state, batch)
            done, seen = step + 1, seen + global_batch_size
            if done % log_every == 0 or done == num_steps:
                last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                last["examples_per_s"] = seen / (time.perf_counter() - t0)
                writer.write(done, last)
                t0, seen = time.perf_counter(), 0
            if done % checkpoint_every == 0 or done == num_steps:
                checkpointer.save(done, state, {"step": done}, {"stage": stage})
    checkpointer.wait_until_finished()
    checkpointer.close()
    writer.close()

    model, _ = nnx.merge(graphdef, state)
    model.eval()
    model_dir = os.path.join(workdir, "model")
    if os.path.isdir(model_dir):
        shutil.rmtree(model_dir)  # also an older run's layout
    save_chat_checkpoint(model_dir, llm=model.llm, projector=model.projector,
                         tokenizer=tokenizer, vision=model.vision, merge_lora=True,
                         added_tokens=conv.TAG_TOKENS, quantize=config.quantize,
                         preprocessing=_preprocessing(None if ctvit is None else train_shards),
                         source={"written_by": "experiments.finetune_chat", "step": num_steps,
                                 "stage": stage, "workdir": os.path.abspath(workdir)})
    result = dict(last)
    if eval_records:
        eval_images, _ = _images(eval_records, None if ctvit is None else eval_shards,
                                 eval_encodings if ctvit is None else None, context)
        evaluation = yes_no_accuracy(model, tokenizer, eval_records, eval_images, image_key)
        with open(os.path.join(workdir, "eval.json"), "w", encoding="utf-8") as f:
            json.dump(dict(evaluation, step=num_steps), f, indent=1)
        print("held-out evaluation: " + json.dumps(evaluation))
        result.update(evaluation)
    return result


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    try:
        gin_setup.parse_gin(FLAGS.gin, FLAGS.gin_param)
        finetune(workdir_override=FLAGS.workdir, steps_override=FLAGS.steps)
    except (gin_setup.ConfigError, ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    app.run(main)
