"""Orbax checkpoints of the train state, the data iterator and run metadata, together.

A checkpoint `<workdir>/checkpoints/<step>/` holds three items written by one
(asynchronous) orbax CheckpointManager save:
  state          the (model, optimizer) nnx state, every array with its sharding
  data_iterator  the Grain iterator state (JSON), so resumption replays no batch
  meta           step, config fingerprint and anything else the trainer records
Orbax writes to a temporary directory and renames it when complete, so a killed
save never shows up as the latest checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx


class CheckpointMismatchError(ValueError):
    """The checkpoint on disk does not fit the model or mesh being restored."""


def _to_saveable(state: Any) -> Any:
    """nnx state -> pure pytree; PRNG key arrays become their raw uint32 data."""
    pure = nnx.to_pure_dict(state)
    return jax.tree.map(
        lambda x: jax.random.key_data(x)
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
        else x, pure)


def _abstract_saveable(abstract_state: Any, shardings: Any = None) -> Any:
    """The restore target matching `_to_saveable`, with the shardings to restore into
    (None: shapes and dtypes only)."""
    pure_abstract = nnx.to_pure_dict(abstract_state)

    def target(x, s=None):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = jax.eval_shape(jax.random.key_data, x)
            return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=s)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    if shardings is None:
        return jax.tree.map(target, pure_abstract)
    return jax.tree.map(target, pure_abstract, nnx.to_pure_dict(shardings))


def _from_saveable(restored: Any, abstract_state: Any) -> Any:
    """Inverse of `_to_saveable` into a copy of the abstract nnx state."""
    pure_abstract = nnx.to_pure_dict(abstract_state)
    # A key's dtype names its PRNG implementation (e.g. key<fry> for threefry).
    values = jax.tree.map(
        lambda r, x: jax.random.wrap_key_data(r, impl=x.dtype._impl)
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else r,
        restored, pure_abstract)
    state = jax.tree.map(lambda x: x, abstract_state)  # a fresh container to fill
    nnx.replace_by_pure_dict(state, values)
    return state


def _describe_mismatch(saved_tree: Any, target_tree: Any) -> str:
    """Lists keys missing, unexpected or of another shape between two pytrees."""
    def flat(tree):
        # Orbax stores every dict key as a string; compare paths as "a/0/b".
        return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path):
                getattr(leaf, "shape", None)
                for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}

    saved, target = flat(saved_tree), flat(target_tree)
    lines = [f"  missing in checkpoint: {k}" for k in sorted(target.keys() - saved.keys())]
    lines += [f"  unexpected in checkpoint: {k}" for k in sorted(saved.keys() - target.keys())]
    lines += [f"  shape {k}: checkpoint {tuple(saved[k])} vs model {tuple(target[k])}"
              for k in sorted(saved.keys() & target.keys())
              if saved[k] is not None and target[k] is not None
              and tuple(saved[k]) != tuple(target[k])]
    return "\n".join(lines[:40]) + (f"\n  ... and {len(lines) - 40} more" if len(lines) > 40
                                    else "")


class Checkpointer:
    """Saves and restores (state, data iterator state, meta) under `<directory>/<step>`."""

    def __init__(self, directory: str, *, max_to_keep: int | None = 3,
                 async_save: bool = True):
        self.directory = os.path.abspath(directory)
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        registry.add("state", ocp.args.StandardSave, ocp.StandardCheckpointHandler)
        registry.add("state", ocp.args.StandardRestore, ocp.StandardCheckpointHandler)
        for item in ("data_iterator", "meta"):
            registry.add(item, ocp.args.JsonSave, ocp.JsonCheckpointHandler)
            registry.add(item, ocp.args.JsonRestore, ocp.JsonCheckpointHandler)
        self._manager = ocp.CheckpointManager(
            self.directory, handler_registry=registry,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                # The directory appears with the first save, so a run that stops on a
                # configuration error before training leaves nothing behind.
                create=False))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, data_iterator_state: dict | None,
             meta: dict[str, Any]) -> None:
        """Starts an (async) save; arrays are copied off the devices before it returns."""
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_to_saveable(state)),
            data_iterator=ocp.args.JsonSave(data_iterator_state or {}),
            meta=ocp.args.JsonSave(dict(meta, step=int(step)))))

    def check_fits(self, step: int, abstract_state: Any) -> None:
        """Raises CheckpointMismatchError, listing the differing arrays, unless the
        checkpoint at `step` holds arrays of `abstract_state`'s shapes (reads metadata
        only: cheap enough to run before the train state exists)."""
        saved_tree = self._manager.item_metadata(step)["state"]
        if saved_tree is None:
            return
        mismatch = _describe_mismatch(saved_tree, _abstract_saveable(abstract_state))
        if mismatch:
            raise CheckpointMismatchError(
                f"checkpoint {os.path.join(self.directory, str(step))} does not match the "
                f"model being trained:\n{mismatch}\n(Use another --workdir, or the gin config "
                "the checkpoint was written with.)")

    def restore(self, step: int, abstract_state: Any, shardings: Any
                ) -> tuple[Any, dict, dict]:
        """Returns (state, data iterator state, meta); clear error if it does not fit."""
        self.check_fits(step, abstract_state)
        target = _abstract_saveable(abstract_state, shardings)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target),
            data_iterator=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        state = _from_saveable(restored["state"], abstract_state)
        return state, dict(restored["data_iterator"] or {}), dict(restored["meta"] or {})

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
