r"""Converting a full-size v2 CT-CLIP checkpoint: wall time and peak memory.

  python -m benchmarks.convert_official [--workdir DIR] [--keep]

Writes a random state dict with the released v2 files' keys and shapes (about 440 M
values with the unused ones; 1.76 GB of float32, "one copy" below) with torch.save,
then runs, each in a fresh process so that its peak RSS is its own:

  convert   python -m experiments.convert_official --checkpoint FILE --out DIR
  export    python -m experiments.convert_official --to-torch --from DIR --out BACK
  imports   python -c "import experiments.convert_official; import torch"  (the floor)

and checks that BACK's used tensors equal FILE's bitwise.  Prints a markdown table for
docs/performance.md.  A timing is a measurement, not a test; needs ~8 GB of disk.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_random_checkpoint(path: str) -> None:
    """A v2-shaped official state dict with random values (in this process)."""
    import jax
    import numpy as np
    from flax import nnx

    from ct_rate_jax import checkpoint_io, convert

    config = convert.official_config(convert.RELEASED_V2)
    model = checkpoint_io.abstract_ctclip(config)
    rng = np.random.default_rng(0)
    weights = nnx.state(model, checkpoint_io.WEIGHTS)
    random = jax.tree.map(lambda x: rng.standard_normal(x.shape, np.float32) * 0.02,
                          nnx.to_pure_dict(weights))
    nnx.replace_by_pure_dict(weights, random)
    nnx.update(model, weights)
    # As the released files: the unused entries and BERT's position_ids included.
    state = convert.official_state_dict(model, position_ids=True)
    for key, value in state.items():
        if value.dtype == np.float32 and value.size > 1:
            state[key] = rng.standard_normal(value.shape, np.float32) * 0.02
    convert.write_torch_checkpoint(state, path)


def check_round_trip(source: str, back: str, conversion_json: str) -> None:
    """Raises unless every tensor the model uses came back bitwise (mmap: little memory)."""
    import torch

    with open(conversion_json, encoding="utf-8") as f:
        ignored = set(json.load(f)["ignored_keys"])
    a = torch.load(source, weights_only=True, mmap=True)
    b = torch.load(back, weights_only=True, mmap=True)
    if set(a) - {"text_transformer.embeddings.position_ids"} != set(b):
        raise SystemExit(f"key sets differ: {sorted(set(a) ^ set(b))[:10]}")
    differ = [k for k in a if k not in ignored and not torch.equal(a[k], b[k])]
    if differ:
        raise SystemExit(f"round trip changed {len(differ)} tensors, e.g. {differ[:5]}")


def measure(args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of a child process."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, *args], cwd=REPO)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{' '.join(args)} failed with status {status}")
    return wall, usage.ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="where the files go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the files")
    parser.add_argument("--make", help=argparse.SUPPRESS)  # child: write the random file
    parser.add_argument("--check", nargs=3, help=argparse.SUPPRESS)  # child: round trip
    args = parser.parse_args()
    if args.make:
        return make_random_checkpoint(args.make)
    if args.check:
        return check_round_trip(*args.check)

    workdir = args.workdir or tempfile.mkdtemp(prefix="convert_official_bench_")
    os.makedirs(workdir, exist_ok=True)
    source = os.path.join(workdir, "ct_clip_v2_random.pt")
    converted = os.path.join(workdir, "converted")
    back = os.path.join(workdir, "back.pt")
    try:
        if not os.path.exists(source):
            print(f"writing a random v2-shaped checkpoint to {source} ...", flush=True)
            make_wall, _ = measure(["-m", "benchmarks.convert_official", "--make", source])
            print(f"  {make_wall:.0f} s", flush=True)
        shutil.rmtree(converted, ignore_errors=True)
        rows = {
            "imports": measure(["-c", "import experiments.convert_official; import torch"]),
            "convert": measure(["-m", "experiments.convert_official", "--checkpoint", source,
                                "--out", converted]),
            "export": measure(["-m", "experiments.convert_official", "--to-torch", "--from",
                               converted, "--out", back]),
        }
        measure(["-m", "benchmarks.convert_official", "--check", source, back,
                 os.path.join(converted, "conversion.json")])
        with open(os.path.join(converted, "conversion.json"), encoding="utf-8") as f:
            record = json.load(f)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    copy_gb = record["source_bytes"] / 1e9
    print(f"\nsource: {copy_gb:.2f} GB ({record['source_bytes'] // 4 / 1e6:.0f} M float32), "
          f"model: {record['parameter_count'] / 1e6:.0f} M parameters; round trip bitwise: yes")
    print(f"machine: {os.cpu_count()} CPU cores, {platform.machine()}, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB\n")
    print("| step | wall time | peak RSS | peak RSS / one copy |")
    print("|---|---|---|---|")
    for name, (wall, rss) in rows.items():
        print(f"| {name} | {wall:.1f} s | {rss:.2f} GB | {rss / copy_gb:.2f} |")


if __name__ == "__main__":
    main()
