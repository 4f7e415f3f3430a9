"""Device mesh and the logical-axis rules that place parameters and batches on it.

Modules name the axes of their parameters (see `ct_rate_jax.models.layers`); this
table is the only place that says which mesh axis each logical name is split over.
The mesh has three axes: `data` (pure data parallel), `fsdp` (data parallel with
parameters and optimizer state sharded) and `tensor` (model parallel).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("image_features", "fsdp"),  # the h*w*dim (294,912 for v2) input of the visual projection
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", "tensor"),  # LLM key/value projections, kv_heads x head_dim (grouped-query)
    ("vocab", "tensor"),
    ("patch", None),
    ("latent", None),
    ("norm", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: list[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all (global) devices; one size may be -1 (the rest)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))}: at most one may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} do not divide the "
                             f"{len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} multiply to "
                         f"{math.prod(sizes)}, but there are {len(devices)} devices")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices)


def _fit_spec_to_shape(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Replicates any dimension that the mesh axes assigned to it do not divide evenly.

    E.g. the official feed-forward width 1365 cannot be split over tensor=2; that
    weight is then replicated over `tensor` instead of failing.
    """
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[n] for n in names)
        fitted.append(axes if names and dim % size == 0 else None)
    return PartitionSpec(*fitted)


def state_shardings(abstract_state: Any, mesh: Mesh,
                    rules: tuple[tuple[str, Any], ...] = LOGICAL_AXIS_RULES) -> Any:
    """NamedShardings for an (abstract) nnx state, from its parameters' logical names."""
    with nnx.logical_axis_rules(rules):
        specs = nnx.get_partition_spec(abstract_state)

    def to_sharding(spec_var, value):
        spec = spec_var.get_value() if isinstance(spec_var, nnx.Variable) else spec_var
        shape = getattr(value, "shape", ())
        return NamedSharding(mesh, _fit_spec_to_shape(spec, tuple(shape), mesh))

    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    shardings = jax.tree.map(
        lambda s, v: (s.replace(to_sharding(s, v.get_value())) if is_var(s)
                      else to_sharding(s, v)),
        specs, abstract_state, is_leaf=is_var)
    return shardings


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def host_batch_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles global arrays from this host's slice of the batch (multi-host safe).

    Each process passes its host-local rows; the global batch is their concatenation
    in process order, split over the data and fsdp mesh axes.
    """
    sharding = batch_sharding(mesh)
    return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for key, value in batch.items()}
