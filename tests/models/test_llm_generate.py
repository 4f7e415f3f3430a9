"""Generation: parity with transformers' generate, cache on/off, sampling, stop tokens."""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ct_rate_jax.models  # noqa: F401  (turns eager sharding off)
from ct_rate_jax.models.llm import LLMConfig
from ct_rate_jax.models.llm_generate import (SamplingConfig, generate, left_pad, stream,
                                             top_p_filter)
from ct_rate_jax.models.llm_weights import load_hf_llm
from test_llm import make_hf_model, random_llm  # tests/models is on sys.path (rootdir)

PROMPTS = [[5, 17, 99, 42, 7, 8, 9, 10, 11], [33, 4, 250, 71], [90, 91]]


def hf_generate(hf_model, ids, mask, new_tokens, stop):
    import torch

    with torch.no_grad():
        out = hf_model.generate(torch.tensor(ids, dtype=torch.long),
                                attention_mask=torch.tensor(mask), max_new_tokens=new_tokens,
                                do_sample=False, eos_token_id=stop, pad_token_id=0)
    return out[:, ids.shape[1]:].numpy()


@pytest.mark.torch
@pytest.mark.parametrize("name", ["llama3_gqa_rope_scaling", "mistral_sliding_window"])
def test_greedy_tokens_match_transformers_generate_on_a_left_padded_batch(name, tmp_path):
    pytest.importorskip("transformers")
    hf_model = make_hf_model(name, seed=1)
    hf_model.save_pretrained(tmp_path)
    model, _ = load_hf_llm(tmp_path)
    ids, mask = left_pad(PROMPTS)
    # No stop token first; then row 0's fourth token becomes the stop token, so that one
    # row stops early and the others continue (pads after a stop, as transformers does).
    free = generate(model, ids, mask, sampling=SamplingConfig(max_new_tokens=12))
    expected = hf_generate(hf_model, ids, mask, 12, stop=None)
    np.testing.assert_array_equal(np.asarray(free.tokens), expected)
    stop = int(expected[0, 3])
    sampling = SamplingConfig(max_new_tokens=12, stop_token_ids=(stop,))
    stopped = generate(model, ids, mask, sampling=sampling)
    expected = hf_generate(hf_model, ids, mask, 12, stop=stop)
    tokens = np.asarray(stopped.tokens)
    np.testing.assert_array_equal(tokens[:, :expected.shape[1]], expected)
    assert (tokens[:, expected.shape[1]:] == 0).all()
    assert int(stopped.num_tokens[0]) == 4


@functools.lru_cache(maxsize=1)
def _tiny_model():
    """One model and one length for the tests below: the sampling settings are traced
    values, so they all share one compiled generation loop."""
    return random_llm(LLMConfig.tiny(vocab_size=300, sliding_window=5), seed=4)


NEW_TOKENS = 10


@pytest.mark.parametrize("sampling", [
    SamplingConfig(max_new_tokens=NEW_TOKENS),
    SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0.7, top_p=0.9,
                   stop_token_ids=(7, 8))])
def test_cache_on_and_off_give_the_same_tokens(sampling):
    model = _tiny_model()
    ids, mask = left_pad(PROMPTS)
    embeds = model.embed(jnp.asarray(ids))
    key = jax.random.key(3)
    cached = generate(model, ids, mask, sampling=sampling, rng=key)
    recomputed = generate(model, inputs_embeds=embeds, attention_mask=mask, sampling=sampling,
                          rng=key, use_cache=False)
    np.testing.assert_array_equal(np.asarray(cached.tokens), np.asarray(recomputed.tokens))
    np.testing.assert_array_equal(np.asarray(cached.num_tokens),
                                  np.asarray(recomputed.num_tokens))
    streamed = np.stack(list(stream(model, ids, mask, sampling=sampling, rng=key)), axis=1)
    np.testing.assert_array_equal(streamed, np.asarray(cached.tokens)[:, :streamed.shape[1]])


def test_stop_tokens_end_each_row_and_the_loop():
    model = _tiny_model()
    ids, mask = left_pad(PROMPTS)
    free = np.asarray(generate(model, ids, mask,
                               sampling=SamplingConfig(max_new_tokens=NEW_TOKENS)).tokens)
    stops = (int(free[0, 1]), int(free[1, 2]), int(free[2, 0]))
    result = generate(model, ids, mask,
                      sampling=SamplingConfig(max_new_tokens=NEW_TOKENS, stop_token_ids=stops,
                                              pad_token_id=-1))
    tokens, counts = np.asarray(result.tokens), np.asarray(result.num_tokens)
    for row in range(3):
        first = int(np.argmax(np.isin(free[row], stops)))
        np.testing.assert_array_equal(tokens[row, :first + 1], free[row, :first + 1])
        assert (tokens[row, first + 1:] == -1).all() and counts[row] == first + 1
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, ids[:, ::-1], mask[:, ::-1])


@pytest.mark.torch
def test_top_p_keeps_the_nucleus_as_transformers():
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]], np.float32))
    for top_p, kept in ((0.5, 1), (0.7, 2), (0.8, 2), (0.81, 3), (1.0, 4)):
        filtered = np.asarray(top_p_filter(jnp.asarray(logits), top_p))
        assert (np.isfinite(filtered).sum(axis=1) == kept).all(), top_p
    random_logits = np.random.RandomState(0).randn(6, 50).astype(np.float32) * 3
    for top_p in (0.3, 0.9):
        expected = TopPLogitsWarper(top_p)(None, torch.tensor(random_logits)).numpy()
        ours = np.asarray(top_p_filter(jnp.asarray(random_logits), top_p))
        np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(expected))


def test_a_tiny_nucleus_samples_the_greedy_tokens():
    model = _tiny_model()
    ids, mask = left_pad(PROMPTS)
    greedy = generate(model, ids, mask, sampling=SamplingConfig(max_new_tokens=NEW_TOKENS))
    nucleus = generate(model, ids, mask, rng=jax.random.key(9), sampling=SamplingConfig(
        max_new_tokens=NEW_TOKENS, temperature=1.0, top_p=1e-6))
    np.testing.assert_array_equal(np.asarray(nucleus.tokens), np.asarray(greedy.tokens))
