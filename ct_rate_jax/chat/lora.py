"""LoRA for any nnx model: wrap chosen linear layers, train only what a stage needs, merge.

  y = base(x) + dropout(x) @ A @ B * scaling        A float[in, r], B float[r, out]
  scaling = alpha / r   (alpha / sqrt(r) with rsLoRA)

As in PEFT: A starts uniform in +-1/sqrt(in) (PyTorch's kaiming_uniform_(a=sqrt(5)) on a
[r, in] weight), B starts at zero, so a freshly wrapped model computes exactly what the
base model did; dropout acts on the LoRA branch's input only.  A and B are
`nnx.LoRAParam`s, so optimizer filters can tell them from the frozen base weights.
PEFT stores `lora_A.weight` [r, in] and `lora_B.weight` [out, r]: the transposes of ours.

CT-CHAT (stage 2) wrapped every linear layer of the LLM except `lm_head` (LLaVA's
`find_all_linear_names`), r = 128, alpha = 256; `target_modules="all-linear"` does that.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ct_rate_jax.models import layers

ALL_LINEAR = "all-linear"
# PEFT's "all-linear" leaves out the output layer; LLaVA removes `lm_head` by name.
OUTPUT_LAYER_NAMES = ("lm_head",)


def lora_scaling(rank: int, alpha: float, use_rslora: bool = False) -> float:
    """alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA (PEFT's `use_rslora`)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


class LoRALinear(nnx.Module):
    """An `nnx.Linear` (kernel [in, out]) plus a trainable low-rank update.

    The base layer is kept as is (`self.base`, frozen by the optimizer filter), so its
    path in the state gains one `base` level: `...q_proj.kernel` -> `...q_proj.base.kernel`.
    """

    def __init__(self, base: nnx.Linear, rank: int, alpha: float, *, rngs: nnx.Rngs,
                 dropout: float = 0.0, use_rslora: bool = False):
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        in_features, out_features = base.kernel.shape
        in_axis, out_axis = base.kernel.get_metadata().get("out_sharding") or (None, None)
        self.base = base
        self.rank, self.alpha, self.use_rslora = rank, alpha, use_rslora
        self.scaling = lora_scaling(rank, alpha, use_rslora)
        bound = 1.0 / math.sqrt(in_features)
        self.lora_a = nnx.LoRAParam(
            jax.random.uniform(rngs.params(), (in_features, rank), jnp.float32, -bound, bound),
            **layers.sharded(in_axis, None))
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, out_features), jnp.float32),
                                    **layers.sharded(None, out_axis))
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout else None

    def delta_kernel(self) -> jax.Array:
        """float32[in, out]: what merging adds to the base kernel."""
        return (self.lora_a[...] @ self.lora_b[...]) * self.scaling

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.base(x)
        h = self.dropout(x) if self.dropout is not None else x
        dtype = self.base.dtype or y.dtype
        update = (h.astype(dtype) @ self.lora_a[...].astype(dtype)) @ self.lora_b[...].astype(dtype)
        return y + (update * self.scaling).astype(y.dtype)


def module_name(path: Sequence[Any]) -> str:
    """An nnx module path as a dotted name: ('layers', 0, 'self_attn', 'q_proj') ->
    'layers.0.self_attn.q_proj' (PEFT's names below the model prefix look the same)."""
    return ".".join(str(part) for part in path)


def matches_target(name: str, target_modules: str | Sequence[str]) -> bool:
    """PEFT's rule: a string is a regular expression the whole name must match; a list
    matches a name equal to an entry or ending in '.' + entry."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == target or name.endswith("." + target) for target in target_modules)


def _linear_modules(model: nnx.Module):
    return [(path, module) for path, module in nnx.iter_modules(model)
            if isinstance(module, nnx.Linear) and path]


def _set_submodule(model: nnx.Module, path: tuple, new: nnx.Module) -> None:
    parent = model
    for part in path[:-1]:
        parent = parent[part] if isinstance(part, int) else getattr(parent, part)
    if isinstance(path[-1], int):
        parent[path[-1]] = new
    else:
        setattr(parent, path[-1], new)


def apply_lora(model: nnx.Module, target_modules: str | Sequence[str], *, rank: int,
               alpha: float, rngs: nnx.Rngs, dropout: float = 0.0, use_rslora: bool = False,
               exclude_modules: Sequence[str] = ()) -> list[str]:
    """Wraps the model's matching `nnx.Linear` layers in `LoRALinear`, in place.

    Args:
      target_modules: PEFT-style names (["q_proj", "v_proj"]), a regular expression, or
        "all-linear" (every linear layer except the output layer `lm_head`).
      exclude_modules: names (same list rule) never wrapped, e.g. ["mm_projector"].

    Returns the dotted paths wrapped.  Raises ValueError if nothing matches (a typo in
    `target_modules` should not silently train nothing) or a layer is wrapped already.
    """
    wrapped = []
    for path, module in _linear_modules(model):
        name = module_name(path)
        if any(name == e or name.startswith(e + ".") or name.endswith("." + e)
               or ("." + e + ".") in name for e in exclude_modules):
            continue
        if target_modules == ALL_LINEAR:
            selected = path[-1] not in OUTPUT_LAYER_NAMES
        else:
            selected = matches_target(name, target_modules)
        if not selected:
            continue
        if len(path) >= 2 and path[-1] == "base" and isinstance(
                _get_submodule(model, path[:-1]), LoRALinear):
            raise ValueError(f"{module_name(path[:-1])} already carries LoRA")
        _set_submodule(model, path, LoRALinear(module, rank, alpha, rngs=rngs, dropout=dropout,
                                               use_rslora=use_rslora))
        wrapped.append(name)
    if not wrapped:
        linear = sorted({str(p[-1]) for p, _ in _linear_modules(model)})
        raise ValueError(f"LoRA target_modules {target_modules!r} match no linear layer; the "
                         f"model's linear layer names are {linear}")
    return wrapped


def _get_submodule(model: nnx.Module, path: tuple) -> Any:
    node = model
    for part in path:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    return node


def lora_modules(model: nnx.Module) -> list[tuple[str, LoRALinear]]:
    """(dotted path, LoRALinear) of every wrapped layer, in graph order."""
    return [(module_name(path), module) for path, module in nnx.iter_modules(model)
            if isinstance(module, LoRALinear)]


def merge_lora(model: nnx.Module) -> list[str]:
    """Folds every LoRA update into its base kernel and unwraps the layer, in place.

    Afterwards the model has the plain structure (and state paths) of the base model,
    with kernel = kernel + A @ B * scaling (computed in float32, stored in the kernel's
    dtype); it computes what the wrapped model computed without dropout.  Use
    `nnx.clone(model)` first to keep the unmerged model.  Returns the merged paths.
    """
    merged = []
    wrapped = [(path, module) for path, module in nnx.iter_modules(model)
               if isinstance(module, LoRALinear)]
    for path, module in wrapped:
        kernel = module.base.kernel
        value = kernel.get_value()
        kernel.set_value((value.astype(jnp.float32) + module.delta_kernel()).astype(value.dtype))
        _set_submodule(model, path, module.base)
        merged.append(module_name(path))
    return merged


# ----------------------------------------------------------------------------------
# What each training stage updates
# ----------------------------------------------------------------------------------

STAGES = ("projector", "lora", "full")


def trainable_filter(stage: str, *, projector: str = "projector", llm: str = "llm"):
    """The nnx filter of the parameters a CT-CHAT training stage updates.

    Pass it as `nnx.Optimizer(model, tx, wrt=...)` and as the `nnx.DiffState` of the
    gradient; everything else (the LLM's base weights, a vision encoder) stays frozen.

      "projector"  stage 1 (feature alignment): the projector only
      "lora"       stage 2: the LoRA A/B matrices and the projector
      "full"       stage 2 without LoRA: the whole LLM and the projector

    `projector` / `llm` name the attributes (anywhere in the path) holding each part.
    """
    projector_params = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam), nnx.PathContains(projector))
    if stage == "projector":
        return projector_params
    if stage == "lora":
        return nnx.Any(nnx.LoRAParam, projector_params)
    if stage == "full":
        return nnx.Any(nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam), nnx.PathContains(llm)),
                       projector_params)
    raise ValueError(f"unknown training stage {stage!r}; expected one of {STAGES}")


def count_parameters(model: nnx.Module, wrt=nnx.Param) -> int:
    """Number of scalars in the variables selected by the filter `wrt`."""
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, wrt)))
