r"""Train-step benchmark: compile time, step time, volumes/s, TFLOP/s, MFU, peak memory.

  python -m benchmarks.train_step --gin experiments/configs/bench_cpu.gin \
         [--gin_param K=V ...] [--steps 5] [--repeats 3] [--profile DIR]
         [--compare-torch /path/to/CT-CLIP]

Builds the train state and the jitted step `experiments.pretrain` would build for the
gin config (model, optimizer, `train.global_batch_size`, `train.max_text_length`,
`train.compute_dtype`, `train.mesh_shape`, loss and remat settings) on whatever devices
exist, runs it on one random batch and prints a table; the LAST line is one JSON
object with `compile_s`, `step_s`, `volumes_per_s`, `tflops_per_device`, `mfu`,
`peak_memory_bytes` (and a few more).

The volume depth is the config's cube (`image_size / patch_size` patches deep, i.e.
48 slices for bench_cpu.gin and 240 for ct_clip_v2.gin) unless `--depth` says otherwise.
FLOPs are the analytical model FLOPs of `ct_rate_jax.flops` (3x forward; remat not
counted).  MFU divides by the device's peak (`ct_rate_jax.hardware`: a table for TPUs
and GPUs, a float32 matmul measured at start-up on CPU).

`--compare-torch PATH` also builds the official PyTorch model at the same size from a
checkout of the official repository (`benchmarks/torch_original_step.py`) and times
both in the same process, interleaved: `--repeats` rounds, each `--steps` steps of ours
then `--steps` of the original; the figures are the medians of the per-round means.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import time
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the benchmark takes from the gin config."""

    model: Any  # CTCLIPConfig
    batch_size: int
    depth: int
    text_length: int
    compute_dtype: str
    mesh_shape: tuple[int, int, int]
    optimizer: Any
    loss: str
    remat_policy: str | None


def load_settings(gin_files, gin_params, depth: int | None = None,
                  batch_size: int | None = None) -> Settings:
    """Parses the gin files and bindings as `experiments.pretrain` does."""
    import gin

    import experiments.pretrain  # noqa: F401  (registers `train`)
    from experiments import gin_setup

    # Gin logs a harmless "Path not found" through the root logger before it finds an
    # `include`d file on its search path; absl (which pretrain sets up) is not set up here.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)
    try:
        gin_setup.parse_gin(gin_files, gin_params)
    finally:
        root.setLevel(level)

    def bound(name, default=None):
        try:
            value = gin.query_parameter(f"train.{name}")
        except ValueError:
            return default
        if isinstance(value, gin.config.ConfigurableReference):
            return value.scoped_configurable_fn() if value.evaluate else \
                value.scoped_configurable_fn
        return value

    model = bound("model")
    cfg = model.ctvit
    return Settings(
        model=model,
        batch_size=batch_size or bound("global_batch_size", 8),
        depth=depth or cfg.image_size // cfg.patch_size * cfg.temporal_patch_size,
        text_length=bound("max_text_length", 512),
        compute_dtype=bound("compute_dtype", "float32"),
        mesh_shape=tuple(bound("mesh_shape", (-1, 1, 1))),
        optimizer=bound("optimizer"),
        loss=bound("loss", "softmax"),
        remat_policy=bound("remat_policy", None))


def _random_batch(settings: Settings, seed: int = 0) -> dict[str, np.ndarray]:
    cfg = settings.model.ctvit
    rng = np.random.default_rng(seed)
    b, s = settings.batch_size, settings.text_length
    return {
        "volume": rng.uniform(-1, 1, (b, settings.depth, cfg.image_size, cfg.image_size)
                              ).astype(np.float32),
        "input_ids": rng.integers(1, settings.model.text.vocab_size, (b, s)).astype(np.int32),
        "attention_mask": np.ones((b, s), np.int32),
    }


class OurStep:
    """The jitted train step of `experiments.pretrain`, compiled ahead of time."""

    def __init__(self, settings: Settings, steps_hint: int = 1000, init_on_host: bool = False,
                 reuse_state_of: "OurStep | None" = None):
        """init_on_host: initialise the parameters with the CPU backend and copy them over
        (XLA's GPU compile of the v2 initialiser alone takes ~3 minutes).
        reuse_state_of: take another step's train state (a variant that differs only in
        how the model computes, not in its parameters), so that nothing is re-initialised.
        """
        import jax
        import jax.numpy as jnp

        from ct_rate_jax import sharding
        from ct_rate_jax.models.ct_clip import CTCLIP
        from ct_rate_jax.training import train_state

        dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[settings.compute_dtype]
        model = dataclasses.replace(settings.model)
        factory = lambda rngs: CTCLIP(  # noqa: E731
            model, rngs=rngs, dtype=dtype, remat_policy=settings.remat_policy)
        tx, schedule = settings.optimizer(total_steps=steps_hint)
        self.mesh = sharding.make_mesh(*settings.mesh_shape)
        if reuse_state_of is not None:
            graphdef, _ = train_state.TrainState.abstract(factory, tx)
            old = reuse_state_of.state
            self.state = train_state.TrainState(graphdef, old.state, old.shardings, self.mesh)
        elif init_on_host:
            host_mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices("cpu")[:1])
            host = train_state.TrainState.create(factory, tx, host_mesh)
            shardings = sharding.state_shardings(host.state, self.mesh)
            self.state = train_state.TrainState(
                host.graphdef, jax.device_put(host.state, shardings), shardings, self.mesh)
        else:
            self.state = train_state.TrainState.create(factory, tx, self.mesh)
        self.parameters = train_state.parameter_count(self.state)
        step_fn = train_state.make_train_step(self.state, schedule, loss=settings.loss)
        self.batch = sharding.host_batch_to_global(_random_batch(settings), self.mesh)
        start = time.perf_counter()
        self.compiled = step_fn.lower(self.state.state, self.batch).compile()
        self.compile_s = time.perf_counter() - start
        cost = self.compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        self.xla_flops = float((cost or {}).get("flops", float("nan")))
        self._metrics = None
        self._jax = jax

    def run(self, steps: int) -> float:
        """Runs `steps` steps (dispatched back to back) and returns the mean seconds."""
        start = time.perf_counter()
        for _ in range(steps):
            self.state.state, self._metrics = self.compiled(self.state.state, self.batch)
        self._jax.block_until_ready(self._metrics)
        return (time.perf_counter() - start) / steps

    def loss(self) -> float:
        return float(self._jax.device_get(self._metrics["loss"]))


def _variant_settings(settings: Settings, spec: str) -> Settings:
    """"FIELD=VALUE[,FIELD=VALUE...]" -> the settings with those CTViTConfig fields changed."""
    import ast

    changes = {}
    for item in spec.split(","):
        field, sep, text = item.partition("=")
        if not sep or field not in {f.name for f in dataclasses.fields(settings.model.ctvit)}:
            raise SystemExit(f"--ctvit {spec!r}: expected FIELD=VALUE[,FIELD=VALUE...] with "
                             "CTViTConfig fields")
        try:
            changes[field] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            changes[field] = text  # a bare string such as conv
    ctvit = dataclasses.replace(settings.model.ctvit, **changes)
    return dataclasses.replace(settings, model=dataclasses.replace(settings.model, ctvit=ctvit))


def _profile(step: OurStep, logdir: str, top: int) -> str:
    """Traces two steps into logdir, writes logdir/ops.md and returns the top rows."""
    from benchmarks import profile_summary

    ops = profile_summary.trace_ops(step.run, step.compiled.as_text(), logdir)
    grouped = profile_summary.by_source(ops)
    with open(os.path.join(logdir, "ops.md"), "w") as f:
        f.write("## By JAX op and source line\n\n"
                + profile_summary.format_table(grouped, top=200, width=400)
                + "\n\n## By HLO op\n\n"
                + profile_summary.format_table(ops, top=200, width=400) + "\n")
    return profile_summary.format_table(grouped, top=top)


def _fmt_bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gin", action="append", default=[], required=True)
    parser.add_argument("--gin_param", action="append", default=[])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (median reported)")
    parser.add_argument("--depth", type=int, default=None, help="slices per volume")
    parser.add_argument("--batch", type=int, default=None,
                        help="global batch (default: train.global_batch_size)")
    parser.add_argument("--ctvit", action="append", default=[], metavar="FIELD=VALUE",
                        help="also time a variant with these CTViTConfig fields changed, "
                             "e.g. peg_impl=conv or peg_impl=conv,attention_impl=cudnn "
                             "(repeatable; each is a separate variant on the same parameters)")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="after timing, trace 2 steps into DIR and print the ops that "
                             "take the device time (also written to DIR/ops.md)")
    parser.add_argument("--compare-torch", dest="compare_torch", default=None,
                        help="checkout of the official CT-CLIP: time its step too")
    args = parser.parse_args(argv)

    import jax

    from ct_rate_jax import flops, hardware

    settings = load_settings(args.gin, args.gin_param, args.depth, args.batch)
    n_devices = jax.device_count()
    peak, peak_source = hardware.peak_flops_per_device(settings.compute_dtype)
    model_flops = flops.clip_step_flops(settings.model, settings.batch_size, settings.depth,
                                        settings.text_length).train_step

    ours = OurStep(settings, init_on_host=jax.default_backend() == "gpu")
    ours.run(1)  # first execution (allocations, thread pools) is not timed
    official = None
    if args.compare_torch:
        from benchmarks.torch_original_step import OfficialStep

        official = OfficialStep(args.compare_torch, settings.model, settings.batch_size,
                                settings.depth, settings.text_length)
        official.step()
    our_times, torch_times = [], []
    for _ in range(args.repeats):
        our_times.append(ours.run(args.steps))
        if official is not None:
            start = time.perf_counter()
            for _ in range(args.steps):
                official.step()
            torch_times.append((time.perf_counter() - start) / args.steps)
    step_s = float(np.median(our_times))
    tflops = model_flops / step_s / n_devices / 1e12
    result = {
        "compile_s": round(ours.compile_s, 3),
        "step_s": round(step_s, 4),
        "volumes_per_s": round(settings.batch_size / step_s, 3),
        "tflops_per_device": round(tflops, 4),
        "mfu": round(tflops * 1e12 / peak, 4) if peak else None,
        "peak_memory_bytes": hardware.peak_memory_bytes(),
        "model_gflop_per_step": round(model_flops / 1e9, 2),
        "xla_gflop_per_step": round(ours.xla_flops / 1e9, 2),
        "peak_tflops_per_device": round(peak / 1e12, 4) if peak else None,
        "devices": f"{n_devices} x {jax.devices()[0].device_kind}",
        "step_s_rounds": [round(t, 4) for t in our_times],
    }

    cfg = settings.model.ctvit
    print(f"\n{args.gin[-1]}: batch {settings.batch_size} of {settings.depth} x "
          f"{cfg.image_size} x {cfg.image_size}, {settings.text_length} tokens, "
          f"{settings.compute_dtype}, remat {settings.remat_policy}, "
          f"{ours.parameters:,} parameters; {result['devices']} on {platform.node()}, "
          f"peak {peak and peak / 1e12:.3f} TFLOP/s per device ({peak_source}); "
          f"median of {args.repeats} rounds of {args.steps} steps")
    rows = [("ours (JAX)", step_s, model_flops, ours.compile_s, ours.loss())]
    if official is not None:
        torch_s = float(np.median(torch_times))
        torch_flops = official.count_flops()
        rows.append(("official (PyTorch)", torch_s, model_flops, None, None))
        result.update(torch_step_s=round(torch_s, 4),
                      torch_volumes_per_s=round(settings.batch_size / torch_s, 3),
                      torch_flopcounter_gflop=round(torch_flops / 1e9, 2),
                      torch_step_s_rounds=[round(t, 4) for t in torch_times],
                      speedup_vs_torch=round(torch_s / step_s, 3))
    print("| implementation | compile s | step s | volumes/s | TFLOP/s/device | MFU |")
    print("|---|---|---|---|---|---|")
    for name, seconds, f, compile_s, _ in rows:
        tf = f / seconds / n_devices / 1e12
        print(f"| {name} | {'-' if compile_s is None else f'{compile_s:.1f}'} | "
              f"{seconds:.3f} | {settings.batch_size / seconds:.2f} | {tf:.4f} | "
              f"{'n/a' if not peak else f'{100 * tf * 1e12 / peak:.1f}%'} |")
    print(f"model FLOPs/step {model_flops / 1e9:.2f} G (analytical, also used for the "
          f"original), XLA cost_analysis {ours.xla_flops / 1e9:.2f} G; peak memory "
          f"{_fmt_bytes(result['peak_memory_bytes'])}")
    if args.profile:
        print(f"\nDevice time by JAX op and source line ({args.profile}/ops.md has more):\n"
              + _profile(ours, args.profile, top=30))

    # Variants run after the base (and reuse its parameters), so a variant that fails
    # to compile (e.g. cuDNN attention on an unsupported shape) cannot lose its figures.
    previous, variants = ours, {}
    for spec in args.ctvit:
        print(f"\nvariant {spec}:", flush=True)
        try:
            variant = OurStep(_variant_settings(settings, spec), reuse_state_of=previous)
            variant.run(1)
            seconds = float(np.median([variant.run(args.steps) for _ in range(args.repeats)]))
        except Exception as error:  # noqa: BLE001 (report and go on to the next variant)
            print(f"variant {spec} failed: {type(error).__name__}: {str(error)[:500]}")
            continue
        previous = variant
        tf = model_flops / seconds / n_devices / 1e12
        variants[spec] = {"compile_s": round(variant.compile_s, 3), "step_s": round(seconds, 4),
                          "volumes_per_s": round(settings.batch_size / seconds, 3),
                          "tflops_per_device": round(tf, 4),
                          "mfu": round(tf * 1e12 / peak, 4) if peak else None,
                          "loss": variant.loss()}
        print(f"| {spec} | {variant.compile_s:.1f} | {seconds:.3f} | "
              f"{settings.batch_size / seconds:.2f} | {tf:.4f} | "
              f"{'n/a' if not peak else f'{100 * tf * 1e12 / peak:.1f}%'} |", flush=True)
        if args.profile:
            logdir = os.path.join(args.profile, spec.replace("=", "_").replace(",", "-"))
            print(f"device time ({logdir}/ops.md):\n" + _profile(variant, logdir, top=15))
    if variants:
        result["variants"] = variants
        # The device's peak so far, variants included (peak_memory_bytes is the base's).
        result["peak_memory_bytes_with_variants"] = hardware.peak_memory_bytes()
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
