r"""Preparation speed and memory on full-size CT volumes.

  python -m benchmarks.prepare [--volumes 4] [--shape 512,512,300] [--workers 1,2]
                               [--workdir DIR] [--keep]

Writes --volumes synthetic chest phantoms (int16 .nii.gz, nibabel array shape
H x W x D = 512 x 512 x 300, 0.7 mm in-plane, 1.0 mm slices, HU scaling in the
header) and measures, for the default target (240 x 480 x 480 at 1.5 x 0.75 x 0.75 mm):

  per worker   seconds per volume and peak RSS of a worker process doing exactly what
               preparation's workers do (`user_scans.encode_user_scan`: read, HU,
               resample, clip, round, crop / pad, encode), against the goal of at most
               3 x the float32 size of one input volume; also the RSS of the same
               worker before its first volume (interpreter and imports);
  end to end   `prepare.prepare_scans` with 1..N worker processes: volumes/s.

Prints markdown tables for docs/performance.md.  A measurement, not a test.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import platform
import resource
import shutil
import tempfile
import time

import numpy as np

SOURCE_SPACING_ZYX = (1.0, 0.7, 0.7)


def write_phantom_nifti(path: str, shape_hwd, spacing_zyx=SOURCE_SPACING_ZYX,
                        seed: int = 0) -> None:
    """A chest-like int16 phantom (air, body, two lungs, noise) written by nibabel.

    Stored values are HU + 1024 with scl_slope 1, scl_inter -1024 in the header.
    """
    import nibabel as nib

    height, width, depth = shape_hwd
    rng = np.random.default_rng(seed)
    y, x = np.ogrid[-1:1:height * 1j, -1:1:width * 1j]
    body = (y / 0.75) ** 2 + (x / 0.9) ** 2 < 1
    lungs = ((y / 0.5) ** 2 + ((np.abs(x) - 0.42) / 0.3) ** 2) < 1
    slice_hu = np.where(body, 40, -1000).astype(np.int16)
    slice_hu[lungs & body] = -850
    stored = np.empty((height, width, depth), np.int16)
    for k in range(depth):
        noise = rng.integers(-30, 31, size=(height, width), dtype=np.int16)
        stored[:, :, k] = slice_hu + noise + 1024
    z, row, column = spacing_zyx
    image = nib.Nifti1Image(stored, np.diag([row, column, z, 1.0]))
    image.header.set_slope_inter(1.0, -1024.0)
    nib.save(image, path)


def _encode_and_measure(scan, config) -> tuple[int, float, int, int]:
    """Runs in a worker: (record bytes, seconds, RSS before, peak RSS) in bytes."""
    from data_pipeline.user_scans import encode_user_scan

    before = _current_rss()
    start = time.perf_counter()
    size = len(encode_user_scan(scan, config))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return size, seconds, before, peak


def _current_rss() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _warm_up_imports() -> int:
    import nibabel  # noqa: F401

    from data_pipeline import user_scans  # noqa: F401

    return _current_rss()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--volumes", type=int, default=4)
    parser.add_argument("--shape", default="512,512,300", help="H,W,D of the inputs")
    parser.add_argument("--workers", default="1,2", help="worker counts, e.g. 1,2,4")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    from data_pipeline.prepare import prepare_scans
    from data_pipeline.preprocess import PreprocessConfig
    from data_pipeline.user_scans import find_user_scans

    shape = tuple(int(v) for v in args.shape.split(","))
    worker_counts = [int(v) for v in args.workers.split(",")]
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_prepare_")
    scans_dir = os.path.join(workdir, "scans")
    os.makedirs(scans_dir, exist_ok=True)
    config = PreprocessConfig()
    try:
        start = time.perf_counter()
        for index in range(args.volumes):
            path = os.path.join(scans_dir, f"phantom_{index:03d}.nii.gz")
            if not os.path.exists(path):
                write_phantom_nifti(path, shape, seed=index)
        print(f"wrote {args.volumes} inputs in {time.perf_counter() - start:.1f} s")
        scans = find_user_scans(scans_dir)
        float32_bytes = 4 * int(np.prod(shape))
        input_mb = sum(os.path.getsize(s.path) for s in scans) / len(scans) / 1e6

        # Per worker: one process, the volumes one after another.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
            baseline = pool.submit(_warm_up_imports).result()
            measured = [pool.submit(_encode_and_measure, scan, config).result()
                        for scan in scans]
        seconds = [m[1] for m in measured]
        peak = max(m[3] for m in measured)
        print()
        print(f"inputs: {args.volumes} x {shape[0]} x {shape[1]} x {shape[2]} int16 "
              f"(.nii.gz, {input_mb:.0f} MB each; float32 copy {float32_bytes / 2**20:.0f} MiB)"
              f" -> {config.target_shape} at {config.target_spacing_mm} mm")
        print()
        print("| measure | value |")
        print("|---|---|")
        print(f"| seconds per volume, one worker | {np.mean(seconds):.2f} "
              f"(min {min(seconds):.2f}, max {max(seconds):.2f}) |")
        print(f"| worker RSS after imports, before the first volume | "
              f"{baseline / 2**20:.0f} MiB |")
        print(f"| worker peak RSS | {peak / 2**20:.0f} MiB = "
              f"{peak / float32_bytes:.2f} x the float32 input "
              f"({(peak - baseline) / float32_bytes:.2f} x above the imports) |")

        print()
        print("| workers | volumes | seconds | volumes/s | volumes/s per worker |")
        print("|---|---|---|---|---|")
        for workers in worker_counts:
            out = os.path.join(workdir, f"shards_{workers}")
            start = time.perf_counter()
            manifest = prepare_scans(scans_dir, out, config, workers=workers,
                                     overwrite=True, progress=False)
            elapsed = time.perf_counter() - start
            assert manifest.num_records == args.volumes, manifest.failed
            rate = args.volumes / elapsed
            print(f"| {workers} | {args.volumes} | {elapsed:.1f} | {rate:.3f} | "
                  f"{rate / workers:.3f} |")
        print()
        print(f"machine: {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs; python {platform.python_version()}")
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
