"""Text generation with an `LLM`: one jitted prefill + decode loop over a preallocated cache.

    result = generate(model, ids, mask, sampling=SamplingConfig(max_new_tokens=64,
                      stop_token_ids=(2,)))
    result.tokens      # int32[B, max_new_tokens], pad_token_id after each row's stop token
    result.num_tokens  # int32[B], tokens generated per row (its stop token included)

Prompts of different lengths are left-padded (`left_pad`); `inputs_embeds` prompts (text
with visual tokens spliced in) work the same way.  The whole loop, prefill included, is
one XLA program (`jax.lax.while_loop`), compiled once per (shapes, sampling settings) and
stopping early when every row has emitted a stop token.  `use_cache=False` recomputes the
full sequence at each step instead of reading the KV cache (a reference for tests).
`stream` yields the tokens step by step for interactive use (jitted prefill and step).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ct_rate_jax.models.llm import LLM, KVCache


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen.

    temperature 0 = greedy (argmax, ties to the lowest id as torch); otherwise softmax
    sampling at that temperature restricted to the top-p nucleus (the smallest set of most
    probable tokens whose probability reaches top_p; 1.0 = no restriction).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


class GenerationResult(NamedTuple):
    tokens: jax.Array      # int32[B, max_new_tokens]
    num_tokens: jax.Array  # int32[B]


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int = 0
             ) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (ids int32[B, S], mask int32[B, S]) padded on the left."""
    length = max(len(s) for s in sequences)
    ids = np.full((len(sequences), length), pad_token_id, np.int32)
    mask = np.zeros((len(sequences), length), np.int32)
    for row, sequence in enumerate(sequences):
        if len(sequence):
            ids[row, length - len(sequence):] = sequence
            mask[row, length - len(sequence):] = 1
    return ids, mask


def top_p_filter(logits: jax.Array, top_p: float) -> jax.Array:
    """float[B, V] -> the same with every token outside the top-p nucleus at -inf.

    A token is kept when the probability of the tokens more probable than it is below
    top_p (so the most probable token always stays), as transformers' TopPLogitsWarper.
    """
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(sorted_logits, kept - 1, axis=-1)
    return jnp.where(logits < threshold, -jnp.inf, logits)


class _Knobs(NamedTuple):
    """The sampling settings as traced values: changing them does not recompile."""

    temperature: jax.Array  # float32[]
    top_p: jax.Array        # float32[]
    stop_ids: jax.Array     # int32[M], M a multiple of 8 (repeats; -1 when there are none)
    pad_id: jax.Array       # int32[]

    @classmethod
    def of(cls, sampling: SamplingConfig) -> _Knobs:
        stops = list(sampling.stop_token_ids) or [-1]
        stops += stops[-1:] * (-len(stops) % 8)  # few distinct shapes, few compilations
        return cls(jnp.float32(sampling.temperature), jnp.float32(sampling.top_p),
                   jnp.asarray(stops, jnp.int32), jnp.int32(sampling.pad_token_id))


def _choose_next(logits: jax.Array, key: jax.Array, knobs: _Knobs) -> jax.Array:
    """float32[B, V] next-token logits -> int32[B] tokens."""

    def sample(logits):
        scaled = logits / knobs.temperature
        scaled = jax.lax.cond(knobs.top_p < 1, top_p_filter, lambda x, p: x, scaled,
                              knobs.top_p)
        return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)

    return jax.lax.cond(knobs.temperature > 0, sample, greedy, logits)


def greedy(logits: jax.Array) -> jax.Array:
    """float[B, V] -> int32[B]: the most probable token, ties to the lowest id (torch's
    argmax).  A max and a min over the vocabulary: two plain reductions, which XLA on
    the CPU vectorises (jnp.argmax's paired value/index reduction is ~3x slower)."""
    vocab = logits.shape[-1]
    best = jnp.max(logits, axis=-1, keepdims=True)
    ids = jnp.where(logits == best, jnp.arange(vocab, dtype=jnp.int32), vocab)
    return jnp.minimum(jnp.min(ids, axis=-1), vocab - 1)  # (a NaN row: the last id)


def _stops(tokens: jax.Array, knobs: _Knobs) -> jax.Array:
    return jnp.any(tokens[..., None] == knobs.stop_ids, axis=-1)


# --------------------------------------------------------------------------- the two phases
# Both keep the running sequence in a "context": the KV cache (use_cache) or, without a
# cache, the embeddings and mask of the whole sequence so far, recomputed at every step.


def _prefill(model: LLM, embeds: jax.Array, mask: jax.Array, total: int, use_cache: bool):
    """Runs the prompt; -> (next-token logits float32[B, V], context)."""
    b, s = mask.shape
    if use_cache:
        logits, cache = model(inputs_embeds=embeds, attention_mask=mask,
                              cache=model.init_cache(b, total), last_token_only=True)
        return logits[:, -1], cache
    buffer = jnp.zeros((b, total, embeds.shape[-1]), model.dtype).at[:, :s].set(embeds)
    full_mask = jnp.zeros((b, total), jnp.int32).at[:, :s].set(mask)
    logits, _ = model(inputs_embeds=buffer, attention_mask=full_mask)
    return logits[:, s - 1], (buffer, full_mask, jnp.asarray(s, jnp.int32))


def _step(model: LLM, tokens: jax.Array, context, use_cache: bool):
    """Feeds int32[B] tokens; -> (next-token logits float32[B, V], context)."""
    embeds = model.embed(tokens[:, None])
    if use_cache:
        logits, cache = model(inputs_embeds=embeds, cache=context,
                              attention_mask=jnp.ones(tokens.shape + (1,), jnp.int32))
        return logits[:, 0], cache
    buffer, mask, length = context
    buffer = jax.lax.dynamic_update_slice(buffer, embeds, (0, length, 0))
    mask = jax.lax.dynamic_update_slice(mask, jnp.ones(tokens.shape + (1,), jnp.int32),
                                        (0, length))
    logits, _ = model(inputs_embeds=buffer, attention_mask=mask)
    return jax.lax.dynamic_index_in_dim(logits, length, 1, keepdims=False), (buffer, mask,
                                                                             length + 1)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "use_cache"))
def _generate(graphdef, state, ids, embeds, mask, key, knobs: _Knobs, *,
              max_new_tokens: int, use_cache: bool) -> GenerationResult:
    model = nnx.merge(graphdef, state)
    if embeds is None:
        embeds = model.embed(ids)
    b, s = mask.shape
    n = max_new_tokens
    logits, context = _prefill(model, embeds, mask, s + n, use_cache)
    key, first_key = jax.random.split(key)
    first = _choose_next(logits, first_key, knobs)
    tokens = jnp.full((b, n), knobs.pad_id, jnp.int32).at[:, 0].set(first)
    done = _stops(first, knobs)

    def keep_going(carry):
        step, _, _, done, _ = carry
        return (step < n) & ~jnp.all(done)

    def one_token(carry):
        step, tokens, context, done, key = carry
        logits, context = _step(model, tokens[:, step - 1], context, use_cache)
        key, step_key = jax.random.split(key)
        chosen = jnp.where(done, knobs.pad_id, _choose_next(logits, step_key, knobs))
        tokens = jax.lax.dynamic_update_slice(tokens, chosen[:, None], (0, step))
        return step + 1, tokens, context, done | _stops(chosen, knobs), key

    carry = (jnp.asarray(1, jnp.int32), tokens, context, done, key)
    _, tokens, _, _, _ = jax.lax.while_loop(keep_going, one_token, carry)
    return GenerationResult(tokens, _count(tokens, knobs))


def _count(tokens: jax.Array, knobs: _Knobs) -> jax.Array:
    """Tokens per row up to and including the first stop token (all, if none)."""
    stops = _stops(tokens, knobs)
    first_stop = jnp.argmax(stops, axis=1)
    return jnp.where(stops.any(axis=1), first_stop + 1, tokens.shape[1]).astype(jnp.int32)


def _prompt(model: LLM, input_ids, attention_mask, inputs_embeds):
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    shape = (input_ids if inputs_embeds is None else inputs_embeds).shape[:2]
    mask = np.ones(shape, np.int32) if attention_mask is None else attention_mask
    if not isinstance(mask, jax.core.Tracer) and not np.all(np.asarray(mask)[:, -1]):
        raise ValueError("prompts must be left-padded: attention_mask[:, -1] must be 1 in "
                         "every row (see llm_generate.left_pad)")
    ids = None if input_ids is None else jnp.asarray(input_ids, jnp.int32)
    embeds = None if inputs_embeds is None else jnp.asarray(inputs_embeds, model.dtype)
    return ids, embeds, jnp.asarray(mask, jnp.int32)


def generate(model: LLM, input_ids: Any = None, attention_mask: Any = None, *,
             inputs_embeds: Any = None, sampling: SamplingConfig = SamplingConfig(),
             rng: jax.Array | None = None, use_cache: bool = True) -> GenerationResult:
    """Generates up to `sampling.max_new_tokens` tokens after each left-padded prompt.

    Args:
      model: the language model (its `dtype` is the compute and cache dtype).
      input_ids: int[B, S] prompt tokens, or inputs_embeds: float[B, S, H].
      attention_mask: int[B, S], 0 on the left pads (default: no padding).
      sampling: greedy / temperature / top-p, stop tokens, length.
      rng: a jax.random key for sampling (default key(0)).
      use_cache: False recomputes the whole sequence at each step (same tokens, slower).
    """
    ids, embeds, mask = _prompt(model, input_ids, attention_mask, inputs_embeds)
    graphdef, state = nnx.split(model)
    key = jax.random.key(0) if rng is None else rng
    return _generate(graphdef, state, ids, embeds, mask, key, _Knobs.of(sampling),
                     max_new_tokens=sampling.max_new_tokens, use_cache=use_cache)


@functools.partial(jax.jit, static_argnames=("graphdef", "total"))
def _jit_prefill(graphdef, state, ids, embeds, mask, *, total: int):
    model = nnx.merge(graphdef, state)
    embeds = model.embed(ids) if embeds is None else embeds
    return _prefill(model, embeds, mask, total, use_cache=True)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _jit_step(graphdef, state, tokens, cache: KVCache):
    return _step(nnx.merge(graphdef, state), tokens, cache, use_cache=True)


_jit_choose = jax.jit(_choose_next)


def stream(model: LLM, input_ids: Any = None, attention_mask: Any = None, *,
           inputs_embeds: Any = None, sampling: SamplingConfig = SamplingConfig(),
           rng: jax.Array | None = None) -> Iterator[np.ndarray]:
    """Yields int32[B] tokens one step at a time (pad_token_id for finished rows), for
    printing a reply as it is written; same arguments and tokens as `generate`."""
    ids, embeds, mask = _prompt(model, input_ids, attention_mask, inputs_embeds)
    graphdef, state = nnx.split(model)
    key = jax.random.key(0) if rng is None else rng
    knobs = _Knobs.of(sampling)
    logits, cache = _jit_prefill(graphdef, state, ids, embeds, mask,
                                 total=mask.shape[1] + sampling.max_new_tokens)
    done = np.zeros(mask.shape[0], bool)
    for step in range(sampling.max_new_tokens):
        key, step_key = jax.random.split(key)
        chosen = np.where(done, sampling.pad_token_id,
                          np.asarray(_jit_choose(logits, step_key, knobs)))
        done |= np.isin(chosen, sampling.stop_token_ids)
        yield chosen
        if done.all() or step + 1 == sampling.max_new_tokens:
            return
        logits, cache = _jit_step(graphdef, state, jnp.asarray(chosen, jnp.int32), cache)
