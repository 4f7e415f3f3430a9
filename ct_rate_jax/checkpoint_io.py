"""Model directories: a CT-CLIP's weights and config on disk, for inference and as init.

    model, extras = load_converted("converted/ct_clip_v2")

A directory written by `save_converted` (and so by `python -m experiments.convert_official`)
holds

  weights/          orbax PyTree {"model": the model's weights, "extras": {...}}; the
                    weights are every nnx variable but the RNG state (parameters and the
                    VQ codebook buffers), float32, as `nnx.to_pure_dict` nests them
  config.json       `CTCLIPConfig.to_dict()`
  model.gin         the same config as gin bindings, for `experiments.pretrain`
  conversion.json   where the weights came from (source file, sha256, variant, counts)

`extras` holds arrays that belong to the checkpoint but not to CTCLIP: for the LiPro
(ClassFine) release the linear head, {"classifier.weight": [18, L], "classifier.bias":
[18]} in torch layout.  The weights are restored as host arrays and validated against
the model before anything is assigned; a directory of another model gives one error
naming the directory and every differing parameter.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from ct_rate_jax.models.ct_clip import CTCLIP, CTCLIPConfig

WEIGHTS_DIR = "weights"
CONFIG_FILE = "config.json"
GIN_FILE = "model.gin"
CONVERSION_FILE = "conversion.json"

# Everything a model directory stores: all variables except the dropout RNG streams.
WEIGHTS = nnx.Not(nnx.RngState)


class ModelDirectoryError(ValueError):
    """A model directory that is missing, incomplete or does not fit the model."""


# ----------------------------------------------------------------------------------
# Building models without random initialisation
# ----------------------------------------------------------------------------------

def abstract_ctclip(config: CTCLIPConfig, *, dtype: Any = None, seed: int = 0) -> CTCLIP:
    """A CTCLIP whose variables are shapes only (`nnx.eval_shape`): no memory, no init
    time (the v2 model's random init alone costs seconds and 1.2 GB).  Fill the weights
    by assigning them, then call `finish_model`."""
    return nnx.eval_shape(lambda: CTCLIP(config, rngs=nnx.Rngs(seed), dtype=dtype))


def finish_model(model: CTCLIP, *, seed: int = 0) -> CTCLIP:
    """Gives an abstract model whose weights were assigned real dropout RNG streams.

    The streams are what `CTCLIP(config, rngs=nnx.Rngs(seed))` would hold; under jit,
    XLA drops the parameter initialisers whose results are not returned.
    """
    unfilled = [path for path, leaf in _flat(weights_of(model)).items()
                if isinstance(leaf, jax.ShapeDtypeStruct)]
    if unfilled:
        raise ModelDirectoryError(f"{len(unfilled)} weight(s) were never assigned, e.g. "
                                  f"{', '.join(unfilled[:5])}")
    config = model.config
    rng_state = jax.jit(lambda: nnx.state(CTCLIP(config, rngs=nnx.Rngs(seed)),
                                          nnx.RngState))()
    nnx.update(model, rng_state)
    return model


def weights_of(model: CTCLIP) -> dict:
    """The model's stored variables as a nested pure dict of arrays."""
    return nnx.to_pure_dict(nnx.state(model, WEIGHTS))


def parameter_count(model: CTCLIP) -> int:
    """Number of trainable parameters (nnx.Param elements)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _flat(tree: Any) -> dict[str, Any]:
    """Nested dict -> {"a/0/b": leaf}; orbax stores every key as a string."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(
            tree, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))[0]:
        out["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)] = leaf
    return out


# ----------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------

def gin_bindings(config: CTCLIPConfig) -> str:
    """The config as complete CTCLIPConfig / CTViTConfig / BertConfig gin bindings."""
    lines = ["CTCLIPConfig.ctvit = @CTViTConfig()", "CTCLIPConfig.text = @BertConfig()"]
    for name, value in dataclasses.asdict(config).items():
        if name not in ("ctvit", "text"):
            lines.append(f"CTCLIPConfig.{name} = {value!r}")
    lines += [f"CTViTConfig.{k} = {v!r}" for k, v in dataclasses.asdict(config.ctvit).items()]
    lines += [f"BertConfig.{k} = {v!r}" for k, v in dataclasses.asdict(config.text).items()]
    return "\n".join(lines) + "\n"


def save_converted(directory: str | os.PathLike, model: CTCLIP, *,
                   extras: Mapping[str, np.ndarray] | None = None,
                   conversion: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Writes a model directory (see the module docstring); returns the conversion.json
    record (`conversion` plus the parameter count and the extras' shapes)."""
    directory = os.path.abspath(directory)
    if os.path.exists(os.path.join(directory, WEIGHTS_DIR)):
        raise ModelDirectoryError(f"{directory} already holds converted weights; "
                                  "choose another output directory or remove it")
    os.makedirs(directory, exist_ok=True)
    # Host (numpy) views: orbax then writes without staging a second copy of every array.
    tree = {"model": jax.tree.map(np.asarray, weights_of(model)),
            "extras": _nest_extras(extras or {})}
    # Uncompressed: weights gain ~8% from zstd, and compressing holds another copy of
    # them in memory and doubles the write time (v2: +1.1 GB, +4 s).
    handler = ocp.PyTreeCheckpointHandler(use_compression=False)
    with ocp.Checkpointer(handler) as checkpointer:
        checkpointer.save(os.path.join(directory, WEIGHTS_DIR), args=ocp.args.PyTreeSave(tree))
    config = model.config
    _write_json(os.path.join(directory, CONFIG_FILE), config.to_dict())
    header = (f"# CT-CLIP model of {directory} (its weights: {WEIGHTS_DIR}/, config.json).\n"
              "# Start pretraining from it:\n"
              "#   python -m experiments.pretrain --gin experiments/configs/ct_clip_v2.gin \\\n"
              f"#     --gin {os.path.join(directory, GIN_FILE)} \\\n"
              f"#     --gin_param \"train.init_checkpoint='{directory}'\"\n")
    with open(os.path.join(directory, GIN_FILE), "w", encoding="utf-8") as f:
        f.write(header + gin_bindings(config))
    record = dict(conversion or {}, parameter_count=parameter_count(model),
                  extras={k: list(np.shape(v)) for k, v in (extras or {}).items()})
    _write_json(os.path.join(directory, CONVERSION_FILE), record)
    return record


def _write_json(path: str, value: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)
        f.write("\n")


def _nest_extras(extras: Mapping[str, np.ndarray]) -> dict:
    """"classifier.weight" -> {"classifier": {"weight": ...}}: orbax joins keys with dots."""
    nested: dict = {}
    for key, value in extras.items():
        *parents, leaf = key.split(".")
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = np.asarray(value)
    return nested


# ----------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------

def read_config(directory: str | os.PathLike) -> CTCLIPConfig:
    """The CTCLIPConfig of a model directory."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path) or not os.path.isdir(os.path.join(directory, WEIGHTS_DIR)):
        raise ModelDirectoryError(
            f"{directory} is not a converted model directory (it needs {CONFIG_FILE} and "
            f"{WEIGHTS_DIR}/, as python -m experiments.convert_official writes)")
    with open(path, encoding="utf-8") as f:
        try:
            return CTCLIPConfig.from_dict(json.load(f))
        except (ValueError, TypeError) as error:
            raise ModelDirectoryError(f"{path}: {error}") from error


def restore_weights(model: CTCLIP, path: str | os.PathLike, *, root: tuple[str, ...] = ("model",),
                    what: str | None = None) -> dict:
    """Assigns the weights stored in the orbax PyTree at `path`, below `root`, to `model`.

    Every stored weight the model has is checked (presence, shape) before anything is
    assigned.  Entries the model does not have are an error only for a model directory
    (`root` = ("model",)); a training checkpoint also stores the RNG state, skipped.
    Returns the checkpoint's metadata tree (for the caller to read other items).

    Raises:
      ModelDirectoryError: naming `what` (default: the path) and every differing weight.
    """
    path = os.path.abspath(path)
    what = what or path
    with ocp.PyTreeCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(path).item_metadata.tree
        saved_tree = metadata
        for key in root:
            saved_tree = saved_tree.get(key, {}) if isinstance(saved_tree, Mapping) else {}
        saved = {k: tuple(v.shape) for k, v in _flat(saved_tree).items()}
        weights_state = nnx.state(model, WEIGHTS)
        leaves = _flat(nnx.to_pure_dict(weights_state))
        wanted = {k: tuple(v.shape) for k, v in leaves.items()}
        problems = [f"  shape of {k}: stored {saved[k]}, model {wanted[k]}"
                    for k in sorted(saved.keys() & wanted.keys()) if saved[k] != wanted[k]]
        problems += [f"  missing: {k} {wanted[k]}" for k in sorted(wanted.keys() - saved.keys())]
        if root == ("model",):
            problems += [f"  unexpected: {k} {saved[k]}"
                         for k in sorted(saved.keys() - wanted.keys())]
        if problems:
            shown = problems[:40] + ([f"  ... and {len(problems) - 40} more"]
                                     if len(problems) > 40 else [])
            raise ModelDirectoryError(
                f"the weights in {what} do not fit the model ({len(problems)} difference(s); "
                "is the model config the one they were saved with?):\n" + "\n".join(shown))
        # Straight into jax arrays on one local device: restoring numpy arrays and
        # converting them would hold the weights twice (v2: 3.1 GB peak instead of 2.3).
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        item = {}
        for flat_key in wanted:
            node = item
            *parents, leaf = list(root) + flat_key.split("/")
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = ocp.ArrayRestoreArgs(sharding=device, dtype=leaves[flat_key].dtype)
        restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
            item=item, restore_args=item, partial_restore=True))
    for key in root:
        restored = restored[key]
    nnx.replace_by_pure_dict(weights_state, restored)
    nnx.update(model, weights_state)
    return metadata


def _restore_extras(path: str, metadata: Mapping) -> dict[str, np.ndarray]:
    extras_tree = metadata.get("extras") or {}
    flat = _flat(extras_tree)
    if not flat:
        return {}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                {"extras": extras_tree})
    with ocp.PyTreeCheckpointer() as checkpointer:
        restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
            item=restore_args, restore_args=restore_args, partial_restore=True))
    return {key.replace("/", "."): value
            for key, value in _flat(restored["extras"]).items()}


def load_weights_into(model: CTCLIP, directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """Assigns a model directory's weights to `model` in place; returns the extras."""
    read_config(directory)  # a clear error if `directory` is not a model directory
    path = os.path.join(os.path.abspath(directory), WEIGHTS_DIR)
    metadata = restore_weights(model, path, what=str(directory))
    return _restore_extras(path, metadata)


def load_converted(directory: str | os.PathLike, *, dtype: Any = None,
                   seed: int = 0) -> tuple[CTCLIP, dict[str, np.ndarray]]:
    """The CTCLIP of a model directory, and its extras (e.g. the LiPro head).

    Args:
      directory: written by `save_converted` / `python -m experiments.convert_official`.
      dtype: compute dtype of the returned model (parameters stay float32).
      seed: seeds the dropout streams (used only with `train=True`).
    """
    config = read_config(directory)
    model = abstract_ctclip(config, dtype=dtype, seed=seed)
    extras = load_weights_into(model, directory)
    return finish_model(model, seed=seed), extras


def config_differences(a: CTCLIPConfig, b: CTCLIPConfig) -> list[str]:
    """Fields (dotted, e.g. "ctvit.temporal_peg_layout") whose values differ."""
    def flat(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        out = {}
        for key, value in config.items():
            out.update(flat(value, f"{prefix}{key}.") if isinstance(value, Mapping)
                       else {prefix + key: value})
        return out

    flat_a, flat_b = flat(a.to_dict()), flat(b.to_dict())
    return [f"{k}: {flat_a.get(k)!r} vs {flat_b.get(k)!r}"
            for k in sorted(flat_a.keys() | flat_b.keys()) if flat_a.get(k) != flat_b.get(k)]
