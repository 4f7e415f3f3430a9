"""End-to-end tests of release listing and shard preparation on a tiny real-layout release."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os

import nibabel as nib
import numpy as np
import pytest

from data_pipeline import schema
from data_pipeline.prepare import Manifest, main, prepare_split, read_records
from data_pipeline.preprocess import PreprocessConfig, preprocess_volume
from data_pipeline.release import list_volumes

CONFIG = PreprocessConfig(target_spacing_mm=(1.5, 0.75, 0.75), target_shape=(12, 16, 14),
                          min_slices=6)
INTERCEPT = -1024.0
GOOD = ["train_1_a_1.nii.gz", "train_2_a_1.nii.gz", "train_2_a_2.nii.gz",
        "train_3_b_1.nii.gz", "train_4_a_1.nii.gz"]
HEADER_SCALED = "train_4_a_1.nii.gz"  # a re-headered ("train_fixed" style) file
CORRUPT = "train_8_a_1.nii.gz"
NO_METADATA = "train_9_a_1.nii.gz"


def _stored_volume(index: int) -> np.ndarray:
    """Stored values [H, W, D] of volume `index`; HU = stored - 1024."""
    rng = np.random.default_rng(index)
    shape = (18 + index, 15, 8 + 2 * index)
    return rng.integers(0, 2400, size=shape).astype(np.int16)


def _spacing(index: int) -> tuple[float, float]:
    """(ZSpacing, XYSpacing) of volume `index` in mm."""
    return 2.0 + 0.5 * index, 0.7 + 0.05 * index


def _labels(index: int) -> list[int]:
    return [(index + column) % 2 for column in range(schema.NUM_ABNORMALITIES)]


def _write_csv(path, columns, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def build_release(root, split="train"):
    """Writes GOOD + CORRUPT + NO_METADATA volumes and the three CSVs under root/dataset."""
    dataset = os.path.join(root, "dataset")
    files = schema.SPLIT_FILES[split]
    metadata_rows, report_rows, label_rows = [], [], []
    for index, name in enumerate(GOOD + [CORRUPT, NO_METADATA]):
        path = os.path.join(dataset, schema.parse_volume_name(name).relative_path())
        os.makedirs(os.path.dirname(path), exist_ok=True)
        z_spacing, xy_spacing = _spacing(index)
        image = nib.Nifti1Image(_stored_volume(index),
                                np.diag([xy_spacing, xy_spacing, z_spacing, 1.0]))
        if name == HEADER_SCALED:
            image.header.set_slope_inter(1.0, INTERCEPT)
        nib.save(image, path)
        if name == CORRUPT:  # keep a valid start, cut the gzip stream short
            with open(path, "rb") as handle:
                data = gzip.decompress(handle.read())
            with open(path, "wb") as handle:
                handle.write(gzip.compress(data)[: len(data) // 3])
        if name != NO_METADATA:
            row = {column: "" for column in schema.METADATA_COLUMNS}
            row.update(VolumeName=name, RescaleSlope="1.0", RescaleIntercept=str(INTERCEPT),
                       XYSpacing=schema.format_xy_spacing(xy_spacing), ZSpacing=str(z_spacing),
                       Manufacturer="TestCo")
            metadata_rows.append(row)
        report_rows.append({"VolumeName": name, "ClinicalInformation_EN": "",
                            "Technique_EN": "", "Findings_EN": f"Findings, \"quoted\" {index}.",
                            "Impressions_EN": f"Impression\nline two {index}."})
        label_rows.append({"VolumeName": name, **dict(zip(schema.ABNORMALITIES,
                                                          _labels(index)))})
    _write_csv(os.path.join(dataset, "metadata", files["metadata"]),
               schema.METADATA_COLUMNS, metadata_rows)
    _write_csv(os.path.join(dataset, "radiology_text_reports", files["reports"]),
               schema.REPORT_COLUMNS, report_rows)
    _write_csv(os.path.join(dataset, "multi_abnormality_labels", files["labels"]),
               ("VolumeName",) + schema.ABNORMALITIES, label_rows)
    return str(root)


def expected_volume(index: int) -> np.ndarray:
    """What preparation must store for GOOD[index], computed from the written array."""
    z_spacing, xy_spacing = _spacing(index)
    return preprocess_volume(_stored_volume(index), 1.0, INTERCEPT,
                             (z_spacing, xy_spacing, xy_spacing), CONFIG, layout="hwd")


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return build_release(tmp_path_factory.mktemp("ctrate"))


@pytest.fixture(scope="module")
def prepared(release, tmp_path_factory):
    """Shards written by the command line with 2 records per shard and one process."""
    out = str(tmp_path_factory.mktemp("shards"))
    status = main(["--ctrate-root", release, "--split", "train", "--out", out,
                   "--target-spacing", "1.5,0.75,0.75", "--target-shape", "12,16,14",
                   "--hu-window", "-1000,1000", "--min-slices", "6", "--records-per-shard", "2",
                   "--workers", "1", "--no-progress"])
    return out, status


# ----------------------------------------------------------------------------------
# Listing
# ----------------------------------------------------------------------------------


def test_list_volumes_joins_files_and_csvs(release):
    entries = list_volumes(release, "train")
    assert [e.volume_name for e in entries] == sorted(GOOD + [CORRUPT, NO_METADATA])
    by_name = {e.volume_name: e for e in entries}
    first = by_name[GOOD[0]]
    assert first.ok and first.slope == 1.0 and first.intercept == INTERCEPT
    assert first.spacing_zyx == pytest.approx((2.0, 0.7, 0.7))
    assert first.findings == 'Findings, "quoted" 0.' and first.impressions.endswith("two 0.")
    assert first.labels == tuple(_labels(0)) and first.metadata["Manufacturer"] == "TestCo"
    assert by_name[CORRUPT].ok  # only reading it can tell
    assert "metadata" in by_name[NO_METADATA].error
    # The dataset/ folder itself is accepted as the root too.
    assert [e.volume_name for e in list_volumes(os.path.join(release, "dataset"), "train")] \
        == [e.volume_name for e in entries]


def test_missing_csv_is_one_clear_error(tmp_path):
    root = build_release(tmp_path)
    labels = os.path.join(root, "dataset", "multi_abnormality_labels",
                          schema.SPLIT_FILES["train"]["labels"])
    os.remove(labels)
    with pytest.raises(FileNotFoundError, match="train_predicted_labels.csv"):
        list_volumes(root, "train")


# ----------------------------------------------------------------------------------
# Preparation
# ----------------------------------------------------------------------------------


def test_manifest_counts_and_checksums(prepared):
    out, status = prepared
    manifest = Manifest.load(out)
    assert status == 1  # two inputs failed
    assert manifest.num_records == len(GOOD)
    assert manifest.record_format_version == schema.RECORD_FORMAT_VERSION
    assert [s.file for s in manifest.shards] == [
        f"train-{i:05d}-of-00003.array_record" for i in range(3)]
    assert [s.num_records for s in manifest.shards] == [2, 2, 1]
    assert manifest.preprocessing["target_shape"] == [12, 16, 14]
    for shard, path in zip(manifest.shards, manifest.shard_paths()):
        with open(path, "rb") as handle:
            data = handle.read()
        assert shard.bytes == len(data)
        assert shard.sha256 == hashlib.sha256(data).hexdigest()
    assert sorted(os.listdir(out)) == sorted([s.file for s in manifest.shards]
                                             + ["manifest.json"])


def test_failures_are_listed_and_good_volumes_kept(prepared):
    out, _ = prepared
    with open(os.path.join(out, "manifest.json"), encoding="utf-8") as handle:
        failed = {f["volume_name"]: f for f in json.load(handle)["failed"]}
    assert sorted(failed) == [CORRUPT, NO_METADATA]
    assert "metadata" in failed[NO_METADATA]["reason"]
    assert failed[CORRUPT]["reason"] and failed[CORRUPT]["path"].endswith(CORRUPT)
    assert [r.volume_name for r in read_records(out)] == GOOD


def test_every_record_decodes_with_its_content(prepared):
    out, _ = prepared
    for index, record in enumerate(read_records(out)):
        assert record.volume_name == GOOD[index]
        assert record.volume_hu.shape == CONFIG.target_shape
        assert record.volume_hu.dtype == np.int16
        np.testing.assert_array_equal(record.volume_hu, expected_volume(index))
        np.testing.assert_array_equal(record.labels, _labels(index))
        assert record.findings == f'Findings, "quoted" {index}.'
        assert record.impressions == f"Impression\nline two {index}."
        assert record.spacing_mm == pytest.approx(CONFIG.target_spacing_mm)
        stored = _stored_volume(index)
        assert record.metadata["original_shape_dhw"] == [stored.shape[2], *stored.shape[:2]]
        assert record.metadata["header_scaling_applied"] == (record.volume_name == HEADER_SCALED)
        assert record.metadata["Manufacturer"] == "TestCo"


def test_two_workers_write_identical_shards(release, prepared, tmp_path):
    out, _ = prepared
    manifest = prepare_split(release, "train", str(tmp_path), CONFIG, records_per_shard=2,
                             workers=2, progress=False)
    reference = Manifest.load(out)
    assert [(s.file, s.sha256) for s in manifest.shards] == [
        (s.file, s.sha256) for s in reference.shards]
    for ours, theirs in zip(manifest.shard_paths(), reference.shard_paths()):
        with open(ours, "rb") as a, open(theirs, "rb") as b:
            assert a.read() == b.read()


def test_clean_run_exits_zero_and_cuts_shards_by_size(release, tmp_path, capsys):
    # Shards hold as many target-size volumes (int16 voxels) as fit in --shard-size-mb.
    voxel_bytes = 2 * int(np.prod(CONFIG.target_shape))
    two_and_a_half_mib = 2.5 * voxel_bytes / 2**20
    status = main(["--ctrate-root", release, "--split", "train", "--out", str(tmp_path),
                   "--target-shape", "12,16,14", "--min-slices", "6", "--limit", "3",
                   "--shard-size-mb", repr(two_and_a_half_mib), "--workers", "1",
                   "--no-progress"])
    assert status == 0
    assert "prepared 3 of 3 volumes" in capsys.readouterr().out
    manifest = Manifest.load(str(tmp_path))
    assert [s.num_records for s in manifest.shards] == [2, 1] and not manifest.failed


def test_existing_output_is_not_overwritten_silently(release, tmp_path):
    first = prepare_split(release, "train", str(tmp_path), CONFIG, workers=1, limit=1,
                          progress=False)
    # The same command again finds its own finished work and returns it untouched.
    again = prepare_split(release, "train", str(tmp_path), CONFIG, workers=1, limit=1,
                          progress=False)
    assert again.created == first.created and again.shards == first.shards
    with pytest.raises(FileExistsError, match="overwrite"):  # other inputs: refused
        prepare_split(release, "train", str(tmp_path), CONFIG, workers=1, limit=2,
                      progress=False)
    manifest = prepare_split(release, "train", str(tmp_path), CONFIG, workers=1, limit=2,
                             overwrite=True, progress=False)
    assert manifest.num_records == 2 and len(os.listdir(tmp_path)) == 2


def test_uncompressed_shards_hold_the_same_records_and_say_so(release, prepared, tmp_path,
                                                               capsys):
    """--compression none: the manifest records it, the plan differs from the default's
    (so a rerun with another compression is not mistaken for a resume), and readers get
    the same records as from the default zstd shards; a bad value is one clear error."""
    out, _ = prepared
    status = main(["--ctrate-root", release, "--split", "train", "--out", str(tmp_path),
                   "--target-spacing", "1.5,0.75,0.75", "--target-shape", "12,16,14",
                   "--hu-window", "-1000,1000", "--min-slices", "6", "--records-per-shard",
                   "2", "--workers", "1", "--no-progress", "--compression", "none"])
    assert status == 1  # the release's bad inputs, as in `prepared`
    plain, reference = Manifest.load(str(tmp_path)), Manifest.load(out)
    assert plain.writer_options == "group_size:1,uncompressed"
    assert reference.writer_options == "group_size:1,zstd:3"  # the default, unchanged
    assert plain.plan_sha256 != reference.plan_sha256
    assert [s.sha256 for s in plain.shards] != [s.sha256 for s in reference.shards]
    for ours, theirs in zip(read_records(str(tmp_path)), read_records(out), strict=True):
        assert ours.volume_name == theirs.volume_name
        np.testing.assert_array_equal(ours.volume_hu, theirs.volume_hu)
    with pytest.raises(SystemExit):
        main(["--ctrate-root", release, "--split", "train", "--out", str(tmp_path / "x"),
              "--compression", "gzip"])
    assert "compression 'gzip' is not supported" in capsys.readouterr().err
