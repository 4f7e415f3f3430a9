"""CTChat: visual tokens at the <image> positions, loss on assistant tokens only, the live
encoder equal to precomputed tokens, sharding on a mesh, and the checkpoint round trip."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ct_rate_jax import sharding
from ct_rate_jax.chat import lora
from ct_rate_jax.chat.conversation import IGNORE_INDEX
from ct_rate_jax.chat.model import CTChat, CTChatConfig, next_token_loss
from ct_rate_jax.chat.projector import ProjectorConfig
from ct_rate_jax.models.ctvit import CTViTConfig
from ct_rate_jax.models.llm_config import LLMConfig

CTVIT = CTViTConfig(dim=16, image_size=16, patch_size=8, temporal_patch_size=4,
                    spatial_depth=1, temporal_depth=1, heads=2, dim_head=8, use_vq=False,
                    temporal_peg_layout="grid")


def _config(ctvit=None):
    llm = LLMConfig.tiny(vocab_size=40)
    return CTChatConfig(llm=llm, ctvit=ctvit,
                        projector=ProjectorConfig(hidden_size=llm.hidden_size,
                                                  mm_hidden_size=16, mm_context_size=16,
                                                  n_queries=4, n_heads=2))


def _batch(rng, with_volume=False):
    b, s = 2, 12
    ids = rng.integers(1, 40, (b, s)).astype(np.int32)
    visual = np.zeros((b, s), bool)
    visual[:, 2:6] = True
    labels = np.full((b, s), IGNORE_INDEX, np.int32)
    labels[:, 8:11] = ids[:, 8:11]
    mask = np.ones((b, s), bool)
    mask[1, 11:] = False
    batch = {"input_ids": ids, "labels": labels, "visual_mask": visual, "attention_mask": mask}
    if with_volume:
        batch["volume"] = rng.uniform(-1, 1, (b, 8, 16, 16)).astype(np.float32)
    else:
        batch["tokens"] = rng.normal(size=(b, 2, 2, 2, 16)).astype(np.float32)
    return {k: jnp.asarray(v) for k, v in batch.items()}


# Jitted: eager op-by-op dispatch of the CT-ViT and LLM costs more than one compile.
_forward = nnx.jit(lambda model, batch: model(batch))
_loss = nnx.jit(lambda model, batch: model.loss(batch)[0])


def test_visual_tokens_are_spliced_and_loss_counts_assistant_tokens_only():
    model = CTChat(_config(), rngs=nnx.Rngs(0))
    batch = _batch(np.random.default_rng(0))
    embeds = model.input_embeddings(batch)
    visual = model.projector(batch["tokens"])
    np.testing.assert_allclose(embeds[:, 2:6], visual, rtol=1e-6)
    np.testing.assert_allclose(embeds[:, 6:], model.llm.embed(batch["input_ids"])[:, 6:])
    # Only the 3 labelled positions count: position s predicts labels[s + 1].
    loss, metrics = nnx.jit(lambda m, b: m.loss(b))(model, batch)
    logits = np.asarray(_forward(model, batch))
    logp = jax.nn.log_softmax(logits, -1)
    ids = np.asarray(batch["input_ids"])
    expected = -np.mean([logp[r, p - 1, ids[r, p]] for r in range(2) for p in (8, 9, 10)])
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert metrics["answer_tokens"] == 6
    # The image matters (other tokens; LayerNorm would cancel a mere shift or scale).
    other = dict(batch, tokens=jnp.flip(batch["tokens"], axis=-1))
    assert abs(float(_loss(model, other)) - float(loss)) > 1e-6


def test_next_token_loss_with_no_answer_tokens_is_zero():
    loss, metrics = next_token_loss(jnp.zeros((1, 4, 5)), jnp.full((1, 4), IGNORE_INDEX))
    assert float(loss) == 0.0 and float(metrics["answer_tokens"]) == 0.0


def test_live_encoder_equals_precomputed_tokens_and_gradients_follow_the_stage():
    model = CTChat(_config(CTVIT), rngs=nnx.Rngs(1))
    batch = _batch(np.random.default_rng(1), with_volume=True)
    tokens = nnx.jit(lambda m, volume: m.vision(volume))(model, batch["volume"])
    assert tokens.shape == (2, 2, 2, 2, 16)
    precomputed = {k: v for k, v in batch.items() if k != "volume"} | {"tokens": tokens}
    np.testing.assert_allclose(_forward(model, batch), _forward(model, precomputed),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no vision encoder"):
        CTChat(_config(), rngs=nnx.Rngs(0)).visual_tokens({"volume": batch["volume"]})
    # Stage 2 with LoRA: one step moves LoRA and projector, not the base LLM or encoder.
    lora.apply_lora(model.llm, lora.ALL_LINEAR, rank=2, alpha=4, rngs=nnx.Rngs(2))
    wrt = lora.trainable_filter("lora")
    before = nnx.clone(model)
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=wrt)
    grads = nnx.jit(lambda m: nnx.grad(lambda m: m.loss(batch)[0],
                                       argnums=nnx.DiffState(0, wrt))(m))(model)
    optimizer.update(model, grads)
    moved = lambda part: any(  # noqa: E731
        not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(nnx.state(part(before))),
                                                 jax.tree.leaves(nnx.state(part(model)))))
    assert moved(lambda m: m.projector)
    assert not moved(lambda m: m.vision)
    assert not moved(lambda m: m.llm.model.embed_tokens)
    assert moved(lambda m: m.llm.model.layers[0].self_attn.q_proj)  # its LoRA B
    assert not moved(lambda m: m.llm.model.layers[0].self_attn.q_proj.base)


def test_shards_over_the_mesh_and_checkpoint_round_trip(tmp_path):
    from ct_rate_jax.chat.data import train_demo_tokenizer

    mesh = sharding.make_mesh(1, 2, 4)  # batch 2 over fsdp 2
    config = _config(CTVIT)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: CTChat(config, rngs=nnx.Rngs(0))))
    shardings = sharding.state_shardings(abstract, mesh)
    batch = _batch(np.random.default_rng(2), with_volume=True)  # outside the mesh context
    with jax.set_mesh(mesh):
        state = jax.jit(lambda: nnx.split(CTChat(config, rngs=nnx.Rngs(0)))[1],
                        out_shardings=shardings)()
        model = nnx.merge(graphdef, state)
        embed = model.llm.model.embed_tokens.embedding[...]
        assert embed.sharding.spec != jax.sharding.PartitionSpec()  # vocab / embed split
        global_batch = sharding.host_batch_to_global({k: np.asarray(v)
                                                      for k, v in batch.items()}, mesh)
        sharded_loss = float(nnx.jit(lambda m, b: m.loss(b)[0])(model, global_batch))
    plain = CTChat(config, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(sharded_loss, _loss(plain, batch), rtol=1e-4)
    tokenizer = train_demo_tokenizer(["Is there a nodule? Yes. No."], 300,
                                     str(tmp_path / "tok"))
    from ct_rate_jax.chat.checkpoint import load_ctchat_model, save_chat_checkpoint

    # As finetune_chat writes it: <workdir>/model/, read back from the workdir.
    save_chat_checkpoint(tmp_path / "model", llm=plain.llm, projector=plain.projector,
                         tokenizer=tokenizer, vision=plain.vision, quantize=False,
                         preprocessing={"target_shape": [8, 16, 16]})
    loaded, loaded_tokenizer, raw = load_ctchat_model(tmp_path)
    assert loaded.config == dataclasses.replace(plain.config, quantize=False)
    assert raw["preprocessing"]["target_shape"] == [8, 16, 16]
    assert len(loaded_tokenizer) == len(tokenizer)
    np.testing.assert_allclose(_forward(loaded, batch), _forward(plain, batch), rtol=1e-6)
