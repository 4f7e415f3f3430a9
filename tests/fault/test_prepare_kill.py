"""kill -9 of `python -m data_pipeline.prepare` at any moment, then the same command again:
completed shards are kept (checked by checksum), and the run ends with exactly one record
per good input, in shards byte-identical to an uninterrupted run."""

import csv
import gzip
import os
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

from data_pipeline import schema
from data_pipeline.failpoints import ENV_VAR
from data_pipeline.manifest import MANIFEST_NAME, Manifest
from data_pipeline.prepare import prepare_split, read_records
from data_pipeline.preprocess import PreprocessConfig
from data_pipeline.shard_plan import PROGRESS_DIR

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = PreprocessConfig(target_shape=(12, 16, 14), min_slices=6)
GOOD = [f"train_{p}_a_{r}.nii.gz" for p in range(1, 5) for r in (1, 2)]
CORRUPT, NO_METADATA = "train_2_b_1.nii.gz", "train_6_a_1.nii.gz"
ARGS = ["--split", "train", "--target-shape", "12,16,14", "--min-slices", "6",
        "--records-per-shard", "2", "--no-progress"]


def _write_csv(path, columns, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """8 good volumes, a truncated .nii.gz and one without a metadata row (9 inputs go
    through the workers, in 5 shards of 2)."""
    dataset = tmp_path_factory.mktemp("release") / "dataset"
    meta, reports, labels = [], [], []
    for index, name in enumerate(GOOD + [CORRUPT, NO_METADATA]):
        path = dataset / schema.parse_volume_name(name).relative_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        stored = np.random.default_rng(index).integers(0, 2000, (20, 18, 10 + index), np.int16)
        nib.save(nib.Nifti1Image(stored, np.diag([0.8, 0.8, 2.0, 1.0])), str(path))
        if name == CORRUPT:
            data = gzip.decompress(path.read_bytes())
            path.write_bytes(gzip.compress(data)[: len(data) // 3])
        if name != NO_METADATA:
            meta.append({"VolumeName": name, "RescaleSlope": "1", "RescaleIntercept": "-1024",
                         "XYSpacing": "[0.8, 0.8]", "ZSpacing": "2.0"})
        reports.append({"VolumeName": name, "Findings_EN": f"Findings {index}.",
                        "Impressions_EN": ""})
        labels.append({"VolumeName": name, **{a: index % 2 for a in schema.ABNORMALITIES}})
    files = schema.SPLIT_FILES["train"]
    _write_csv(dataset / "metadata" / files["metadata"],
               ["VolumeName", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing"], meta)
    _write_csv(dataset / "radiology_text_reports" / files["reports"],
               ["VolumeName", "Findings_EN", "Impressions_EN"], reports)
    _write_csv(dataset / "multi_abnormality_labels" / files["labels"],
               ["VolumeName", *schema.ABNORMALITIES], labels)
    return str(dataset.parent)


@pytest.fixture(scope="module")
def reference(release, tmp_path_factory):
    """An uninterrupted run of the same settings."""
    out = str(tmp_path_factory.mktemp("reference"))
    manifest = prepare_split(release, "train", out, CONFIG, records_per_shard=2, workers=1,
                             progress=False)
    assert [s.num_records for s in manifest.shards] == [2, 2, 1, 2, 1]
    return manifest


def _command(release, out, workers):
    return [sys.executable, "-m", "data_pipeline.prepare", "--ctrate-root", release,
            "--out", str(out), "--workers", str(workers), *ARGS]


def _run(release, out, *, failpoint=None, workers=1):
    env = dict(os.environ)
    env.pop(ENV_VAR, None)
    if failpoint:
        env[ENV_VAR] = failpoint
    return subprocess.run(_command(release, out, workers), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def _completed_shard_files(out):
    """Shard file -> (inode, mtime) of the shards recorded as complete."""
    progress = os.path.join(out, PROGRESS_DIR)
    names = [n[:-len(".json")] for n in os.listdir(progress) if n.endswith(".array_record.json")]
    return {n: (os.stat(os.path.join(out, n)).st_ino, os.stat(os.path.join(out, n)).st_mtime_ns)
            for n in names if os.path.exists(os.path.join(out, n))}


def _children(pid):
    """Process ids whose parent is `pid` (Linux /proc)."""
    children = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if entry.isdigit() and int(fields[1]) == pid:
            children.append(int(entry))
    return children


def _assert_same_as_reference(out, reference):
    manifest = Manifest.load(out)
    names = [record.volume_name for record in read_records(out)]
    assert len(names) == manifest.num_records == len(GOOD)  # nothing lost, nothing twice
    assert sorted(names) == sorted(GOOD)
    assert sorted(f["volume_name"] for f in manifest.failed) == [CORRUPT, NO_METADATA]
    assert manifest.shards == reference.shards  # names, counts, sha256, volume names
    for ours, theirs in zip(manifest.shard_paths(), reference.shard_paths()):
        with open(ours, "rb") as a, open(theirs, "rb") as b:
            assert a.read() == b.read()
    assert sorted(os.listdir(out)) == sorted([s.file for s in manifest.shards] + [MANIFEST_NAME])


def test_kill_9_at_chosen_moments_then_resume(release, reference, tmp_path):
    out = tmp_path / "out"
    # Each run dies at another point of the shard protocol; the next one resumes.
    moments = ["record_written:3",   # in the middle of shard 1 (shard 0 complete)
               "shard_renamed:1",    # a shard renamed into place, its completion unrecorded
               "shard_complete:1",   # right after a completion record
               "manifest_written:1"]  # the manifest written, progress folder still there
    for moment in moments:
        before = _completed_shard_files(out) if (out / PROGRESS_DIR).exists() else {}
        if moment == "manifest_written:1":
            # A shard damaged after it was recorded complete must be written again.
            damaged = sorted(before)[0]
            data = bytearray((out / damaged).read_bytes())
            data[len(data) // 2] ^= 0xFF
            (out / damaged).write_bytes(bytes(data))
            before.pop(damaged)
        killed = _run(release, out, failpoint=moment)
        assert killed.returncode == -signal.SIGKILL, (moment, killed.stderr[-2000:])
        if before:
            assert "already complete" in killed.stderr
        for name, stamp in before.items():  # completed shards were not written again
            assert _completed_shard_files(out).get(name, stamp) == stamp, (moment, name)
    assert (out / MANIFEST_NAME).exists() and (out / PROGRESS_DIR).exists()
    final = _run(release, out)
    assert final.returncode == 1, final.stderr[-2000:]  # two inputs failed
    assert f"prepared {len(GOOD)} of {len(GOOD) + 2} volumes" in final.stdout
    _assert_same_as_reference(out, reference)


def test_kill_9_from_outside_at_arbitrary_moments_with_two_workers(release, reference,
                                                                     tmp_path):
    out = tmp_path / "out"
    progress = out / PROGRESS_DIR
    for completed_before_kill in (1, 3):
        process = subprocess.Popen(_command(release, out, workers=2), cwd=REPO,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   env={k: v for k, v in os.environ.items() if k != ENV_VAR})
        deadline = time.monotonic() + 60
        while process.poll() is None and time.monotonic() < deadline:
            if progress.exists() and len(list(progress.glob("*.array_record.json"))) \
                    >= completed_before_kill:
                break
            time.sleep(0.005)
        workers = _children(process.pid)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL  # it was still running
        deadline = time.monotonic() + 10  # orphaned workers notice and exit
        while any(os.path.exists(f"/proc/{pid}") for pid in workers):
            assert time.monotonic() < deadline, f"workers {workers} outlived their parent"
            time.sleep(0.05)
    final = _run(release, out, workers=2)
    assert final.returncode == 1, final.stderr[-2000:]
    _assert_same_as_reference(out, reference)
