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


def clip_loss_fn(model: CTCLIP, batch: dict[str, jax.Array]):
    """Symmetric InfoNCE of one global batch; returns (loss, metrics)."""
    image, text = model(batch["volume"], batch["input_ids"], batch["attention_mask"],
                        train=True)
    scale = model.logit_scale()
    loss, metrics = losses.clip_softmax_loss(image, text, scale)
    return loss, dict(metrics, logit_scale=scale)


def make_train_step(train_state: TrainState, schedule: optax.Schedule | None = None):
    """Returns a jitted `step(state, batch) -> (state, metrics)` that donates `state`."""
    graphdef = train_state.graphdef
    batch_sharding = sharding.batch_sharding(train_state.mesh)

    def step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)
        grad_fn = nnx.value_and_grad(clip_loss_fn, has_aux=True)
        (loss, metrics), grads = grad_fn(model, batch)
        count = optimizer.step[...]
        optimizer.update(model, grads)
        metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads))
        if schedule is not None:
            metrics["learning_rate"] = schedule(count)
        return nnx.state((model, optimizer)), metrics

    return jax.jit(step, in_shardings=(train_state.shardings, batch_sharding),
                   out_shardings=(train_state.shardings, sharding.replicated(train_state.mesh)),
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
