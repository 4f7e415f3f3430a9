"""Copying PyTorch state dicts into nnx models and back, with one clear error.

A model's converter builds a table: state-dict key -> `Slot` (the nnx Variable and
the layout change between torch and us).  `load_state_dict` validates every key
before assigning anything, so a failed load leaves the model untouched and reports
all missing, unexpected and mis-shaped keys at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

Layout = Callable[[np.ndarray], np.ndarray]


def _same(array: np.ndarray) -> np.ndarray:
    return array


def _transpose(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array.T)


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one state-dict entry lives in the model and how its layout differs.

    `to_model` turns the torch array into ours; `to_torch` is its inverse.
    """

    variable: nnx.Variable
    to_model: Layout = _same
    to_torch: Layout = _same


def linear_kernel(variable: nnx.Variable) -> Slot:
    """torch Linear weight [out, in] <-> our kernel [in, out]."""
    return Slot(variable, _transpose, _transpose)


def plain(variable: nnx.Variable) -> Slot:
    return Slot(variable)


class StateDictMismatchError(ValueError):
    """A state dict whose keys or shapes do not fit the model."""


def load_state_dict(table: Mapping[str, Slot], state_dict: Mapping[str, Any], *,
                    prefix: str = "", ignored: Callable[[str], bool] = lambda key: False,
                    what: str = "model") -> None:
    """Assigns `state_dict[prefix + key]` to each slot of `table`, in place.

    Keys outside `prefix` are not considered; keys for which `ignored(key)` is true
    (documented unused weights) are skipped.  Values are cast to the variable dtype.

    Raises:
      StateDictMismatchError: listing every missing, unexpected and mis-shaped key.
    """
    given = {k[len(prefix):]: v for k, v in state_dict.items()
             if k.startswith(prefix) and not ignored(k[len(prefix):])}
    missing = sorted(set(table) - set(given))
    unexpected = sorted(set(given) - set(table))
    mis_shaped, updates = [], {}
    for key in sorted(set(table) & set(given)):
        slot = table[key]
        value = slot.to_model(np.asarray(given[key]))
        if value.shape != tuple(slot.variable.shape):
            expected = slot.to_torch(np.zeros(slot.variable.shape, np.int8)).shape
            mis_shaped.append(f"{prefix}{key}: checkpoint {np.asarray(given[key]).shape}, "
                              f"model expects {expected}")
            continue
        updates[key] = value
    if missing or unexpected or mis_shaped:
        lines = [f"cannot load the state dict into the {what} (prefix {prefix!r}):"]
        for title, keys in (("missing", [prefix + k for k in missing]),
                            ("unexpected", [prefix + k for k in unexpected]),
                            ("mis-shaped", mis_shaped)):
            if keys:
                lines.append(f"  {len(keys)} {title} key(s):")
                lines.extend(f"    {k}" for k in keys)
        raise StateDictMismatchError("\n".join(lines))
    for key, value in updates.items():
        variable = table[key].variable
        variable.set_value(jnp.asarray(value, dtype=variable.get_value().dtype))


def export_state_dict(table: Mapping[str, Slot], prefix: str = "") -> dict[str, np.ndarray]:
    """The table's variables as a torch-layout state dict (numpy arrays)."""
    return {prefix + key: slot.to_torch(np.asarray(slot.variable.get_value()))
            for key, slot in table.items()}
