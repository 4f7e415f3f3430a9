"""Peak FLOP/s of the device a step runs on, for MFU (model FLOPs utilisation).

Accelerators: the vendors' dense (no sparsity) peak per chip / GPU.  CPU: no table
value means anything for a shared VM, so the peak is *measured*: the best float32
matrix-product rate XLA reaches on all the process's CPU devices together, divided
by the device count (what one `jax.devices()` entry can do).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

# Dense (no sparsity) peak TFLOP/s per device, by compute dtype.  TPU: per chip (one
# jax device per chip on v4 and later).  GPU: SXM parts; "float32" is the TF32 tensor-
# core figure, because XLA's default matmul precision on Ampere and later runs float32
# dots as TF32.  TPUs run float32 dots as bf16 passes by default, so both entries are
# the bf16 figure there.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "TPU v4": {"bfloat16": 275.0, "float32": 275.0},
    "TPU v5 lite": {"bfloat16": 197.0, "float32": 197.0},   # v5e
    "TPU v5e": {"bfloat16": 197.0, "float32": 197.0},
    "TPU v5p": {"bfloat16": 459.0, "float32": 459.0},
    "TPU v6 lite": {"bfloat16": 918.0, "float32": 918.0},   # v6e (Trillium)
    "TPU v6e": {"bfloat16": 918.0, "float32": 918.0},
    "A100": {"bfloat16": 312.0, "float32": 156.0},
    "H100": {"bfloat16": 989.0, "float32": 494.0},
    "H200": {"bfloat16": 989.0, "float32": 494.0},
}

_measured_cpu_peak: float | None = None


def device_kind(device: jax.Device | None = None) -> str:
    device = device or jax.devices()[0]
    return device.device_kind


def table_peak_flops(kind: str, dtype: str) -> float | None:
    """Peak FLOP/s of one device of `kind` (its `device_kind` string), or None."""
    for name, peaks in PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            return peaks["bfloat16" if dtype == "bfloat16" else "float32"] * 1e12
    return None


def measure_cpu_matmul_peak(size: int = 1536, repeats: int = 5) -> float:
    """Best float32 [size, size] @ [size, size] rate of one CPU device, in FLOP/s.

    Every CPU device multiplies its own pair at the same time (one jitted, sharded
    call), so the figure is the machine's rate divided by the device count.  Cached.
    About 7 GFLOP per device: a fraction of a second at start-up on one device.
    """
    global _measured_cpu_peak
    if _measured_cpu_peak is not None:
        return _measured_cpu_peak
    devices = jax.devices("cpu")
    n = len(devices)
    mesh = jax.make_mesh((n,), ("d",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=devices)
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.device_put(jax.random.normal(key_a, (n, size, size), jnp.float32), spec)
    b = jax.device_put(jax.random.normal(key_b, (n, size, size), jnp.float32), spec)
    matmul = jax.jit(lambda x, y: jnp.einsum("nij,njk->nik", x, y), out_shardings=spec)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    _measured_cpu_peak = 2.0 * size**3 / best
    return _measured_cpu_peak


def peak_flops_per_device(dtype: str = "float32", device: jax.Device | None = None
                          ) -> tuple[float | None, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return measure_cpu_matmul_peak(), "measured float32 matmul"
    peak = table_peak_flops(device.device_kind, dtype)
    if peak is None:
        return None, f"unknown device kind {device.device_kind!r}"
    return peak, f"{device.device_kind} {dtype} dense peak (table)"


def peak_memory_bytes(device: jax.Device | None = None) -> int | None:
    """Peak bytes in use on the device since start (None where not reported).

    Accelerators report it through `memory_stats()`; the CPU client does not, so on
    CPU the process's peak resident set size is returned instead.
    """
    device = device or jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    if device.platform == "cpu":
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    return None
