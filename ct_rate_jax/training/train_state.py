"""The train state (model + optimizer), created directly in its sharding, and the step.

The model and its nnx.Optimizer are split into a static graph definition and a pytree
of arrays (`state`).  The jitted step takes and returns that pytree with explicit
shardings derived from the parameters' logical axis names and donates it, so a step
updates the state in place on every device.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from ct_rate_jax import losses, sharding
from ct_rate_jax.models import bert_weights
from ct_rate_jax.models.bert import BertConfig
from ct_rate_jax.models.ct_clip import CTCLIP
from data_pipeline import schema

ModelFactory = Callable[[nnx.Rngs], CTCLIP]


def _build(model_factory: ModelFactory, tx: optax.GradientTransformation, seed: int):
    model = model_factory(nnx.Rngs(params=seed, dropout=seed + 1))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


@dataclasses.dataclass
class TrainState:
    """graphdef + state of (model, optimizer), and the state's shardings."""

    graphdef: Any
    state: Any
    shardings: Any
    mesh: Mesh

    @classmethod
    def create(cls, model_factory: ModelFactory, tx: optax.GradientTransformation,
               mesh: Mesh, seed: int = 0) -> TrainState:
        """Initialises parameters and optimizer state directly on their shards."""
        graphdef, abstract_state = cls.abstract(model_factory, tx)
        shardings = sharding.state_shardings(abstract_state, mesh)
        init = jax.jit(lambda: nnx.split(_build(model_factory, tx, seed))[1],
                       out_shardings=shardings)
        with jax.set_mesh(mesh):
            state = init()
        return cls(graphdef, state, shardings, mesh)

    @staticmethod
    def abstract(model_factory: ModelFactory, tx: optax.GradientTransformation):
        """(graphdef, abstract state) without allocating anything."""
        return nnx.split(nnx.eval_shape(lambda: _build(model_factory, tx, 0)))

    @property
    def model(self) -> CTCLIP:
        """A live model view of the current parameters (for evaluation)."""
        model, _ = nnx.merge(self.graphdef, self.state)
        return model

    @property
    def step(self) -> int:
        _, optimizer = nnx.merge(self.graphdef, self.state)
        return int(optimizer.step[...])


def init_text_tower_from_hf(train_state: TrainState, directory: str) -> None:
    """Loads a local Hugging Face BERT (e.g. CXR-BERT) into the text tower, in place.

    The directory's config.json must describe the same architecture as the model's
    `BertConfig` (dropout rates may differ).
    """
    model, optimizer = nnx.merge(train_state.graphdef, train_state.state)
    wanted = model.config.text
    found = BertConfig.from_json_file(f"{directory}/config.json")
    fields = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "intermediate_size", "max_position_embeddings", "type_vocab_size", "hidden_act")
    differ = [f"{f}: checkpoint {getattr(found, f)} vs model {getattr(wanted, f)}"
              for f in fields if getattr(found, f) != getattr(wanted, f)]
    if differ:
        raise ValueError(f"the BERT in {directory} does not match the model's BertConfig: "
                         + "; ".join(differ))
    state_dict = bert_weights.read_hf_state_dict(directory)
    prefix = "bert." if any(k.startswith("bert.") for k in state_dict) else ""
    bert_weights.bert_params_from_state_dict(model.text_transformer, state_dict, prefix)
    train_state.state = jax.device_put(nnx.state((model, optimizer)), train_state.shardings)


LOSSES = ("softmax", "sigmoid")


def contrastive_loss(model: CTCLIP, image_latents_bd: jax.Array, text_latents_bd: jax.Array,
                     *, loss: str = "softmax", mesh: Mesh | None = None):
    """The selected contrastive loss of one global batch of latents; (loss, metrics).

    loss: "softmax" (InfoNCE, official) or "sigmoid" (SigLIP; the model needs a
      `logit_bias`, i.e. `CTCLIPConfig.init_logit_bias` set).
    mesh: None for the unchunked losses; a mesh for the chunked (`shard_map`) ones.
    """
    scale = model.logit_scale()
    if loss == "softmax":
        if mesh is None:
            value, metrics = losses.clip_softmax_loss(image_latents_bd, text_latents_bd, scale)
        else:
            value, metrics = losses.chunked_softmax_loss(image_latents_bd, text_latents_bd,
                                                         scale, mesh)
        return value, dict(metrics, logit_scale=scale)
    if loss == "sigmoid":
        bias = model.logit_bias[...]
        if mesh is None:
            value, metrics = losses.sigmoid_loss(image_latents_bd, text_latents_bd, scale, bias)
        else:
            value, metrics = losses.chunked_sigmoid_loss(image_latents_bd, text_latents_bd,
                                                         scale, bias, mesh)
        return value, dict(metrics, logit_scale=scale, logit_bias=bias)
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


SENTENCE_VIEW_FIELDS = ("sentence_ids", "sentence_mask", "sentence_keys", "report_keys")


def sentence_view_loss(model: CTCLIP, image_latents_bd: jax.Array,
                       batch: dict[str, jax.Array], text_weight: float = 0.0):
    """The multi-positive InfoNCE of the images against their single-sentence views,
    plus `text_weight` times the views' `supervised_contrastive_loss` among themselves.

    batch: sentence_ids / sentence_mask int[B, m, S], sentence_keys int[B, m] and
      report_keys int[B, R] (-1 padded), as `data_pipeline.input_pipeline` writes them.
    Text view k (one sentence of one report) is a positive for image i when image i's
    report makes the same statement (`report_keys[i]` holds `sentence_keys` of k); the
    comparison runs over the whole global batch, like the loss.  The text-text term
    makes views of the same statement positives of each other and all other views
    negatives.  Returns (loss, metrics).
    """
    ids = batch["sentence_ids"]
    views = model.embed_text(ids.reshape(-1, ids.shape[-1]),
                             batch["sentence_mask"].reshape(-1, ids.shape[-1]), train=True)
    keys_k = batch["sentence_keys"].reshape(-1)
    positives_bk = jnp.any(batch["report_keys"][:, :, None] == keys_k[None, None, :], axis=1)
    scale = model.logit_scale()
    value, metrics = losses.multi_positive_softmax_loss(image_latents_bd, views, positives_bk,
                                                        scale)
    if text_weight:
        text_value, _ = losses.supervised_contrastive_loss(views, keys_k, scale)
        metrics = dict(metrics, image_text_loss=value, text_text_loss=text_value)
        value = value + text_weight * text_value
    return value, metrics


def make_loss_fn(loss: str = "softmax", mesh: Mesh | None = None,
                 sentence_loss_weight: float = 0.0, sentence_text_loss_weight: float = 0.0):
    """`loss_fn(model, batch) -> (loss, metrics)` of one global batch (see
    `contrastive_loss` for `loss` and `mesh`).

    sentence_loss_weight: > 0 adds that times `sentence_view_loss` (the batch must carry
      the sentence views, `input_pipeline.PipelineConfig.sentence_views`); it is
      computed unchunked over the global batch whatever `mesh` says ([B, B * m] logits).
    sentence_text_loss_weight: the weight of the text-text term inside it
      (`sentence_view_loss`, [B * m, B * m] logits).
    """

    def loss_fn(model: CTCLIP, batch: dict[str, jax.Array]):
        image, text = model(batch["volume"], batch["input_ids"], batch["attention_mask"],
                            train=True)
        value, metrics = contrastive_loss(model, image, text, loss=loss, mesh=mesh)
        if sentence_loss_weight:
            sentence_loss, sentence_metrics = sentence_view_loss(
                model, image, batch, sentence_text_loss_weight)
            metrics = dict(metrics, report_loss=value, sentence_loss=sentence_loss,
                           sentence_image_to_text_accuracy=sentence_metrics[
                               "image_to_text_accuracy"])
            if sentence_text_loss_weight:
                metrics["sentence_text_loss"] = sentence_metrics["text_text_loss"]
            value = value + sentence_loss_weight * sentence_loss
        return value, metrics

    return loss_fn


def clip_loss_fn(model: CTCLIP, batch: dict[str, jax.Array]):
    """Symmetric InfoNCE of one global batch; returns (loss, metrics)."""
    return make_loss_fn()(model, batch)


def check_loss_settings(config, loss: str, grad_accum_steps: int = 1,
                        sentence_loss_weight: float = 0.0) -> None:
    """Raises ValueError for a loss the model cannot train with."""
    if loss not in LOSSES:
        raise ValueError(f"train.loss must be one of {LOSSES}, got {loss!r}")
    if loss == "sigmoid" and config.init_logit_bias is None:
        raise ValueError("train.loss = 'sigmoid' needs a learned bias: set "
                         "CTCLIPConfig.init_logit_bias (SigLIP: -10, with "
                         "init_temperature = 2.302585, i.e. log 10)")
    if grad_accum_steps < 1:
        raise ValueError(f"train.grad_accum_steps must be >= 1, got {grad_accum_steps}")
    if sentence_loss_weight < 0:
        raise ValueError(f"train.sentence_loss_weight must be >= 0, got {sentence_loss_weight}")
    if sentence_loss_weight and grad_accum_steps > 1:
        raise ValueError("train.sentence_loss_weight > 0 (sentence views) does not support "
                         "train.grad_accum_steps > 1 yet; use one of the two")


def _split_micro_batches(batch, steps: int, mesh: Mesh):
    """[B, ...] -> [steps, B / steps, ...]; micro-batch k holds rows k, k + steps, ...

    Strided rows keep every micro-batch spread over all batch shards (each device's
    contiguous block of the global batch contributes B / (steps * n) rows to each).
    """
    spec = sharding.batch_sharding(mesh).spec[0]

    def split(x):
        rows = x.shape[0] // steps
        x = jnp.swapaxes(x.reshape(rows, steps, *x.shape[1:]), 0, 1)
        return jax.lax.with_sharding_constraint(
            x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, spec)))

    return jax.tree.map(split, batch)


def _merge_micro_batches(x_abd: jax.Array) -> jax.Array:
    """Inverse of `_split_micro_batches` for [steps, B / steps, D] latents -> [B, D]."""
    return jnp.swapaxes(x_abd, 0, 1).reshape(-1, x_abd.shape[-1])


def accumulated_loss_and_grads(model: CTCLIP, batch: dict[str, jax.Array], steps: int,
                               mesh: Mesh, *, loss: str = "softmax", chunked: bool = False):
    """((loss, metrics), grads) of one global batch, computed over `steps` micro-batches.

    Contrastive gradient caching (GradCache, Gao et al. 2021), so that the result is the
    big-batch gradient (negatives from the whole global batch), not an average of
    per-micro-batch losses:
      (a) embed every micro-batch without gradients (a `lax.scan`): all latents [B, L];
      (b) the loss on the whole global batch and its gradient w.r.t. the latents (and
          the temperature / bias);
      (c) per micro-batch (a second `lax.scan`), rerun both towers under `jax.vjp` and
          pull the latent gradients back to the parameters, summing.
    Only one micro-batch's activations are alive at a time (pass (a) keeps none; pass
    (c) frees each micro-batch's residuals before the next), at the cost of a second
    forward pass.  In float32 the result equals `steps = 1` to rounding.

    Dropout: pass (c) reruns each micro-batch with the RNG state pass (a) used for it,
    so both passes draw the same masks; the masks differ from a `steps = 1` step's (the
    streams are consumed per micro-batch), so the equality with the big batch is exact
    with dropout off.  Non-parameter state (the VQ codebook EMA): every micro-batch sees
    the step's starting codebook (as the big batch does), and the new codebook is the
    mean of the micro-batches' EMA updates (close to, not identical with, one update
    from the whole batch).  The model's RNG and buffer state is updated in place.

    Needs B divisible by steps x the data-parallel size.  `metrics` are those of the
    loss on the global batch.
    """
    rows, shards = batch["volume"].shape[0], sharding.data_parallel_size(mesh)
    if rows % (steps * shards):
        raise ValueError(f"train.grad_accum_steps = {steps}: the global batch of {rows} does "
                         f"not split into micro-batches divisible by the {shards} batch shards")
    graphdef, params, rngs, buffers = nnx.split(model, nnx.Param, nnx.RngState, ...)
    micro = _split_micro_batches(batch, steps, mesh)
    loss_mesh = mesh if chunked else None

    # Variables mutated under a transform (RNG counts, the VQ codebook) must be created
    # at its trace level: the state comes in as scan carry and is copied here.
    def embed(params_, rngs_, buffers_, mb):
        fresh = lambda tree: jax.tree.map(lambda x: x, tree)  # noqa: E731
        m = nnx.merge(graphdef, params_, fresh(rngs_), fresh(buffers_))
        latents = m(mb["volume"], mb["input_ids"], mb["attention_mask"], train=True)
        _, _, rngs_out, buffers_out = nnx.split(m, nnx.Param, nnx.RngState, ...)
        return latents, (rngs_out, buffers_out)

    # (a) all latents, no gradients; remember each micro-batch's RNG state for (c).
    def forward(carry, mb):
        rngs_, buffers_ = carry
        latents, (rngs_out, buffers_out) = embed(params, rngs_, buffers_, mb)
        return (rngs_out, buffers_), (jax.lax.stop_gradient(latents), rngs_, buffers_out)

    (rngs_end, _), ((image_abd, text_abd), rngs_per_micro, buffers_per_micro) = jax.lax.scan(
        forward, (rngs, buffers), micro)
    image_bd, text_bd = _merge_micro_batches(image_abd), _merge_micro_batches(text_abd)

    # (b) the global-batch loss; gradients w.r.t. the latents and the loss's own params.
    def loss_of_latents(params_, image, text):
        m = nnx.merge(graphdef, params_, rngs, buffers)
        return contrastive_loss(m, image, text, loss=loss, mesh=loss_mesh)

    (value, metrics), (grads, d_image_bd, d_text_bd) = jax.value_and_grad(
        loss_of_latents, argnums=(0, 1, 2), has_aux=True)(params, image_bd, text_bd)
    d_image_abd = _split_micro_batches(d_image_bd, steps, mesh)
    d_text_abd = _split_micro_batches(d_text_bd, steps, mesh)

    # (c) backpropagate the latent gradients one micro-batch at a time.
    def backward(carry, xs):
        grads_, buffers_ = carry
        mb, rngs_, d_image, d_text = xs
        _, pullback = jax.vjp(lambda p: embed(p, rngs_, buffers_, mb)[0], params)
        (d_params,) = pullback((d_image, d_text))
        return (jax.tree.map(jnp.add, grads_, d_params), buffers_), None

    (grads, _), _ = jax.lax.scan(backward, (grads, buffers),
                                 (micro, rngs_per_micro, d_image_abd, d_text_abd))
    mean_buffers = jax.tree.map(lambda x: x.mean(0).astype(x.dtype), buffers_per_micro)
    nnx.update(model, rngs_end, mean_buffers)
    return (value, metrics), grads


def _all_finite(tree) -> jax.Array:
    """True when every floating-point value in `tree` is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def make_train_step(train_state: TrainState, schedule: optax.Schedule | None = None, *,
                    loss: str = "softmax", chunked: bool = False, grad_accum_steps: int = 1,
                    skip_nonfinite: bool = True,
                    hu_window: tuple[float, float] = schema.DEFAULT_HU_WINDOW,
                    sentence_loss_weight: float = 0.0,
                    sentence_text_loss_weight: float = 0.0):
    """Returns a jitted `step(state, batch) -> (state, metrics)` that donates `state`.

    `batch` holds float32 `volume` or int16 `volume_hu` (the input pipeline's
    `normalise_on_device`), which the step normalises first with `hu_window`
    (`schema.model_volume`, the pipeline's own normalisation, here on the device).

    loss: "softmax" (InfoNCE) or "sigmoid" (SigLIP; needs `CTCLIPConfig.init_logit_bias`).
    chunked: compute the loss with the `shard_map` ring of `losses.chunked_*_loss`.
    grad_accum_steps: split the global batch into this many micro-batches inside the
      step (`accumulated_loss_and_grads`: the big-batch gradient, one micro-batch's
      activations in memory at a time).  The defaults are the plain one-pass step.
    sentence_loss_weight: > 0 adds the multi-positive loss of the batch's sentence views
      (`make_loss_fn`; `sentence_text_loss_weight` its text-text term); the batch must
      then carry `SENTENCE_VIEW_FIELDS`.
    skip_nonfinite: when the loss, the gradient norm or an updated parameter is not
      finite, return the input state unchanged (parameters, optimizer moments, step count, codebook), so that a
      bad batch can never put NaN into the weights; `metrics["nonfinite"]` is 1 for such
      a step.  The trainer decides whether to go on (experiments/pretrain.py).
    """
    graphdef = train_state.graphdef
    mesh = train_state.mesh
    check_loss_settings(train_state.model.config, loss, grad_accum_steps, sentence_loss_weight)
    batch_sharding = sharding.batch_sharding(mesh)
    loss_fn = make_loss_fn(loss, mesh if chunked else None, sentence_loss_weight,
                           sentence_text_loss_weight)

    def step(state, batch):
        batch = {"volume": schema.model_volume(batch, hu_window),
                 **{k: v for k, v in batch.items()
                    if k not in ("volume", "volume_hu", "intensity_jitter")}}
        # The arrays of the incoming state, captured before the update mutates the
        # Variables that `merge` hands out.
        previous = jax.tree.leaves(state)
        model, optimizer = nnx.merge(graphdef, state)
        if grad_accum_steps == 1:
            grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
            (loss_value, metrics), grads = grad_fn(model, batch)
        else:
            (loss_value, metrics), grads = accumulated_loss_and_grads(
                model, batch, grad_accum_steps, mesh, loss=loss, chunked=chunked)
        count = optimizer.step[...]
        optimizer.update(model, grads)
        grad_norm = optax.global_norm(grads)
        # An update can overflow even from a finite gradient (e.g. a huge learning rate).
        finite = (jnp.isfinite(loss_value) & jnp.isfinite(grad_norm)
                  & _all_finite(nnx.state(model, nnx.Param)))
        metrics = dict(metrics, loss=loss_value, grad_norm=grad_norm,
                       nonfinite=(~finite).astype(jnp.int32))
        if schedule is not None:
            metrics["learning_rate"] = schedule(count)
        updated = nnx.state((model, optimizer))
        if skip_nonfinite:
            leaves, treedef = jax.tree.flatten(updated)
            kept = jax.lax.cond(finite, lambda: leaves, lambda: previous)
            updated = jax.tree.unflatten(treedef, kept)
        return updated, metrics

    return jax.jit(step, in_shardings=(train_state.shardings, batch_sharding),
                   out_shardings=(train_state.shardings, sharding.replicated(mesh)),
                   donate_argnums=0)


def make_embed_fns(train_state: TrainState):
    """Jitted (embed_images(state, volume), embed_texts(state, ids, mask)) -> latents."""
    graphdef = train_state.graphdef

    @jax.jit
    def embed_images(state, volume_bdhw):
        model, _ = nnx.merge(graphdef, state)
        return model.embed_image(volume_bdhw)

    @jax.jit
    def embed_texts(state, input_ids, attention_mask):
        model, _ = nnx.merge(graphdef, state)
        return model.embed_text(input_ids, attention_mask)

    return embed_images, embed_texts


def logit_scale(train_state: TrainState) -> float:
    return float(jax.device_get(train_state.model.logit_scale()))


def parameter_count(train_state: TrainState) -> int:
    model = train_state.model
    return sum(int(jnp.size(x)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
