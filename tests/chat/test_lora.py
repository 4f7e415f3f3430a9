"""LoRA: wrapping, merging, stage filters, and PEFT adapter files (against peft when present,
otherwise against a numpy evaluation of PEFT's documented formula)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ct_rate_jax.chat import lora
from ct_rate_jax.chat.peft_adapter import (assign_lora, dotted_path, load_adapter,
                                           merged_kernel, parse_lora_key)


class Block(nnx.Module):
    def __init__(self, rngs):
        self.q_proj = nnx.Linear(6, 8, rngs=rngs)
        self.v_proj = nnx.Linear(6, 8, use_bias=False, rngs=rngs)
        self.out = nnx.Linear(8, 6, rngs=rngs)

    def __call__(self, x):
        return x + self.out(jnp.tanh(self.q_proj(x) + self.v_proj(x)))


class TinyLM(nnx.Module):
    """Stands in for the LLM: PEFT-like names (layers.N.q_proj, lm_head)."""

    def __init__(self, rngs):
        self.layers = nnx.List([Block(rngs) for _ in range(2)])
        self.lm_head = nnx.Linear(6, 5, use_bias=False, rngs=rngs)

    def __call__(self, x):
        for block in self.layers:
            x = block(x)
        return self.lm_head(x)


def _paths(model):
    return sorted(path for path, _ in nnx.to_flat_state(nnx.state(model)))


def _randomise_lora_b(model, seed=1):
    rng = np.random.default_rng(seed)
    for _, layer in lora.lora_modules(model):
        layer.lora_b.set_value(jnp.asarray(rng.normal(size=layer.lora_b.shape), jnp.float32))


def test_wrap_is_identity_at_init_and_merge_matches():
    model = TinyLM(nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 6)), jnp.float32)
    before = model(x)
    paths_before = _paths(model)
    wrapped = lora.apply_lora(model, lora.ALL_LINEAR, rank=4, alpha=8, rngs=nnx.Rngs(1))
    assert sorted(wrapped) == sorted(f"layers.{i}.{n}" for i in range(2)
                                     for n in ("q_proj", "v_proj", "out"))
    layer = model.layers[0].q_proj
    assert layer.scaling == 2.0 and layer.lora_a.shape == (6, 4) and layer.lora_b.shape == (4, 8)
    assert float(jnp.abs(layer.lora_a[...]).max()) <= 1 / np.sqrt(6)  # PEFT's kaiming bound
    np.testing.assert_array_equal(model(x), before)  # B = 0: exactly the base model

    _randomise_lora_b(model)
    unmerged = model(x)
    assert float(jnp.abs(unmerged - before).max()) > 1e-2
    merged_model = nnx.clone(model)
    assert len(lora.merge_lora(merged_model)) == 6
    assert not lora.lora_modules(merged_model)
    np.testing.assert_allclose(merged_model(x), unmerged, rtol=1e-5, atol=1e-5)
    assert _paths(merged_model) == paths_before  # plain weights, the base model's structure


def test_matches_numpy_formula_and_rslora():
    base = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
    x = np.random.default_rng(1).normal(size=(4, 5)).astype(np.float32)
    for use_rslora, scaling in ((False, 12 / 4), (True, 12 / 2)):
        layer = lora.LoRALinear(nnx.clone(base), rank=4, alpha=12, rngs=nnx.Rngs(2),
                                use_rslora=use_rslora)
        layer.lora_b.set_value(jnp.full((4, 3), 0.3))
        a, b = np.asarray(layer.lora_a[...]), np.asarray(layer.lora_b[...])
        expected = (x @ np.asarray(base.kernel[...]) + np.asarray(base.bias[...])
                    + x @ a @ b * scaling)
        np.testing.assert_allclose(layer(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-5)


def test_target_selection_like_peft():
    assert lora.matches_target("layers.0.q_proj", ["q_proj"])
    assert not lora.matches_target("layers.0.xq_proj", ["q_proj"])
    assert lora.matches_target("layers.1.v_proj", r"layers\.1\.(q|v)_proj")
    assert not lora.matches_target("layers.0.v_proj", r"layers\.1\.(q|v)_proj")
    model = TinyLM(nnx.Rngs(0))
    assert lora.apply_lora(model, ["q_proj"], rank=2, alpha=2, rngs=nnx.Rngs(1),
                           exclude_modules=["layers.1"]) == ["layers.0.q_proj"]
    with pytest.raises(ValueError, match="already carries LoRA"):
        lora.apply_lora(model, lora.ALL_LINEAR, rank=2, alpha=2, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match=r"match no linear layer.*'q_proj'"):
        lora.apply_lora(TinyLM(nnx.Rngs(0)), ["qproj"], rank=2, alpha=2, rngs=nnx.Rngs(1))


class ChatModel(nnx.Module):
    def __init__(self, rngs):
        self.projector = nnx.Linear(4, 6, rngs=rngs)
        self.llm = TinyLM(rngs)

    def __call__(self, visual, x):
        return self.llm(x + self.projector(visual))


@pytest.mark.parametrize("stage,changed", [
    ("projector", {"projector"}),
    ("lora", {"projector", "lora"}),
    ("full", {"projector", "llm"}),
])
def test_stage_filters_update_only_their_parameters(stage, changed):
    model = ChatModel(nnx.Rngs(0))
    lora.apply_lora(model.llm, ["q_proj", "v_proj"], rank=2, alpha=4, rngs=nnx.Rngs(1))
    _randomise_lora_b(model)  # so that A receives gradients too
    wrt = lora.trainable_filter(stage)
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=wrt)
    before = {p: np.asarray(v) for p, v in nnx.to_flat_state(nnx.state(model))}
    rng = np.random.default_rng(0)
    visual, x = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((3, 4), (3, 6)))

    def loss(m):
        return jnp.mean(m(visual, x) ** 2)

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, wrt))(model)
    optimizer.update(model, grads)
    moved = set()
    for path, value in nnx.to_flat_state(nnx.state(model)):
        if not np.array_equal(np.asarray(value), before[path]):
            moved.add("lora" if path[-1] in ("lora_a", "lora_b") else path[0])
    assert moved == changed
    assert lora.count_parameters(model, wrt) > 0


def test_unknown_stage():
    with pytest.raises(ValueError, match="unknown training stage 'stage3'"):
        lora.trainable_filter("stage3")


def test_parse_lora_key():
    assert parse_lora_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight") == (
        "model.layers.0.self_attn.q_proj", "A")
    assert parse_lora_key("base_model.model.model.layers.3.mlp.down_proj.lora_B.weight") == (
        "model.layers.3.mlp.down_proj", "B")
    assert parse_lora_key("model.layers.0.q_proj.lora_B.default.weight", prefix="") == (
        "model.layers.0.q_proj", "B")
    assert parse_lora_key("base_model.model.lm_head.weight") is None
    with pytest.raises(ValueError, match="embedding LoRA and DoRA"):
        parse_lora_key("base_model.model.model.embed_tokens.lora_embedding_A")


_path_of = dotted_path


def _write_peft_style_adapter(directory, weights_by_module, config):
    """An adapter directory in the layout PEFT's save_pretrained writes."""
    from safetensors.numpy import save_file
    tensors = {}
    for module, (a_ri, b_or) in weights_by_module.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a_ri
        tensors[f"base_model.model.{module}.lora_B.weight"] = b_or
    directory.mkdir()
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(config))


def test_adapter_files_against_numpy(tmp_path):
    """Adapter files made here in PEFT's on-disk format (peft itself is not a dependency):
    loaded, assigned and merged, the model computes PEFT's formula evaluated in numpy."""
    rng = np.random.default_rng(0)
    model = TinyLM(nnx.Rngs(0))
    targets = {"layers.0.q_proj": 4, "layers.1.v_proj": 2}  # rank_pattern gives 2 to v_proj
    weights = {m: (rng.normal(size=(r, 6)).astype(np.float32),
                   rng.normal(size=(8, r)).astype(np.float32)) for m, r in targets.items()}
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
              "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"v_proj": 6}, "use_rslora": False}
    _write_peft_style_adapter(tmp_path / "adapter", weights, config)
    adapter_config, loaded, other = load_adapter(tmp_path / "adapter")
    assert other == {} and sorted(loaded) == sorted(targets)
    assert loaded["layers.0.q_proj"].scaling == 2.0 and loaded["layers.1.v_proj"].scaling == 3.0

    lora.apply_lora(model, r"layers\.0\.q_proj", rank=4, alpha=8, rngs=nnx.Rngs(1))
    lora.apply_lora(model, r"layers\.1\.v_proj", rank=2, alpha=6, rngs=nnx.Rngs(1))
    assign_lora(model, loaded)  # PEFT names are our paths here: the default mapping

    x = rng.normal(size=(3, 6)).astype(np.float32)
    merged = nnx.clone(model)
    lora.merge_lora(merged)

    def linear(block, name, v, module):  # PEFT's formula in torch layouts: Wx + b + BAx * s
        layer = getattr(block, name)
        base = layer.base if isinstance(layer, lora.LoRALinear) else layer
        y = v @ np.asarray(base.kernel[...])
        if base.bias is not None:
            y = y + np.asarray(base.bias[...])
        if module in weights:
            a_ri, b_or = weights[module]
            y = y + (v @ a_ri.T @ b_or.T) * adapter_config.scaling_for(module)
        return y

    def numpy_forward(h):
        for i, block in enumerate(model.layers):
            hidden = np.tanh(linear(block, "q_proj", h, f"layers.{i}.q_proj")
                             + linear(block, "v_proj", h, f"layers.{i}.v_proj"))
            h = h + linear(block, "out", hidden, f"layers.{i}.out")
        return h @ np.asarray(model.lm_head.kernel[...])

    expected = numpy_forward(x)
    np.testing.assert_allclose(model(jnp.asarray(x)), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(merged(jnp.asarray(x)), expected, rtol=1e-4, atol=1e-5)
    plain = np.asarray(TinyLM(nnx.Rngs(0)).layers[0].q_proj.kernel[...])
    np.testing.assert_allclose(merged_kernel(plain, loaded["layers.0.q_proj"]),
                               np.asarray(merged.layers[0].q_proj.kernel[...]),
                               rtol=1e-6, atol=1e-6)


def test_adapter_errors(tmp_path):
    rng = np.random.default_rng(0)
    _write_peft_style_adapter(tmp_path / "bad", {"layers.0.q_proj": (
        rng.normal(size=(3, 6)).astype(np.float32), rng.normal(size=(8, 3)).astype(np.float32))},
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8})
    with pytest.raises(ValueError, match=r"layers\.0\.q_proj: lora_A \(3, 6\).*config rank 4"):
        load_adapter(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(tmp_path)
    _write_peft_style_adapter(tmp_path / "ok", {"layers.0.q_proj": (
        rng.normal(size=(4, 6)).astype(np.float32), rng.normal(size=(8, 4)).astype(np.float32))},
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8})
    _, weights, _ = load_adapter(tmp_path / "ok")
    with pytest.raises(ValueError, match=r"no such module"):
        assign_lora(TinyLM(nnx.Rngs(0)), weights, lambda name: ("nowhere",))
    with pytest.raises(ValueError, match=r"a Linear, not LoRALinear"):
        assign_lora(TinyLM(nnx.Rngs(0)), weights, _path_of)


@pytest.mark.torch
def test_parity_with_peft(tmp_path):
    """Same base weights; an adapter made and saved by `peft`; our outputs equal PEFT's,
    unmerged and merged.  Skipped where peft is not installed (it is not a dependency)."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    class TorchBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = torch.nn.Linear(6, 8)
            self.v_proj = torch.nn.Linear(6, 8, bias=False)
            self.out = torch.nn.Linear(8, 6)

        def forward(self, x):
            return x + self.out(torch.tanh(self.q_proj(x) + self.v_proj(x)))

    class TorchLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([TorchBlock() for _ in range(2)])
            self.lm_head = torch.nn.Linear(6, 5, bias=False)

        def forward(self, x):
            for block in self.layers:
                x = block(x)
            return self.lm_head(x)

    torch.manual_seed(0)
    torch_model = TorchLM()
    ours = TinyLM(nnx.Rngs(0))
    for name, module in torch_model.named_modules():
        if isinstance(module, torch.nn.Linear):
            layer = ours
            for part in _path_of(name):
                layer = layer[part] if isinstance(part, int) else getattr(layer, part)
            layer.kernel.set_value(jnp.asarray(module.weight.detach().numpy().T))
            if module.bias is not None:
                layer.bias.set_value(jnp.asarray(module.bias.detach().numpy()))
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "out"],
                             init_lora_weights=False, rank_pattern={"out": 2})
    peft_model = peft.get_peft_model(torch_model, config).eval()
    peft_model.save_pretrained(str(tmp_path / "adapter"))

    adapter_config, weights, _ = load_adapter(tmp_path / "adapter")
    for pattern, rank in ((r".*\.(q|v)_proj", 4), (r".*\.out", 2)):
        lora.apply_lora(ours, pattern, rank=rank, alpha=12, rngs=nnx.Rngs(1))
    assign_lora(ours, weights, _path_of)
    x = np.random.default_rng(0).normal(size=(3, 6)).astype(np.float32)
    with torch.no_grad():
        expected = peft_model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours(jnp.asarray(x)), expected, rtol=1e-4, atol=1e-5)
    merged = nnx.clone(ours)
    lora.merge_lora(merged)
    with torch.no_grad():
        expected_merged = peft_model.merge_and_unload()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(merged(jnp.asarray(x)), expected_merged, rtol=1e-4, atol=1e-5)


def test_lora_params_follow_the_base_layer_sharding_and_dropout():
    from ct_rate_jax import sharding
    from ct_rate_jax.models import layers

    class Attn(nnx.Module):
        def __init__(self, rngs):
            self.q_proj = layers.linear(8, 16, ("embed", "heads"), rngs=rngs)

    model = Attn(nnx.Rngs(0))
    lora.apply_lora(model, ["q_proj"], rank=4, alpha=8, rngs=nnx.Rngs(params=1, dropout=2),
                    dropout=0.5)
    shardings = sharding.state_shardings(nnx.state(model), sharding.make_mesh(2, 2, 2))
    flat = {path: s.get_value() if isinstance(s, nnx.Variable) else s
            for path, s in nnx.to_flat_state(shardings)}
    spec = lambda *p: tuple(flat[p].spec)  # noqa: E731
    assert spec("q_proj", "base", "kernel") == ("fsdp", "tensor")
    assert spec("q_proj", "lora_a") == ("fsdp", None)
    assert spec("q_proj", "lora_b") == (None, "tensor")
    _randomise_lora_b(model)
    x = jnp.ones((2, 8))
    layer = model.q_proj
    assert not np.allclose(layer(x), layer(x))  # dropout on the LoRA branch in training
    layer.eval()
    merged = nnx.clone(model)
    lora.merge_lora(merged)
    np.testing.assert_allclose(layer(x), merged.q_proj(x), rtol=1e-5, atol=1e-5)
