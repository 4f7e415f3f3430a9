r"""Contrastive pretraining of CT-CLIP on prepared CT-RATE shards.

  python -m experiments.pretrain --gin experiments/configs/demo.gin [--gin_param K=V ...]
         [--workdir DIR] [--steps N] [--profile_steps START:END]
         [--coordinator_address HOST:PORT --num_processes N --process_id I]

Rerunning the same command in the same workdir resumes from the newest checkpoint
(model, optimizer and data iterator together).  SIGTERM (preemption) or Ctrl-C ends the
run after the current step with a checkpoint on disk and exit status 0.  Metrics go to
<workdir>/metrics.jsonl and TensorBoard files in <workdir>/tensorboard; with
`train.zero_shot_at_end` the run ends with the zero-shot abnormality table on the
evaluation shards.  On a TPU slice, a SLURM step or with the --coordinator_address
flags the same command runs as one process per host (or GPU); see docs/scaling.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable

import gin
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx

from ct_rate_jax import checkpoint_io, flops, hardware, sharding
from ct_rate_jax.evaluation import zero_shot
from ct_rate_jax.models.ct_clip import CTCLIP, CTCLIPConfig
from ct_rate_jax.training import checkpoints, distributed, preemption, profiling, train_state
from ct_rate_jax.training.metrics_writer import MetricsWriter
from data_pipeline import input_pipeline, schema
from data_pipeline.tokenizer import TextEncoder
from experiments import gin_setup
from experiments.synthetic_setup import SyntheticData, ensure_synthetic_data

FLAGS = flags.FLAGS
# --gin, --gin_param, --workdir and --steps: experiments/gin_setup.py.
flags.DEFINE_string("profile_steps", None, "START:END: write a jax.profiler trace of these "
                    "steps to <workdir>/profile (overrides train.profile_steps)")
# Multi-process runs (ct_rate_jax/training/distributed.py); TPU slices, SLURM steps and
# Open MPI jobs are detected without them.
flags.DEFINE_enum("distributed", "auto", distributed.MODES, "join a multi-process run: "
                  "auto (when the flags below are given or a cluster is detected), on, off")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator")
flags.DEFINE_integer("num_processes", None, "number of processes in the run")
flags.DEFINE_integer("process_id", None, "this process's index, 0 .. num_processes - 1")
flags.DEFINE_list("local_device_ids", None, "local devices this process drives, e.g. 0,1")

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ----------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DataPaths:
    train: str
    eval: str | None
    tokenizer: str


def resolve_data(train_data, eval_data, tokenizer, synthetic_data: SyntheticData | None,
                 log) -> DataPaths:
    """Paths of shards and tokenizer; builds the synthetic demo data when configured."""
    if synthetic_data is not None:
        if jax.process_index() == 0:  # the others wait for it (a shared filesystem)
            ensure_synthetic_data(synthetic_data, log=log)
        distributed.barrier("synthetic_data")
        train_data = train_data or synthetic_data.shard_dir("train")
        eval_data = eval_data or synthetic_data.shard_dir("valid")
        tokenizer = tokenizer or synthetic_data.tokenizer_path
    for name, path in (("train.train_data", train_data), ("train.tokenizer", tokenizer)):
        if not path:
            raise ValueError(f"{name} is not set: bind it in the gin config or with --gin_param")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{name} = {path!r} does not exist")
    if eval_data and not os.path.exists(eval_data):
        raise FileNotFoundError(f"train.eval_data = {eval_data!r} does not exist")
    return DataPaths(train_data, eval_data, tokenizer)


def check_data_fits_model(paths: DataPaths, model: CTCLIPConfig, max_text_length: int) -> None:
    """Fails before any compilation if volumes or vocabulary do not fit the model."""
    shape = input_pipeline.peek_record(paths.train).volume_hu.shape
    cfg = model.ctvit
    if shape[1] != cfg.image_size or shape[2] != cfg.image_size or not cfg.num_frames_ok(shape[0]):
        raise ValueError(
            f"volumes in {paths.train} have shape (D, H, W) = {tuple(shape)}, but the model "
            f"expects H = W = CTViTConfig.image_size = {cfg.image_size} and D divisible by "
            f"CTViTConfig.temporal_patch_size = {cfg.temporal_patch_size}")
    vocab = TextEncoder.from_path(paths.tokenizer, max_text_length).vocab_size
    if vocab > model.text.vocab_size:
        raise ValueError(f"the tokenizer {paths.tokenizer} has {vocab} tokens but "
                         f"BertConfig.vocab_size is {model.text.vocab_size}")
    if max_text_length > model.text.max_position_embeddings:
        raise ValueError(f"train.max_text_length = {max_text_length} exceeds "
                         f"BertConfig.max_position_embeddings = "
                         f"{model.text.max_position_embeddings}")


# ----------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------

def _pad_rows(array: np.ndarray, multiple: int) -> np.ndarray:
    extra = (-len(array)) % multiple
    return np.concatenate([array, np.repeat(array[:1], extra, axis=0)]) if extra else array


def run_zero_shot(state: train_state.TrainState, pipeline: input_pipeline.PipelineConfig,
                  names=schema.ABNORMALITIES) -> zero_shot.ZeroShotResult:
    """Zero-shot AUROC over the evaluation shards with the official prompt pair.

    Every process reads the whole (small) evaluation set and puts the rows its devices
    own; the latents are gathered back, so every process scores every volume.
    """
    embed_images, embed_texts = train_state.make_embed_fns(state)
    mesh = state.mesh
    encoder = TextEncoder.from_path(pipeline.tokenizer_path, pipeline.max_text_length)
    rows = sharding.data_parallel_size(mesh)
    to_device = lambda value: distributed.global_array_from_full(  # noqa: E731
        value, sharding.batch_sharding(mesh))

    def images(volume):
        return distributed.fetch_global(embed_images(state.state, to_device(volume)))

    def prompts(texts):
        ids, mask = encoder.encode_batch(texts)
        ids, mask = _pad_rows(ids, rows), _pad_rows(mask, rows)
        latents = embed_texts(state.state, to_device(ids), to_device(mask))
        return distributed.fetch_global(latents)[:len(texts)]

    batches = input_pipeline.iterate_eval_batches(pipeline)
    return zero_shot.evaluate_zero_shot(batches, images, prompts,
                                        train_state.logit_scale(state), names)


# ----------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------

@gin.configurable(denylist=["workdir_override", "steps_override", "profile_steps_override"])
def train(workdir: str = gin.REQUIRED,
          model: CTCLIPConfig = gin.REQUIRED,
          optimizer: Callable = gin.REQUIRED,
          global_batch_size: int = 8,
          num_steps: int = 1000,
          train_data: str | None = None,
          eval_data: str | None = None,
          tokenizer: str | None = None,
          text_tower_init: str | None = None,
          init_checkpoint: str | None = None,
          synthetic_data: SyntheticData | None = None,
          max_text_length: int = 512,
          text_sections: tuple[str, ...] = ("findings",),
          sentence_sampling_prob: float = 0.0,
          sentence_views: int = 0,
          sentence_view_length: int = 32,
          sentence_keys: str = "text",
          sentence_loss_weight: float = 1.0,
          sentence_text_loss_weight: float = 0.0,
          mesh_shape: tuple[int, int, int] = (-1, 1, 1),
          compute_dtype: str = "float32",
          remat_policy: str | None = None,
          loss: str = "softmax",
          chunked_loss: bool = False,
          grad_accum_steps: int = 1,
          seed: int = 0,
          num_data_workers: int = 0,
          bad_records: str = "stop",
          nonfinite: str = "skip",
          log_every: int = 10,
          checkpoint_every: int = 500,
          keep_checkpoints: int = 3,
          zero_shot_at_end: bool = True,
          eval_batch_size: int | None = None,
          profile_steps: str | None = None,
          workdir_override: str | None = None,
          steps_override: int | None = None,
          profile_steps_override: str | None = None) -> dict[str, Any]:
    """Trains CT-CLIP; returns the final metrics (and zero-shot results when run).

    Args (the gin bindings):
      workdir: run directory (checkpoints, metrics, config).
      model: the CTCLIPConfig to train.
      optimizer: `f(total_steps) -> (optax transformation, schedule)`, e.g.
        @adamw_warmup_cosine.
      global_batch_size: volume-report pairs per step over all devices and hosts.
      mesh_shape: (data, fsdp, tensor) sizes; one may be -1 (all remaining devices).
      tokenizer: tokenizer.json, or a Hugging Face model directory with vocab.txt.
      text_tower_init: a local Hugging Face BERT directory (e.g. CXR-BERT) whose
        weights initialise the text tower of a fresh run (after `init_checkpoint`).
      init_checkpoint: a model directory (`python -m experiments.convert_official`)
        whose weights initialise the model of a fresh run; `model` must have its shapes
        (include the directory's model.gin).  Ignored when resuming.
      synthetic_data: build and use the synthetic demo data (demo.gin).
      text_sections: report sections used as text ("findings", "impressions").
      sentence_sampling_prob: probability of training on a random subset of a report's
        sentences instead of the whole report (text augmentation; 0 = off).
      sentence_views: m > 0 adds m single sentences per report as extra text views and
        `sentence_loss_weight` times their multi-positive InfoNCE
        (`losses.multi_positive_softmax_loss`): a sentence is a positive for every
        volume of the global batch whose report makes the same statement
        (docs/demo_zero_shot.md).  0 (default): off, the official loss alone.
      sentence_view_length: tokens per sentence view.
      sentence_keys: which sentences are the same statement: "text" (identical
        normalised sentences) or "synthetic_statement" (the synthetic reports'
        templates: "No X was detected." = "X is not present.").
      sentence_text_loss_weight: adds that times a text-text contrastive loss among the
        sentence views (`losses.supervised_contrastive_loss`: views of the same statement
        are positives), inside the sentence loss; 0 (default): off.
      loss: "softmax" (InfoNCE, official) or "sigmoid" (SigLIP; needs
        `CTCLIPConfig.init_logit_bias`).
      compute_dtype: "float32" or "bfloat16" (matmuls and activations; parameters and
        optimizer state stay float32).
      remat_policy: None or "full" / "dots" / "dots_no_batch": rematerialise every
        transformer block with that `jax.checkpoint_policies` policy.
      chunked_loss: compute the loss with the `shard_map` ring (never the whole [B, B]
        logit matrix on one device).
      grad_accum_steps: micro-batches per step; the gradient is still the global batch's
        (gradient caching), with one micro-batch's activations in memory at a time.
      bad_records: a training record that cannot be read: "stop" (default) fails naming
        its shard, index and volume; "skip" trains on the next readable record instead
        and counts it (`substituted_records` in the metrics).
      nonfinite: a step whose loss or gradient norm is not finite never changes the
        state; "skip" (default) logs it (step, VolumeNames, loss, gradient norm) and goes
        on, counting `nonfinite_steps`; "stop" ends the run with that message.
      profile_steps: "START:END": a jax.profiler trace of those steps (0-based, END
        excluded) in <workdir>/profile, written by process 0.
    """
    workdir = workdir_override or workdir
    num_steps = steps_override if steps_override is not None else num_steps
    profile_window = profiling.parse_profile_steps(profile_steps_override or profile_steps)
    is_main = jax.process_index() == 0
    log = print if is_main else (lambda *a, **k: None)
    for name, value, least in (("num_steps (--steps)", num_steps, 0),
                               ("global_batch_size", global_batch_size, 1),
                               ("log_every", log_every, 1),
                               ("checkpoint_every", checkpoint_every, 1),
                               ("keep_checkpoints", keep_checkpoints, 1),
                               ("num_data_workers", num_data_workers, 0)):
        if value < least:
            raise ValueError(f"train.{name} must be >= {least}, got {value}")
    if not 0.0 <= sentence_sampling_prob <= 1.0:
        raise ValueError(f"train.sentence_sampling_prob must be in [0, 1], got "
                         f"{sentence_sampling_prob}")
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"train.compute_dtype must be one of {sorted(COMPUTE_DTYPES)}")
    if sentence_views < 0:
        raise ValueError(f"train.sentence_views must be >= 0, got {sentence_views}")
    if sentence_keys not in input_pipeline.SENTENCE_KEYS:
        raise ValueError(f"train.sentence_keys must be one of {input_pipeline.SENTENCE_KEYS}, "
                         f"got {sentence_keys!r}")
    if sentence_views and not 2 < sentence_view_length <= model.text.max_position_embeddings:
        raise ValueError(f"train.sentence_view_length = {sentence_view_length} must be in "
                         f"[3, {model.text.max_position_embeddings}] (the text tower's "
                         f"max_position_embeddings)")
    sentence_loss_weight = sentence_loss_weight if sentence_views else 0.0
    if sentence_text_loss_weight < 0:
        raise ValueError(f"train.sentence_text_loss_weight must be >= 0, got "
                         f"{sentence_text_loss_weight}")
    train_state.check_loss_settings(model, loss, grad_accum_steps, sentence_loss_weight)
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"train.nonfinite must be one of {NONFINITE_POLICIES}, got "
                         f"{nonfinite!r}")
    if bad_records not in input_pipeline.BAD_RECORD_POLICIES:
        raise ValueError(f"train.bad_records must be one of "
                         f"{input_pipeline.BAD_RECORD_POLICIES}, got {bad_records!r}")

    # --- Data and model checks, before anything is compiled or written. ---
    paths = resolve_data(train_data, eval_data, tokenizer, synthetic_data, log)
    check_data_fits_model(paths, model, max_text_length)
    try:
        mesh = sharding.make_mesh(*mesh_shape)
    except ValueError as error:
        raise ValueError(f"train.mesh_shape = {tuple(mesh_shape)}: {error}") from None
    if global_batch_size % (grad_accum_steps * sharding.data_parallel_size(mesh)):
        raise ValueError(f"train.global_batch_size = {global_batch_size} is not divisible by "
                         f"train.grad_accum_steps ({grad_accum_steps}) x the data-parallel "
                         f"size ({sharding.data_parallel_size(mesh)})")
    pipeline = input_pipeline.PipelineConfig(
        shard_dir=paths.train, tokenizer_path=paths.tokenizer,
        global_batch_size=global_batch_size, max_text_length=max_text_length,
        text_sections=tuple(text_sections), sentence_sampling_prob=sentence_sampling_prob,
        seed=seed, num_workers=num_data_workers, bad_records=bad_records,
        normalise_on_device=True,
        sentence_views=sentence_views, sentence_view_length=sentence_view_length,
        sentence_keys=sentence_keys)

    # --- Train state, fresh or restored. ---
    dtype = COMPUTE_DTYPES[compute_dtype]
    model_factory = lambda rngs: CTCLIP(model, rngs=rngs, dtype=dtype,  # noqa: E731
                                        remat_policy=remat_policy)
    tx, schedule = optimizer(total_steps=max(num_steps, 1))
    checkpointer = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"),
                                            max_to_keep=keep_checkpoints)
    # A checkpoint or model directory of another model fails here, before the train
    # state is initialised (seconds and gigabytes for the released model sizes).
    start_step = checkpointer.latest_step()
    if start_step is not None:
        checkpointer.check_fits(start_step,
                                train_state.TrainState.abstract(model_factory, tx)[1])
    elif init_checkpoint:
        check_model_directory_fits(init_checkpoint, model)
    state = train_state.TrainState.create(model_factory, tx, mesh, seed)
    dataset = input_pipeline.make_train_dataset(
        pipeline, process_index=jax.process_index(), process_count=jax.process_count())
    data_iter = iter(dataset)
    if start_step is not None:
        _, abstract_state = train_state.TrainState.abstract(model_factory, tx)
        state.state, data_state, _ = checkpointer.restore(start_step, abstract_state,
                                                          state.shardings)
        data_iter.set_state(data_state)
        log(f"resumed from {checkpointer.directory}/{start_step}")
    elif init_checkpoint or text_tower_init:
        if init_checkpoint:
            init_from_model_directory(state, init_checkpoint, log)
        if text_tower_init:
            train_state.init_text_tower_from_hf(state, text_tower_init)
            log(f"text tower initialised from {text_tower_init}")
    start_step = start_step or 0
    if is_main:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.gin"), "w", encoding="utf-8") as f:
            f.write(gin.config_str())
    log(f"devices: {jax.device_count()} x {jax.devices()[0].platform} "
        f"({jax.process_count()} process(es)), mesh {dict(mesh.shape)}, "
        f"{train_state.parameter_count(state):,} parameters, steps {start_step} -> {num_steps}")

    # --- The loop: step N-1's finiteness flag and logged metrics are read while step N
    # runs, so the device always has a step queued. ---
    step_fn = train_state.make_train_step(state, schedule, loss=loss, chunked=chunked_loss,
                                          grad_accum_steps=grad_accum_steps,
                                          hu_window=pipeline.hu_window,
                                          sentence_loss_weight=sentence_loss_weight,
                                          sentence_text_loss_weight=sentence_text_loss_weight)
    batch_fields = ("volume", "volume_hu", "intensity_jitter", "input_ids",
                    "attention_mask") + (
        train_state.SENTENCE_VIEW_FIELDS if sentence_views else ())
    writer = MetricsWriter(workdir, total_steps=num_steps, start_step=start_step,
                           enabled=is_main)
    profiler = profiling.StepProfiler(profile_window, os.path.join(workdir, "profile"),
                                      enabled=is_main)
    meta = {"model": repr(model), "global_batch_size": global_batch_size}
    last_metrics: dict[str, Any] = {}
    pending = None
    depth = input_pipeline.peek_record(paths.train).volume_hu.shape[0]
    throughput = _Throughput(
        start_step, global_batch_size,
        flops.clip_step_flops(model, global_batch_size, depth, max_text_length).train_step
        / jax.device_count(), hardware.peak_flops_per_device(compute_dtype)[0])
    stopped_at = None
    watch = None  # (step, metrics, volume names) of the step whose finiteness is checked next
    try:
        with preemption.StopRequest() as stop:
            for step in range(start_step, num_steps):
                t0 = time.perf_counter()
                host_batch = next(data_iter)
                throughput.data_wait += time.perf_counter() - t0
                throughput.substituted += int(np.sum(host_batch["substituted"]))
                device_batch = sharding.host_batch_to_global(
                    {k: host_batch[k] for k in batch_fields if k in host_batch},
                    mesh)
                if step == start_step:  # every process compiles before any one runs
                    distributed.compile_then_sync(step_fn, state.state, device_batch,
                                                  name="train_step")
                profiler.before_step(step)
                with profiler.annotate(step):
                    state.state, metrics = step_fn(state.state, device_batch)
                profiler.after_step(step, metrics)
                done = step + 1
                # The previous step has finished by now (this one is queued behind it).
                if watch is not None:
                    _check_finite(watch, nonfinite, throughput, log)
                watch = (done, metrics, host_batch["volume_name"])
                if pending is not None:
                    last_metrics = _log(writer, pending, throughput)
                    pending = None
                writer.advance()
                if done % log_every == 0 or done == num_steps:
                    pending = (done, metrics)
                saved = done % checkpoint_every == 0 or done == num_steps
                if saved:
                    _save(checkpointer, done, state, data_iter, meta)
                if done < num_steps and stop.requested():
                    # Preemption or Ctrl-C: keep this step's work, then leave cleanly.
                    if not saved:
                        _save(checkpointer, done, state, data_iter, meta)
                    pending = pending or (done, metrics)
                    stopped_at = (done, stop.signal_name or "a stop request on another host")
                    break
            if watch is not None:
                _check_finite(watch, nonfinite, throughput, log)
            if pending is not None:
                last_metrics = _log(writer, pending, throughput)
            checkpointer.wait_until_finished()  # durable before we exit 0
    finally:
        profiler.close()
        writer.close()
        checkpointer.close()

    if stopped_at is not None:
        log(f"\nstopped at step {stopped_at[0]} on {stopped_at[1]}; checkpoint written to "
            f"{checkpointer.directory}/{stopped_at[0]}; rerun the same command to resume")
        return {"final_step": stopped_at[0], "stopped_by": stopped_at[1], **last_metrics}
    result: dict[str, Any] = {"final_step": num_steps, **last_metrics}
    if zero_shot_at_end and paths.eval:
        eval_config = dataclasses.replace(
            pipeline, shard_dir=paths.eval,
            global_batch_size=eval_batch_size or global_batch_size)
        zs = run_zero_shot(state, eval_config)
        log(f"\nZero-shot abnormality detection on {paths.eval} "
            f"({len(zs.volume_names)} held-out volumes):\n{zs.table()}")
        result["zero_shot"] = zs.to_json()
        if is_main:
            with open(os.path.join(workdir, "zero_shot.json"), "w", encoding="utf-8") as f:
                json.dump(result["zero_shot"], f, indent=2)
    return result


def check_model_directory_fits(directory: str, config: CTCLIPConfig) -> None:
    """Fails, listing the differing weights, when the model directory's config.json
    describes weights of other shapes than `config` (shapes only, nothing allocated;
    the weights themselves are checked again when they are loaded)."""
    def shapes(c: CTCLIPConfig) -> dict[str, tuple[int, ...]]:
        weights = checkpoint_io.weights_of(checkpoint_io.abstract_ctclip(c))
        return {jax.tree_util.keystr(path): tuple(leaf.shape)
                for path, leaf in jax.tree_util.tree_flatten_with_path(weights)[0]}

    theirs, ours = shapes(checkpoint_io.read_config(directory)), shapes(config)
    differences = [f"  {k}: directory {theirs.get(k)} vs model {ours.get(k)}"
                   for k in sorted(theirs.keys() | ours.keys()) if theirs.get(k) != ours.get(k)]
    if differences:
        raise checkpoint_io.ModelDirectoryError(
            f"the weights in {directory} do not fit the model ({len(differences)} "
            "difference(s); include the directory's model.gin):\n"
            + "\n".join(differences[:40]))


def init_from_model_directory(state: train_state.TrainState, directory: str, log=print) -> None:
    """Sets a fresh train state's model weights to a model directory's, in place.

    The optimizer state stays fresh.  Weights of another shape stop the run with one
    error naming the directory and every differing weight; config fields that differ
    without changing any shape (e.g. the temporal PEG layout) are logged.
    """
    model, optimizer = nnx.merge(state.graphdef, state.state)
    differences = checkpoint_io.config_differences(checkpoint_io.read_config(directory),
                                                   model.config)
    checkpoint_io.load_weights_into(model, directory)
    state.state = jax.device_put(nnx.state((model, optimizer)), state.shardings)
    log(f"model initialised from {directory}"
        + (f" (config fields that differ, its vs this run's: {'; '.join(differences)})"
           if differences else ""))


def _save(checkpointer, step: int, state, data_iter, meta) -> None:
    """Every process takes part (each writes the array shards it holds); the data
    iterator state, written once, is the same on every process (it counts global
    batches), which is checked when there are several."""
    data_state = data_iter.get_state()
    distributed.check_same_on_all_processes(data_state, "the data iterator state")
    checkpointer.save(step, state.state, data_state, meta)


NONFINITE_POLICIES = ("skip", "stop")


class NonFiniteError(RuntimeError):
    """A step's loss or gradient norm was not finite and `train.nonfinite` is "stop"."""


def _check_finite(watch, policy: str, throughput, log) -> None:
    """Reports a step that the train step refused to apply (non-finite loss/gradients)."""
    step, metrics, volume_names = watch
    if not int(jax.device_get(metrics["nonfinite"])):
        return
    throughput.nonfinite += 1
    values = jax.device_get({k: metrics[k] for k in ("loss", "grad_norm")})
    names = ", ".join(str(n) for n in np.asarray(volume_names).ravel())
    message = (f"step {step}: loss {float(values['loss'])}, gradient norm "
               f"{float(values['grad_norm'])}; the update was not applied "
               f"(this host's volumes: {names})")
    if policy == "stop":
        raise NonFiniteError(message + "; train.nonfinite='skip' would go on")
    log(f"\nwarning: {message}")


class _Throughput:
    """Volumes/s, model TFLOP/s per device and MFU (`ct_rate_jax.flops`, `hardware`),
    the share of time spent waiting for data (between two logged steps) and the running
    count of rows that replaced an unreadable record (`train.bad_records`)."""

    def __init__(self, step: int, global_batch_size: int, flops_per_device_step: float = 0.0,
                 peak_flops: float | None = None):
        self.step, self.time = step, time.perf_counter()
        self.global_batch_size = global_batch_size
        self.flops_per_device_step, self.peak_flops = flops_per_device_step, peak_flops
        self.data_wait = 0.0
        self.substituted = 0  # rows of this host that replaced an unreadable record
        self.nonfinite = 0  # steps whose update was refused (non-finite loss/gradients)

    def measure(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = max(now - self.time, 1e-9)
        flops_per_s = (step - self.step) * self.flops_per_device_step / elapsed
        values = {"volumes_per_s": (step - self.step) * self.global_batch_size / elapsed,
                  "tflops_per_device": flops_per_s / 1e12,
                  "data_wait_fraction": min(self.data_wait / elapsed, 1.0),
                  "substituted_records": float(self.substituted),
                  "nonfinite_steps": float(self.nonfinite)}
        if self.peak_flops:  # unknown for a device kind not in hardware.PEAK_TFLOPS
            values["mfu"] = flops_per_s / self.peak_flops
        self.step, self.time, self.data_wait = step, now, 0.0
        return values


def _log(writer, pending, throughput: _Throughput):
    """Fetches a finished step's metrics (the step after it is already queued)."""
    step, metrics = pending
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    values.update(throughput.measure(step))
    writer.write(step, values)
    return values


# ----------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------

GIN_CALL_SITE = "\n  In call to configurable "


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    try:
        # Before anything else touches JAX: a multi-process run joins its peers here.
        joined = distributed.initialize(distributed.DistributedSettings(
            mode=FLAGS.distributed, coordinator_address=FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
            local_device_ids=distributed.parse_device_ids(FLAGS.local_device_ids)))
        if joined and jax.process_index() == 0:
            print(f"distributed: {joined}", flush=True)
        gin_setup.parse_gin(FLAGS.gin, FLAGS.gin_param)
        train(workdir_override=FLAGS.workdir, steps_override=FLAGS.steps,
              profile_steps_override=FLAGS.profile_steps)
    except (gin_setup.ConfigError, ValueError, FileNotFoundError, NonFiniteError) as error:
        # Configuration and input mistakes: one clear line, no traceback (and without
        # the "In call to configurable 'train'" line gin adds: the setting is named).
        sys.exit(f"error: {str(error).split(GIN_CALL_SITE)[0]}")


if __name__ == "__main__":
    app.run(main)
