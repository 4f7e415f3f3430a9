"""Writes a complete synthetic CT-RATE release (volumes, metadata, reports, labels).

Every random choice is keyed by (seed, patient, scan, reconstruction) through
`np.random.SeedSequence`, so the output does not depend on the number of workers or
the order in which they finish.  Workers only rasterise and save volumes; every CSV
row is built in the main process.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import gzip
import io
import json
import multiprocessing
import os
import pathlib
import shutil
import sys
import time

import nibabel as nib
import numpy as np

from data_pipeline.schema import (
    ABNORMALITIES, METADATA_COLUMNS, REPORT_COLUMNS, SPLIT_FILES, VolumeId)
from data_pipeline.synthetic.abnormalities import draw_findings
from data_pipeline.synthetic.anatomy import draw_anatomy
from data_pipeline.synthetic.canvas import Grid
from data_pipeline.synthetic.conspicuity import (
    DEMO_CONSPICUITY, REALISTIC, check_conspicuity)
from data_pipeline.synthetic.labels import AGE_RANGE, draw_labels
from data_pipeline.synthetic.metadata import (
    NOMINAL_SLICE_THICKNESS_MM, draw_protocol, draw_study_date, metadata_row)
from data_pipeline.synthetic.render import ScanPlan, add_noise_and_clip, rasterize
from data_pipeline.synthetic.reports import write_report

RELEASE_SUBDIRS = ("train", "valid", "metadata", "radiology_text_reports",
                   "multi_abnormality_labels")
MARKER_FILE = ".synthetic_ct_rate.json"  # next to dataset/, marks a directory we may rewrite
GZIP_LEVEL = 1  # level 6 is ~5x slower for ~2% smaller files (measured)
P_SECOND_SCAN = 0.2
P_SECOND_RECONSTRUCTION = 0.5
MIN_SLICES = 8


@dataclasses.dataclass(frozen=True)
class ReleaseSummary:
    """What `generate_release` wrote."""

    root: pathlib.Path  # OUT/dataset
    num_train: int  # volumes (reconstructions) per split
    num_valid: int
    volume_names: dict[str, list[str]]
    num_patients: dict[str, int]
    num_scans: dict[str, int]
    seconds: float = 0.0
    conspicuity: float = REALISTIC  # 1.0 = realistic findings, larger = exaggerated

    def describe(self) -> str:
        return (f"wrote {self.num_train + self.num_valid} volumes ({self.num_train} train / "
                f"{self.num_valid} valid; {sum(self.num_scans.values())} scans of "
                f"{sum(self.num_patients.values())} patients, conspicuity "
                f"{self.conspicuity:g}) to {self.root} in {self.seconds:.1f} s")


@dataclasses.dataclass
class _VolumeTask:
    """Everything a worker needs to write one .nii.gz."""

    path: str
    plan: ScanPlan
    labels: np.ndarray
    grid: Grid
    noise_sigma: float
    noise_seed: int
    rescale_intercept: float
    rescale_slope: float


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _layout(num_volumes: int, seed: int, valid_fraction: float) -> list[tuple[str, list[int]]]:
    """Per patient (in order): its split and the number of reconstructions of each scan,
    exactly `num_volumes` reconstructions in total."""
    rng = _rng(seed, 0)
    patients, total = [], 0
    while total < num_volumes:
        scans = []
        for _ in range(2 if rng.random() < P_SECOND_SCAN else 1):
            count = min(2 if rng.random() < P_SECOND_RECONSTRUCTION else 1, num_volumes - total)
            if count:
                scans.append(count)
                total += count
        patients.append(scans)
    num_valid = int(round(valid_fraction * len(patients)))
    if valid_fraction > 0 and len(patients) >= 2:
        num_valid = min(max(num_valid, 1), len(patients) - 1)
    valid = set(rng.choice(len(patients), size=num_valid, replace=False).tolist())
    return [("valid" if i in valid else "train", scans) for i, scans in enumerate(patients)]


def to_stored(hu: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """int16 stored values such that HU = stored * slope + intercept."""
    return np.rint((hu - np.float32(intercept)) / np.float32(slope)).astype(np.int16)


def save_nifti(path: str | os.PathLike, stored: np.ndarray, spacing_mm) -> None:
    """Writes int16 (H, W, D) data with a diagonal affine of `spacing_mm` and no scaling
    in the header (scl_slope NaN), gzip-compressed with a fixed timestamp so that the
    bytes are reproducible."""
    affine = np.diag([*map(float, spacing_mm), 1.0])
    image = nib.Nifti1Image(stored, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=GZIP_LEVEL,
                       mtime=0) as zipped:
        zipped.write(image.to_bytes())
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as handle:
        handle.write(buffer.getvalue())
    os.replace(tmp, path)


def _write_volume(task: _VolumeTask) -> None:
    canvas = rasterize(task.plan, task.labels, task.grid)
    hu = add_noise_and_clip(canvas.hu, np.random.default_rng(task.noise_seed), task.noise_sigma)
    stored = to_stored(hu, task.rescale_slope, task.rescale_intercept)
    save_nifti(task.path, stored, task.grid.spacing_mm)


def _prepare_output(out_dir: pathlib.Path, settings: dict) -> pathlib.Path:
    """Creates OUT/dataset; clears an earlier synthetic release there, but refuses to
    touch a non-empty dataset/ that this generator did not write."""
    root = out_dir / "dataset"
    marker = out_dir / MARKER_FILE
    if root.exists() and any(root.iterdir()):
        if not marker.exists():
            raise FileExistsError(f"{root} exists and was not written by the synthetic "
                                  f"generator (no {marker}); refusing to overwrite it")
        for name in RELEASE_SUBDIRS:
            shutil.rmtree(root / name, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")
    return root


def _write_csv(path: pathlib.Path, columns, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


@dataclasses.dataclass
class _Split:
    tasks: list[_VolumeTask] = dataclasses.field(default_factory=list)
    metadata: list[dict] = dataclasses.field(default_factory=list)
    reports: list[dict] = dataclasses.field(default_factory=list)
    labels: list[dict] = dataclasses.field(default_factory=list)
    patients: int = 0
    scans: int = 0


def _plan_patient(split: _Split, root: pathlib.Path, ids: tuple[str, int], key: int,
                  scans: list[int], options: dict) -> None:
    """Draws one patient's scans and reconstructions into `split` (tasks and CSV rows)."""
    seed = options["seed"]
    patient_rng = _rng(seed, 1, key)
    anatomy = draw_anatomy(patient_rng)
    sex = "M" if patient_rng.random() < 0.55 else "F"
    age = float(patient_rng.uniform(*AGE_RANGE))
    labels, study_date = None, None
    for scan_index, recon_count in enumerate(scans):
        scan_rng = _rng(seed, 2, key, scan_index)
        study_date = draw_study_date(scan_rng, study_date)
        scan_age = age + (0 if scan_index == 0 else 1)
        labels = draw_labels(scan_rng, scan_age, options["min_prevalence"], labels)
        plan = ScanPlan(anatomy, draw_findings(scan_rng, anatomy, options["conspicuity"]))
        protocol = draw_protocol(scan_rng, sex, scan_age, study_date)
        length_mm = scan_rng.uniform(*options["length_mm_range"])
        thickness = NOMINAL_SLICE_THICKNESS_MM[
            int(scan_rng.integers(len(NOMINAL_SLICE_THICKNESS_MM)))]
        table_z = -float(scan_rng.uniform(100, 400))
        details = {name: plan.details(name) for name in ABNORMALITIES}
        report = write_report(labels, _rng(seed, 4, key, scan_index), details,
                              slice_thickness=thickness)
        split.scans += 1
        for recon in range(1, recon_count + 1):
            recon_rng = _rng(seed, 3, key, scan_index, recon)
            matrix = options["matrix"]
            lo, hi = options["xy_spacing_range"]
            xy = round(float(recon_rng.uniform(matrix * lo, matrix * hi))) / matrix
            z = round(float(recon_rng.uniform(*options["z_spacing_range"])), 3)
            grid = Grid((matrix, matrix, max(MIN_SLICES, int(round(length_mm / z)))), (xy, xy, z))
            sharp = recon == 2  # the second reconstruction uses a sharp (lung) kernel
            volume_id = VolumeId(ids[0], ids[1], "abcdefghijklmnopqrstuvwxyz"[scan_index], recon)
            path = root / volume_id.relative_path(SPLIT_FILES[ids[0]]["volumes"])
            split.tasks.append(_VolumeTask(
                str(path), plan, labels, grid,
                noise_sigma=recon_rng.uniform(16, 20) if sharp else recon_rng.uniform(10, 14),
                noise_seed=int(recon_rng.integers(2 ** 63)),
                rescale_intercept=protocol.rescale_intercept,
                rescale_slope=protocol.rescale_slope))
            name = volume_id.volume_name
            kernel = protocol.sharp_kernel if sharp else protocol.soft_kernel
            split.metadata.append(metadata_row(name, protocol, kernel, grid.shape, xy, z,
                                               thickness, table_z))
            split.reports.append({"VolumeName": name, **report})
            split.labels.append({"VolumeName": name,
                                 **{a: int(v) for a, v in zip(ABNORMALITIES, labels)}})


def _run_tasks(tasks: list[_VolumeTask], workers: int) -> None:
    for task in tasks:
        os.makedirs(os.path.dirname(task.path), exist_ok=True)
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            _write_volume(task)
        return
    # Forking a process that runs JAX threads can deadlock; start clean workers then.
    context = multiprocessing.get_context("spawn" if "jax" in sys.modules else "fork")
    chunk = max(1, len(tasks) // (workers * 8))
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        for _ in pool.map(_write_volume, tasks, chunksize=chunk):
            pass


def generate_release(out_dir: str | os.PathLike, num_volumes: int, seed: int = 0, *,
                     valid_fraction: float = 0.2, matrix: int = 80,
                     xy_spacing_range=(4.2, 5.2), z_spacing_range=(5.0, 9.0),
                     length_mm_range=(280.0, 360.0), min_prevalence: float = 0.0,
                     workers: int | None = None,
                     conspicuity: float = REALISTIC) -> ReleaseSummary:
    """Writes a synthetic CT-RATE release under `out_dir`/dataset.

    `num_volumes` reconstructions in total; `valid_fraction` of the patients go to the
    validation split.  Spacings are drawn per volume from the ranges (mm); the number
    of slices covers a length drawn per scan from `length_mm_range`.  Every label's
    prevalence is raised to at least `min_prevalence`.  `conspicuity` 1.0 renders
    realistic findings; larger values exaggerate every finding (the demo uses
    `conspicuity.DEMO_CONSPICUITY`).  `workers` processes (default: all CPUs) rasterise
    the volumes.  The same arguments give identical files.
    """
    if num_volumes < 1:
        raise ValueError(f"num_volumes must be >= 1, got {num_volumes}")
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    conspicuity = check_conspicuity(conspicuity)
    start = time.perf_counter()
    options = {"seed": int(seed), "num_volumes": int(num_volumes),
               "valid_fraction": float(valid_fraction), "matrix": int(matrix),
               "xy_spacing_range": [float(v) for v in xy_spacing_range],
               "z_spacing_range": [float(v) for v in z_spacing_range],
               "length_mm_range": [float(v) for v in length_mm_range],
               "min_prevalence": float(min_prevalence), "conspicuity": conspicuity}
    out_dir = pathlib.Path(out_dir)
    root = _prepare_output(out_dir, options)
    splits = {"train": _Split(), "valid": _Split()}
    for key, (split_name, scans) in enumerate(_layout(num_volumes, seed, valid_fraction)):
        split = splits[split_name]
        split.patients += 1
        _plan_patient(split, root, (split_name, split.patients), key, scans, options)
    for name in RELEASE_SUBDIRS[2:]:
        (root / name).mkdir(parents=True, exist_ok=True)
    for split_name, split in splits.items():
        files = SPLIT_FILES[split_name]
        _write_csv(root / "metadata" / files["metadata"], METADATA_COLUMNS, split.metadata)
        _write_csv(root / "radiology_text_reports" / files["reports"], REPORT_COLUMNS,
                   split.reports)
        _write_csv(root / "multi_abnormality_labels" / files["labels"],
                   ("VolumeName",) + ABNORMALITIES, split.labels)
    tasks = splits["train"].tasks + splits["valid"].tasks
    _run_tasks(tasks, workers if workers is not None else (os.cpu_count() or 1))
    return ReleaseSummary(
        root=root, num_train=len(splits["train"].tasks), num_valid=len(splits["valid"].tasks),
        volume_names={s: [row["VolumeName"] for row in split.labels]
                      for s, split in splits.items()},
        num_patients={s: split.patients for s, split in splits.items()},
        num_scans={s: split.scans for s, split in splits.items()},
        seconds=time.perf_counter() - start, conspicuity=conspicuity)


def _float_pair(text: str) -> tuple[float, float]:
    values = [float(v) for v in text.split(",")]
    if len(values) != 2 or values[0] > values[1]:
        raise argparse.ArgumentTypeError(f"expected 'low,high' with low <= high, got {text!r}")
    return values[0], values[1]


def main(argv: list[str] | None = None) -> ReleaseSummary:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipeline.synthetic",
        description="Write a synthetic CT-RATE release (layout, CSVs and NIfTI volumes).")
    parser.add_argument("--out", required=True, help="output directory (gets a dataset/ folder)")
    parser.add_argument("--num-volumes", type=int, required=True,
                        help="reconstructions in total over both splits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--valid-fraction", type=float, default=0.2,
                        help="share of patients in the validation split")
    parser.add_argument("--matrix", type=int, default=80, help="in-plane rows = columns")
    parser.add_argument("--xy-spacing-range", type=_float_pair, default=(4.2, 5.2),
                        metavar="LO,HI", help="in-plane spacing in mm")
    parser.add_argument("--z-spacing-range", type=_float_pair, default=(5.0, 9.0),
                        metavar="LO,HI", help="slice spacing in mm")
    parser.add_argument("--length-mm-range", type=_float_pair, default=(280.0, 360.0),
                        metavar="LO,HI", help="craniocaudal coverage in mm")
    parser.add_argument("--min-prevalence", type=float, default=0.0,
                        help="raise every label's prevalence to at least this")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes (default: all CPUs)")
    parser.add_argument("--conspicuity", type=float, default=REALISTIC,
                        help="1 = realistic findings; larger values exaggerate them "
                             f"(the demo uses {DEMO_CONSPICUITY}; see docs/synthetic_data.md)")
    args = parser.parse_args(argv)
    summary = generate_release(
        args.out, args.num_volumes, args.seed, valid_fraction=args.valid_fraction,
        matrix=args.matrix, xy_spacing_range=args.xy_spacing_range,
        z_spacing_range=args.z_spacing_range, length_mm_range=args.length_mm_range,
        min_prevalence=args.min_prevalence, workers=args.workers,
        conspicuity=args.conspicuity)
    print(summary.describe())
    return summary
