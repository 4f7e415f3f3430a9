"""Release quirks and safety: no_chest exclusion lists, train_fixed folders, patient-level
splits, and manifest paths that try to leave the dataset folder."""

import json
import os
import shutil

import pytest

from data_pipeline import input_pipeline
from data_pipeline.manifest import Manifest, UnsafePathError
from data_pipeline.prepare import prepare_split, read_records
from data_pipeline.release import list_volumes, read_exclusion_list
from data_pipeline.splits import PatientLeakError, check_patient_split
from test_prepare import CONFIG, CORRUPT, GOOD, NO_METADATA, build_release


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return build_release(tmp_path_factory.mktemp("quirks"))


def test_no_chest_list_excludes_volumes_without_counting_them_as_failures(release, tmp_path):
    listing = os.path.join(release, "dataset", "no_chest_train.txt")
    with open(listing, "w") as handle:
        handle.write("# volumes that are not chest CTs\ntrain_2_a_1\n\ntrain_3_b_1.nii.gz\n")
    try:
        manifest = prepare_split(release, "train", str(tmp_path), CONFIG, workers=1,
                                 progress=False)
    finally:
        os.remove(listing)
    excluded = {e["volume_name"]: e["reason"] for e in manifest.excluded}
    assert sorted(excluded) == ["train_2_a_1.nii.gz", "train_3_b_1.nii.gz"]
    assert all("no_chest_train.txt" in reason for reason in excluded.values())
    assert sorted(f["volume_name"] for f in manifest.failed) == [CORRUPT, NO_METADATA]
    assert [r.volume_name for r in read_records(str(tmp_path))] == [
        name for name in GOOD if name not in excluded]


def test_exclusion_list_with_a_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "no_chest_train.txt"
    path.write_text("train_1_a_1.nii.gz\nnot a volume\n")
    with pytest.raises(ValueError, match=r"no_chest_train.txt, line 2"):
        read_exclusion_list(str(path))


def test_fixed_volume_folder_is_preferred_when_present(tmp_path):
    root = build_release(tmp_path)
    dataset = os.path.join(root, "dataset")
    shutil.copytree(os.path.join(dataset, "train", "train_1"),
                    os.path.join(dataset, "train_fixed", "train_1"))
    entries = list_volumes(root, "train")
    assert [e.volume_name for e in entries] == ["train_1_a_1.nii.gz"]
    assert os.sep + "train_fixed" + os.sep in entries[0].path
    assert len(list_volumes(root, "train", volumes_dir="train")) == len(GOOD) + 2


def test_patients_never_in_both_splits(tiny_synthetic_data):
    train, valid = tiny_synthetic_data.shard_dir("train"), tiny_synthetic_data.shard_dir("valid")
    check_patient_split(train, valid)  # the release's own split is patient-disjoint
    with pytest.raises(PatientLeakError, match=r"patient\(s\) are in both"):
        check_patient_split(train, train)


@pytest.fixture
def shard_dir(release, tmp_path):
    out = tmp_path / "shards"
    prepare_split(release, "train", str(out), CONFIG, workers=1, limit=2, progress=False)
    return out


def _rewrite_first_shard_name(shard_dir, name):
    path = shard_dir / "manifest.json"
    data = json.loads(path.read_text())
    data["shards"][0]["file"] = name
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("name", ["../outside.array_record", "/etc/passwd",
                                  "sub/../../outside.array_record"])
def test_manifest_paths_cannot_leave_the_dataset_folder(shard_dir, name):
    _rewrite_first_shard_name(shard_dir, name)
    with pytest.raises(UnsafePathError, match=r"manifest\.json.*leaves the directory"):
        Manifest.load(str(shard_dir))
    with pytest.raises(UnsafePathError, match="manifest.json"):
        input_pipeline.shard_paths(str(shard_dir))


def test_symlink_out_of_the_dataset_folder_is_refused(shard_dir, tmp_path):
    shard = Manifest.load(str(shard_dir)).shards[0].file
    outside = tmp_path / "elsewhere.array_record"
    shutil.move(shard_dir / shard, outside)
    os.symlink(outside, shard_dir / shard)
    with pytest.raises(UnsafePathError, match=r"manifest\.json.*outside"):
        Manifest.load(str(shard_dir))
    # A symlink that stays inside the folder is fine.
    os.remove(shard_dir / shard)
    shutil.move(outside, shard_dir / "real.array_record")
    os.symlink("real.array_record", shard_dir / shard)
    assert len(list(read_records(str(shard_dir)))) == 2
