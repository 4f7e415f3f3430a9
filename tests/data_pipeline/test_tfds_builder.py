"""The ``ct_rate`` TFDS builder: built from a synthetic release without TensorFlow, read back
with `tfds.data_source`, fed through Grain, and equal to `data_pipeline.prepare`'s records."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

import grain  # noqa: E402

from data_pipeline.input_pipeline import normalise_hu  # noqa: E402
from data_pipeline.prepare import prepare_split, read_records  # noqa: E402
from data_pipeline.release import list_volumes  # noqa: E402
from data_pipeline.synthetic import generate_release  # noqa: E402
from data_pipeline.tfds_ct_rate import CtRate, CtRateConfig, example_to_record  # noqa: E402

TFDS_CONFIG = CtRateConfig(name="test_8x16x16", target_spacing_mm=(12.0, 3.0, 3.0),
                           target_shape=(8, 16, 16), min_slices=4)
CONFIG = TFDS_CONFIG.preprocess_config()


@contextlib.contextmanager
def _never_imports_tensorflow():
    """Fails if the block imports TensorFlow (it is not installed here, nor in CI; where
    it is, never importing it shows as well that it is not needed)."""
    already = "tensorflow" in sys.modules
    yield
    assert already or "tensorflow" not in sys.modules, "TensorFlow was imported"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A 6-volume synthetic release (one train file truncated, one in no_chest_train.txt),
    built as TFDS and by prepare."""
    root = tmp_path_factory.mktemp("tfds_ct_rate")
    release = root / "release"
    generate_release(release, 6, seed=4, valid_fraction=0.3, matrix=32, workers=1)
    train = list_volumes(release, "train")
    corrupt = train[1].path
    with open(corrupt, "r+b") as handle:  # a truncated download
        handle.truncate(200)
    # The release says the last train volume is not a chest CT.
    (release / "dataset" / "no_chest_train.txt").write_text(train[-1].volume_name + "\n")

    with _never_imports_tensorflow():
        builder = CtRate(data_dir=str(root / "tfds"), config=TFDS_CONFIG,
                         file_format="array_record", workers=2)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(release)))
        source = tfds.data_source(f"ct_rate/{TFDS_CONFIG.name}", data_dir=str(root / "tfds"))

    local = {split: prepare_split(release, split, str(root / "shards" / split), CONFIG,
                                  workers=1, progress=False) for split in ("train", "valid")}
    return {"root": root, "release": release, "corrupt": os.path.basename(corrupt),
            "excluded": train[-1].volume_name,
            "builder": builder, "source": source, "local": local}


def test_examples_equal_prepare_records(built):
    for split in ("train", "valid"):
        source = built["source"][split]
        records = list(read_records(built["local"][split].directory))
        assert len(source) == len(records) == built["local"][split].num_records > 0
        for index, record in enumerate(records):
            example = example_to_record(source[index])
            np.testing.assert_array_equal(example.volume_hu, record.volume_hu)
            assert example.volume_hu.dtype == np.int16
            assert example.volume_name == record.volume_name
            assert (example.findings, example.impressions) == (record.findings,
                                                               record.impressions)
            np.testing.assert_array_equal(example.labels, record.labels)
            assert example.spacing_mm == record.spacing_mm
            assert example.metadata == record.metadata


def test_dataset_info_records_splits_features_counts_and_failures(built):
    version_dir = built["root"] / "tfds" / "ct_rate" / TFDS_CONFIG.name / "1.0.0"
    info = json.loads((version_dir / "dataset_info.json").read_text())
    assert info["fileFormat"] == "array_record"
    counts = {split["name"]: sum(int(n) for n in split["shardLengths"])
              for split in info["splits"]}
    assert counts == {split: m.num_records for split, m in built["local"].items()}
    features = json.loads((version_dir / "features.json").read_text())
    volume = features["featuresDict"]["features"]["volume"]["tensor"]
    assert volume["shape"]["dimensions"] == ["8", "16", "16"] and volume["dtype"] == "int16"
    assert volume["encoding"] == "bytes"  # int16 stays 2 bytes a voxel, not int64

    metadata = built["builder"].info.metadata
    assert metadata["preprocessing"] == CONFIG.to_dict()
    assert [f["volume_name"] for f in metadata["failed"]["train"]] == [built["corrupt"]]
    assert metadata["failed"]["train"] == [
        {k: f[k] for k in ("volume_name", "path", "reason")}
        for f in built["local"]["train"].failed]
    assert metadata["failed"]["valid"] == []
    # Excluded through the same listing as prepare: in `excluded`, not built, not failed.
    assert [e["volume_name"] for e in metadata["excluded"]["train"]] == [built["excluded"]]
    assert metadata["excluded"] == {split: m.excluded for split, m in built["local"].items()}


def test_grain_batches_from_the_tfds_source(built):
    source = built["source"]["train"]
    dataset = (grain.MapDataset.source(source)
               .map(lambda ex: {"volume": normalise_hu(ex["volume"]), "labels": ex["labels"]})
               .batch(2))
    batch = dataset[0]
    records = list(read_records(built["local"]["train"].directory))[:2]
    assert batch["volume"].shape == (2, 8, 16, 16) and batch["volume"].dtype == np.float32
    np.testing.assert_array_equal(batch["volume"],
                                  np.stack([normalise_hu(r.volume_hu) for r in records]))
    np.testing.assert_array_equal(batch["labels"], np.stack([r.labels for r in records]))


def test_data_source_reads_without_the_builder_code_or_tensorflow(built):
    """A reader (e.g. a Grain worker) needs only tensorflow-datasets and the files."""
    script = (
        "import sys\n"
        "sys.modules['data_pipeline'] = None  # the builder's code is not needed to read\n"
        "import tensorflow_datasets as tfds\n"
        f"src = tfds.data_source('ct_rate/{TFDS_CONFIG.name}', split='valid', "
        f"data_dir=sys.argv[1])\n"
        "ex = src[0]\n"
        "print(len(src), ex['volume_name'].decode(), ex['volume'].dtype, ex['volume'].shape,\n"
        "      'tensorflow' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script, str(built["root"] / "tfds")],
                            capture_output=True, text=True, timeout=120, cwd="/")
    assert result.returncode == 0, result.stderr[-2000:]
    valid = built["local"]["valid"]
    assert result.stdout.split() == [str(valid.num_records), valid.shards[0].volume_names[0],
                                     "int16", "(8,", "16,", "16)", "False"]
