r"""Input pipeline throughput: raw shard reads, the Grain pipeline, and the original's way.

  python -m benchmarks.input_pipeline [--volumes 16] [--shape 256,256,120]
      [--target-shape 120,240,240] [--workers 0,1,2] [--batch-size 2] [--epochs 2]
      [--workdir DIR] [--keep]

On the same data in one run:

  raw read   every shard file read sequentially in 4 MiB blocks (the disk / page-cache
             limit; the files were just written, so they are likely cached);
  grain      `input_pipeline.make_train_dataset` (shuffle, decode, normalise to
             float32, tokenise, batch) with 0..N Grain worker processes: volumes/s and
             MB/s of shard file bytes consumed;
  original   what the PyTorch original does per sample in `__getitem__`
             (CT-CLIP `scripts/data.py`, `nii_img_to_tensor`): nibabel `get_fdata`
             (float64), HU, transpose, `torch.nn.functional.interpolate` (trilinear)
             to the target spacing, clip, / 1000, crop / pad; one process.

Inputs are the phantoms of `benchmarks.prepare` (0.7 mm in-plane, 1.0 mm slices),
prepared to `--target-shape` at 1.5 x 0.75 x 0.75 mm.  Prints a markdown table for
docs/performance.md.  A measurement, not a test.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time

import numpy as np

from benchmarks.prepare import SOURCE_SPACING_ZYX, write_phantom_nifti


def raw_read_seconds(paths) -> float:
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while handle.read(1 << 22):
                pass
    return time.perf_counter() - start


def original_per_sample(path: str, config) -> np.ndarray:
    """The official per-sample preprocessing, float64 as there (torch if installed)."""
    import nibabel as nib

    from data_pipeline.preprocess import center_crop_or_pad, resampled_shape

    data = nib.load(path).get_fdata()  # float64, header scaling applied (HU)
    data = np.transpose(data, (2, 0, 1))
    new_shape = resampled_shape(data.shape, SOURCE_SPACING_ZYX, config.target_spacing_mm)
    try:
        import torch
        import torch.nn.functional as F

        tensor = torch.tensor(data).unsqueeze(0).unsqueeze(0)
        data = F.interpolate(tensor, size=new_shape, mode="trilinear",
                             align_corners=False)[0, 0].numpy()
    except ImportError:  # same interpolation in numpy
        from data_pipeline.preprocess import resample_trilinear

        data = resample_trilinear(data, SOURCE_SPACING_ZYX, config.target_spacing_mm)
    data = np.clip(data, -1000, 1000) / 1000.0
    return center_crop_or_pad(data, config.target_shape, pad_value=-1.0).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--volumes", type=int, default=16)
    parser.add_argument("--shape", default="256,256,120", help="H,W,D of the inputs")
    parser.add_argument("--target-shape", default="120,240,240", help="D,H,W of the records")
    parser.add_argument("--workers", default="0,1,2", help="Grain worker processes to try")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--baseline-volumes", type=int, default=4)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    from absl import flags

    from data_pipeline import input_pipeline
    from data_pipeline.manifest import Manifest
    from data_pipeline.prepare import prepare_scans
    from data_pipeline.preprocess import PreprocessConfig
    from data_pipeline.tokenizer import train_wordpiece_tokenizer

    flags.FLAGS.mark_as_parsed()  # Grain's worker processes read absl flags
    shape = tuple(int(v) for v in args.shape.split(","))
    config = PreprocessConfig(target_shape=tuple(int(v) for v in args.target_shape.split(",")))
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_input_")
    scans_dir, shard_dir = os.path.join(workdir, "scans"), os.path.join(workdir, "shards")
    os.makedirs(scans_dir, exist_ok=True)
    try:
        for index in range(args.volumes):
            path = os.path.join(scans_dir, f"phantom_{index:03d}.nii.gz")
            if not os.path.exists(path):
                write_phantom_nifti(path, shape, seed=index)
        manifest = prepare_scans(scans_dir, shard_dir, config, records_per_shard=4,
                                 progress=False)
        manifest = Manifest.load(shard_dir)
        tokenizer = os.path.join(workdir, "tokenizer.json")
        train_wordpiece_tokenizer(["no acute findings. lung nodule is present."] * 20, 64,
                                  tokenizer)
        file_bytes = sum(shard.bytes for shard in manifest.shards)
        bytes_per_volume = file_bytes / manifest.num_records
        voxel_mb = 2 * int(np.prod(config.target_shape)) / 1e6

        rows = []
        seconds = raw_read_seconds(manifest.shard_paths())
        rows.append(("raw sequential read of the shard files", manifest.num_records / seconds,
                     file_bytes / seconds / 1e6))

        steps = args.epochs * (manifest.num_records // args.batch_size)
        for workers in [int(v) for v in args.workers.split(",")]:
            pipeline = input_pipeline.PipelineConfig(
                shard_dir=shard_dir, tokenizer_path=tokenizer,
                global_batch_size=args.batch_size, max_text_length=32, num_workers=workers)
            iterator = iter(input_pipeline.make_train_dataset(pipeline))
            next(iterator)  # start-up (worker processes) is not throughput
            start = time.perf_counter()
            for _ in range(steps):
                batch = next(iterator)
            seconds = time.perf_counter() - start
            assert batch["volume"].shape == (args.batch_size, *config.target_shape)
            volumes = steps * args.batch_size
            rows.append((f"grain pipeline, {workers} worker processes", volumes / seconds,
                         volumes * bytes_per_volume / seconds / 1e6))
            del iterator

        paths = sorted(os.path.join(scans_dir, n) for n in os.listdir(scans_dir))
        paths = paths[:args.baseline_volumes]
        start = time.perf_counter()
        for path in paths:
            original_per_sample(path, config)
        seconds = time.perf_counter() - start
        rows.append(("original: load NIfTI, resample, normalise per sample (1 process)",
                     len(paths) / seconds, len(paths) * bytes_per_volume / seconds / 1e6))

        print(f"{manifest.num_records} records of {config.target_shape} int16 "
              f"({voxel_mb:.1f} MB of voxels, {bytes_per_volume / 1e6:.1f} MB in the files) "
              f"from {shape} inputs; batch {args.batch_size}, {steps} steps per measurement")
        print()
        print("| path | volumes/s | MB/s of shard file |")
        print("|---|---|---|")
        for name, rate, mb in rows:
            print(f"| {name} | {rate:.2f} | {mb:.1f} |")
        print()
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; "
              f"python {platform.python_version()}")
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
