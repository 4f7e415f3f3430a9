"""Joining a multi-process (multi-host) JAX run, before anything touches a device.

One training run is one Python process per host (TPU VM worker) or per GPU (SLURM
task); `jax.distributed.initialize` connects them through a coordinator (process 0),
after which `jax.devices()` lists every device of every process and one `jax.jit` runs
the SPMD program on all of them.  `initialize` decides whether and how to join:

* explicit settings (`--coordinator_address host:port --num_processes N --process_id
  I`, e.g. from a launch script) are used as given;
* otherwise, in `auto` mode, a cluster that jax knows how to read is joined
  automatically: a Cloud TPU VM (the slice's workers from the metadata server), a SLURM
  step with more than one task (`srun`), an Open MPI job with more than one rank;
* otherwise the run stays a single process (the usual case on a laptop or one GPU).

Collectives between processes on CPU (the 2-process test on 127.0.0.1, or a CPU
cluster) go through gloo; `initialize` selects it when it joins a run (jax 0.10's
default as well; the setting only concerns the CPU backend, GPUs and TPUs keep NCCL /
ICI).
"""

from __future__ import annotations

import dataclasses
import os
import re
import zlib
from typing import Any, Sequence

import jax
import numpy as np

MODES = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """How to join a multi-process run (the `--distributed` flags of experiments.pretrain).

    mode: "auto" (join when settings are given or a cluster is detected), "on" (always
      call `jax.distributed.initialize`; fails when nothing says how), "off" (never).
    coordinator_address: "host:port" of process 0's coordinator service.
    num_processes: processes in the run.
    process_id: this process's index, 0 .. num_processes - 1.
    local_device_ids: the local accelerators this process drives (e.g. one GPU each);
      None: all of this host's devices (jax's per-cluster default on SLURM / Open MPI is
      one device per task, the task's local rank).
    initialization_timeout_s: how long to wait for every process to join.
    """

    mode: str = "auto"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    initialization_timeout_s: int = 300

    @property
    def explicit(self) -> bool:
        return any(v is not None for v in (self.coordinator_address, self.num_processes,
                                           self.process_id))


def detected_cluster(environ: dict[str, str] | None = None) -> str | None:
    """The multi-process environment this process runs in, or None.

    "tpu" on a Cloud TPU VM (jax asks the metadata server for the slice's workers),
    "slurm" inside a SLURM step with several tasks, "ompi" under Open MPI's mpirun with
    several ranks.  A single-task SLURM allocation (an interactive shell on a GPU node)
    is not a multi-process run.
    """
    environ = os.environ if environ is None else environ
    if "SLURM_STEP_NODELIST" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1 \
            and "SLURM_PROCID" in environ:
        return "slurm"
    if int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "ompi"
    if environ is os.environ and _running_on_cloud_tpu_vm():
        return "tpu"
    return None


def _running_on_cloud_tpu_vm() -> bool:
    # Set by jax at import from the TPU chips on the PCI bus (no network access).
    from jax._src import cloud_tpu_init

    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def _check(settings: DistributedSettings) -> None:
    """One clear error for settings that cannot describe a run."""
    if settings.mode not in MODES:
        raise ValueError(f"--distributed must be one of {MODES}, got {settings.mode!r}")
    address = settings.coordinator_address
    if address is not None and not re.fullmatch(r"\[?[\w.\-:]+\]?:\d{1,5}", address):
        raise ValueError(f"--coordinator_address must be host:port (process 0's address and "
                         f"a free port), got {address!r}")
    count, index = settings.num_processes, settings.process_id
    if count is not None and count < 1:
        raise ValueError(f"--num_processes must be >= 1, got {count}")
    if index is not None and (index < 0 or (count is not None and index >= count)):
        raise ValueError(f"--process_id must be in 0 .. --num_processes - 1 "
                         f"({(count or 1) - 1}), got {index}")


def initialize(settings: DistributedSettings) -> str | None:
    """Joins the multi-process run the settings or the environment describe.

    Must run before any JAX computation (jax refuses otherwise).  Returns a short
    description ("3 of 4 processes, coordinator 10.0.0.2:8476 (slurm)") or None when
    the run stays a single process.
    """
    _check(settings)
    if settings.mode == "off":
        return None
    cluster = detected_cluster()
    if settings.mode == "auto" and not settings.explicit and cluster is None:
        return None
    if settings.explicit and cluster is None:
        missing = [flag for flag, value in (("--coordinator_address",
                                             settings.coordinator_address),
                                            ("--num_processes", settings.num_processes),
                                            ("--process_id", settings.process_id))
                   if value is None]
        if missing:
            raise ValueError(f"a multi-process run outside TPU / SLURM / Open MPI needs "
                             f"{', '.join(missing)} as well (every process gets the same "
                             f"--coordinator_address and --num_processes and its own "
                             f"--process_id)")
    if settings.mode == "on" and not settings.explicit and cluster is None:
        raise ValueError("--distributed=on: no TPU slice, SLURM step or Open MPI job was "
                         "detected; give --coordinator_address, --num_processes and "
                         "--process_id")
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
        # Cross-process collectives of the CPU backend (tests, CPU clusters).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=settings.coordinator_address,
        num_processes=settings.num_processes,
        process_id=settings.process_id,
        local_device_ids=(list(settings.local_device_ids)
                          if settings.local_device_ids is not None else None),
        initialization_timeout=settings.initialization_timeout_s)
    _orbax_barriers_through_coordination_service()
    from jax._src import distributed as jax_distributed  # the address jax settled on

    address = jax_distributed.global_state.coordinator_address or settings.coordinator_address
    return (f"process {jax.process_index()} of {jax.process_count()}, coordinator "
            f"{address}" + (f" ({cluster})" if cluster else ""))


def _orbax_barriers_through_coordination_service() -> None:
    """Orbax synchronises processes around every checkpoint; by default with a
    collective (`sync_global_devices`), which on CPU times out after 30 s and runs from
    orbax's background thread next to the training step's collectives.  Its own flag
    switches it to the coordination service's barriers."""
    from absl import flags
    import orbax.checkpoint  # noqa: F401  (defines the flag)

    name = "experimental_orbax_use_distributed_barrier"
    if name in flags.FLAGS:
        flags.FLAGS[name].value = True


def parse_device_ids(values: Sequence[str] | None) -> tuple[int, ...] | None:
    """["0", "1"] (an absl list flag) -> (0, 1); a clear error for anything else."""
    if not values:
        return None
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise ValueError(f"--local_device_ids must be comma-separated integers, got "
                         f"{','.join(values)!r}") from None


# ----------------------------------------------------------------------------------
# Small multi-process helpers used by the trainer
# ----------------------------------------------------------------------------------

BARRIER_TIMEOUT_S = 30 * 60  # e.g. one process still compiling, or writing the synthetic data


def barrier(name: str, timeout_s: int = BARRIER_TIMEOUT_S) -> None:
    """Waits until every process reaches the barrier of this name (no-op alone).

    A barrier of the coordination service, not a collective: on CPU a gloo collective
    gives up when a peer is more than 30 s late, which a slower compilation on a busy
    machine easily is.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed

    _barrier_counts[name] = _barrier_counts.get(name, 0) + 1  # ids must be unique
    jax_distributed.global_state.client.wait_at_barrier(
        f"ct_rate_jax:{name}:{_barrier_counts[name]}", timeout_s * 1000)


_barrier_counts: dict[str, int] = {}


def compile_then_sync(jitted, *args, name: str = "compiled") -> None:
    """With several processes: compiles `jitted` for `args` (the executable is cached
    for the calls that follow) and waits until every process has, so that no process
    starts the program's collectives while another is still compiling."""
    if jax.process_count() == 1:
        return
    jitted.lower(*args).compile()
    barrier(name)


def check_same_on_all_processes(value: Any, what: str) -> None:
    """Raises if a JSON-able value differs between processes (e.g. the data iterator
    state that only process 0 writes into a checkpoint)."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    digest = np.uint32(zlib.crc32(repr(value).encode()))
    digests = np.asarray(multihost_utils.process_allgather(digest))
    if len(set(digests.tolist())) != 1:
        raise RuntimeError(f"{what} differs between processes (digests "
                           f"{digests.tolist()}); checkpoints hold process 0's")


def fetch_global(array: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-process) global array, on every process."""
    if jax.process_count() == 1 or array.is_fully_addressable:
        return np.asarray(jax.device_get(array))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def global_array_from_full(value: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global array from a value every process holds in full (each process puts only
    the slices its devices own; no assumption about which rows belong to which host)."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
