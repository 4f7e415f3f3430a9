"""PEFT LoRA adapters on disk (the released CT-CHAT models' `adapter_*` files) -> LoRA weights.

A PEFT adapter directory holds `adapter_config.json` (r, lora_alpha, target_modules,
use_rslora, rank_pattern, alpha_pattern, ...) and `adapter_model.safetensors` (or the
older pickled `adapter_model.bin`) with keys such as

  base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight   float[r, in]
  base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight   float[out, r]

`parse_lora_key` turns such a key into (module name, "A" | "B") with the module name as
the base model's `named_modules()` gives it ("model.layers.0.self_attn.q_proj"); the
LLM converter maps that name to its own nnx path.  `lora_weights` gathers every module's
pair in our layout (A float[in, r], B float[r, out]) with its scaling, ready for
`assign_lora` (into `LoRALinear` layers) or `merged_kernel` (into a plain kernel).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ct_rate_jax.chat.lora import LoRALinear, lora_scaling

PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<matrix>[AB])(?:\.[^.]+)?\.weight$")
# LoRA variants whose weights cannot be expressed as one A @ B update of a linear layer.
_UNSUPPORTED = ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """The fields of PEFT's `adapter_config.json` that decide the LoRA update."""

    r: int
    lora_alpha: float
    target_modules: str | tuple[str, ...] | None = None
    use_rslora: bool = False
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    base_model_name_or_path: str | None = None

    def _pattern_value(self, patterns: Mapping[str, Any], module: str, default):
        # PEFT's get_pattern_key: the first pattern p with re.match(rf"(.*\.)?({p})$", name).
        for pattern, value in patterns.items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                return value
        return default

    def rank_for(self, module: str) -> int:
        return int(self._pattern_value(self.rank_pattern, module, self.r))

    def alpha_for(self, module: str) -> float:
        return float(self._pattern_value(self.alpha_pattern, module, self.lora_alpha))

    def scaling_for(self, module: str) -> float:
        return lora_scaling(self.rank_for(module), self.alpha_for(module), self.use_rslora)


def read_adapter_config(directory: str | os.PathLike) -> AdapterConfig:
    """Parses `directory/adapter_config.json`; anything but a LoRA adapter is an error."""
    path = os.path.join(directory, "adapter_config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"PEFT adapter config not found: {path}")
    with open(path) as handle:
        raw = json.load(handle)
    if raw.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {raw.get('peft_type')!r} is not LORA")
    if raw.get("use_dora"):
        raise ValueError(f"{path}: DoRA adapters (use_dora) are not supported")
    for field in ("r", "lora_alpha"):
        if field not in raw:
            raise ValueError(f"{path} has no {field!r}")
    targets = raw.get("target_modules")
    return AdapterConfig(
        r=int(raw["r"]), lora_alpha=float(raw["lora_alpha"]),
        target_modules=tuple(targets) if isinstance(targets, list) else targets,
        use_rslora=bool(raw.get("use_rslora", False)),
        rank_pattern=dict(raw.get("rank_pattern") or {}),
        alpha_pattern=dict(raw.get("alpha_pattern") or {}),
        lora_dropout=float(raw.get("lora_dropout") or 0.0),
        fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
        base_model_name_or_path=raw.get("base_model_name_or_path"))


def read_adapter_weights(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """The adapter's tensors as float32 numpy arrays: `adapter_model.safetensors`, else
    `adapter_model.bin` loaded with `torch.load(weights_only=True)`."""
    safetensors_path = os.path.join(directory, "adapter_model.safetensors")
    bin_path = os.path.join(directory, "adapter_model.bin")
    if os.path.isfile(safetensors_path):
        from safetensors.numpy import load_file
        try:
            return {k: _float32(v) for k, v in load_file(safetensors_path).items()}
        except (TypeError, ValueError):  # bf16 has no numpy dtype: read through torch
            from safetensors.torch import load_file as load_torch
            return {k: v.float().numpy() for k, v in load_torch(safetensors_path).items()}
    if os.path.isfile(bin_path):
        from ct_rate_jax.chat.projector import read_torch_state_dict
        return read_torch_state_dict(bin_path)
    raise FileNotFoundError(f"no adapter_model.safetensors or adapter_model.bin in {directory}")


def _float32(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float32) if np.issubdtype(array.dtype, np.floating) else array


def parse_lora_key(key: str, prefix: str = PEFT_PREFIX) -> tuple[str, str] | None:
    """'base_model.model.X.lora_A.weight' -> ('X', 'A'); None for a key that is not a
    LoRA matrix (e.g. a `modules_to_save` copy or a bias).  An adapter name left in the
    key ('X.lora_A.default.weight', as in an in-memory state dict) is accepted too."""
    if any(f".{marker}" in key for marker in _UNSUPPORTED):
        raise ValueError(f"adapter key {key}: embedding LoRA and DoRA are not supported")
    match = _LORA_KEY.match(key)
    if match is None:
        return None
    module = match.group("module")
    if prefix and module.startswith(prefix):
        module = module[len(prefix):]
    return module, match.group("matrix")


@dataclasses.dataclass(frozen=True)
class LoRAWeights:
    """One module's update in our layout: kernel += a_ir @ b_ro * scaling."""

    a_ir: np.ndarray  # float32[in, r]
    b_ro: np.ndarray  # float32[r, out]
    scaling: float

    def delta_kernel(self) -> np.ndarray:
        return (self.a_ir.astype(np.float64) @ self.b_ro * self.scaling).astype(np.float32)


def lora_weights(state_dict: Mapping[str, np.ndarray], config: AdapterConfig, *,
                 prefix: str = PEFT_PREFIX) -> tuple[dict[str, LoRAWeights], dict[str, np.ndarray]]:
    """Groups an adapter state dict by module.

    Returns (module name -> LoRAWeights, the remaining non-LoRA tensors by key).  Raises
    ValueError for a module with only one of A / B or with a rank that disagrees with the
    config.
    """
    pairs: dict[str, dict[str, np.ndarray]] = {}
    other = {}
    for key, value in state_dict.items():
        parsed = parse_lora_key(key, prefix)
        if parsed is None:
            other[key] = np.asarray(value)
            continue
        module, matrix = parsed
        pairs.setdefault(module, {})[matrix] = np.asarray(value, np.float32)
    result, problems = {}, []
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            problems.append(f"{module}: only lora_{''.join(pair)} present")
            continue
        a, b = pair["A"], pair["B"]  # torch layouts: A [r, in], B [out, r]
        if config.fan_in_fan_out:  # Conv1D-style layers store the transposes
            a, b = a.T, b.T
        rank = config.rank_for(module)
        if a.shape[0] != rank or b.shape[1] != rank:
            problems.append(f"{module}: lora_A {a.shape}, lora_B {b.shape}, config rank {rank}")
            continue
        result[module] = LoRAWeights(np.ascontiguousarray(a.T), np.ascontiguousarray(b.T),
                                     config.scaling_for(module))
    if problems:
        raise ValueError("adapter weights do not fit the adapter config:\n  "
                         + "\n  ".join(problems))
    return result, other


def load_adapter(directory: str | os.PathLike
                 ) -> tuple[AdapterConfig, dict[str, LoRAWeights], dict[str, np.ndarray]]:
    """`read_adapter_config` + `read_adapter_weights` + `lora_weights` for a directory."""
    config = read_adapter_config(directory)
    weights, other = lora_weights(read_adapter_weights(directory), config)
    if not weights:
        raise ValueError(f"{directory}: the adapter holds no LoRA weights")
    return config, weights, other


def merged_kernel(kernel_io: np.ndarray, weights: LoRAWeights) -> np.ndarray:
    """Our kernel float[in, out] with the LoRA update folded in (float32 arithmetic)."""
    if kernel_io.shape != (weights.a_ir.shape[0], weights.b_ro.shape[1]):
        raise ValueError(f"kernel {kernel_io.shape} does not fit LoRA A {weights.a_ir.shape} / "
                         f"B {weights.b_ro.shape}")
    return (np.asarray(kernel_io, np.float32) + weights.delta_kernel()).astype(kernel_io.dtype)


def dotted_path(name: str) -> tuple[str | int, ...]:
    """'model.layers.0.self_attn.q_proj' -> ('model', 'layers', 0, 'self_attn', 'q_proj'):
    the nnx path of a module whose attribute names follow the Hugging Face model's."""
    return tuple(int(part) if part.isdigit() else part for part in name.split("."))


def assign_lora(model: nnx.Module, weights: Mapping[str, LoRAWeights],
                module_path: Callable[[str], Sequence[Any]] = dotted_path) -> None:
    """Copies adapter weights into the model's `LoRALinear` layers, in place.

    `module_path` maps a PEFT module name to the nnx path of the wrapped layer; the
    default `dotted_path` fits a model named like the Hugging Face one (as
    `ct_rate_jax.models.llm`: 'model.layers.0.self_attn.q_proj').  Every
    target is checked (exists, is a LoRALinear, shapes and scaling agree) before
    anything is written; all problems are reported at once.
    """
    modules = {tuple(path): module for path, module in nnx.iter_modules(model)}
    updates, problems = [], []
    for name, lora in sorted(weights.items()):
        path = tuple(module_path(name))
        layer = modules.get(path)
        if not isinstance(layer, LoRALinear):
            problems.append(f"{name} -> {path}: " + ("no such module" if layer is None else
                                                     f"a {type(layer).__name__}, not LoRALinear"))
            continue
        if layer.lora_a.shape != lora.a_ir.shape or layer.lora_b.shape != lora.b_ro.shape:
            problems.append(f"{name}: adapter A {lora.a_ir.shape} B {lora.b_ro.shape}, model "
                            f"A {layer.lora_a.shape} B {layer.lora_b.shape}")
            continue
        if not np.isclose(layer.scaling, lora.scaling):
            problems.append(f"{name}: adapter scaling {lora.scaling}, model {layer.scaling}")
            continue
        updates.append((layer, lora))
    if problems:
        raise ValueError("cannot load the LoRA adapter into the model:\n  " + "\n  ".join(problems))
    for layer, lora in updates:
        layer.lora_a.set_value(jnp.asarray(lora.a_ir, layer.lora_a.get_value().dtype))
        layer.lora_b.set_value(jnp.asarray(lora.b_ro, layer.lora_b.get_value().dtype))
