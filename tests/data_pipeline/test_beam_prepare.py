"""Preparation as an Apache Beam pipeline (DirectRunner): the same records, shards and
manifest as the local `prepare`, one record per input, resumable, read by the input pipeline."""

from __future__ import annotations

import hashlib
import os
import sys

import numpy as np
import pytest

pytest.importorskip("apache_beam")

from data_pipeline import beam_prepare, input_pipeline  # noqa: E402
from data_pipeline.input_pipeline import report_text  # noqa: E402
from data_pipeline.prepare import Manifest, main, prepare_split, read_records  # noqa: E402
from data_pipeline.preprocess import PreprocessConfig  # noqa: E402
from data_pipeline.release import list_volumes  # noqa: E402
from data_pipeline.synthetic import generate_release  # noqa: E402
from data_pipeline.tokenizer import train_wordpiece_tokenizer  # noqa: E402

CONFIG = PreprocessConfig(target_spacing_mm=(12.0, 3.0, 3.0), target_shape=(8, 16, 16),
                          min_slices=4)
SHAPE_ARGS = ["--target-shape", "8,16,16", "--target-spacing", "12,3,3", "--min-slices", "4"]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """7 synthetic volumes (5 train, one of them truncated; 2 valid) and local shards."""
    root = tmp_path_factory.mktemp("beam_prepare")
    generate_release(root / "release", 7, seed=5, valid_fraction=0.3, matrix=32, workers=1)
    train = list_volumes(root / "release", "train")
    corrupt = train[1].path
    with open(corrupt, "r+b") as handle:  # a truncated download
        handle.truncate(200)
    local = {split: prepare_split(root / "release", split, str(root / "local" / split), CONFIG,
                                  records_per_shard=2, workers=1, progress=False)
             for split in ("train", "valid")}
    return {"root": root, "release": str(root / "release"), "local": local,
            "corrupt": os.path.basename(corrupt), "num_train": len(train)}


def _assert_same_records(got_dir, want_dir):
    got, want = list(read_records(got_dir)), list(read_records(want_dir))
    assert [r.volume_name for r in got] == [r.volume_name for r in want]
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a.volume_hu, b.volume_hu)
        np.testing.assert_array_equal(a.labels, b.labels)
        assert (a.findings, a.impressions, a.spacing_mm, a.metadata) == (
            b.findings, b.impressions, b.spacing_mm, b.metadata)


def _sha256(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def test_command_line_beam_runner_equals_local_prepare(release, capsys):
    out = str(release["root"] / "beam_cli" / "train")
    status = main(["--ctrate-root", release["release"], "--split", "train", "--out", out,
                   *SHAPE_ARGS, "--records-per-shard", "2", "--runner", "beam",
                   "--", "--runner=DirectRunner", "--direct_num_workers=1"])
    assert status == 1  # one input failed; the others are prepared
    assert f"FAILED {release['corrupt']}" in capsys.readouterr().err
    manifest, local = Manifest.load(out), release["local"]["train"]
    # Exactly one record per good input, one failure entry per bad one.
    assert manifest.num_records == local.num_records == release["num_train"] - 1
    names = [name for shard in manifest.shards for name in shard.volume_names]
    assert len(names) == len(set(names)) and release["corrupt"] not in names
    assert [(f["volume_name"], f["reason"]) for f in manifest.failed] == [
        (f["volume_name"], f["reason"]) for f in local.failed]
    assert manifest.preprocessing == local.preprocessing
    for shard, path in zip(manifest.shards, manifest.shard_paths()):
        assert shard.sha256 == _sha256(path) and shard.bytes == os.path.getsize(path)
    assert sorted(os.listdir(out)) == sorted([s.file for s in manifest.shards]
                                             + ["manifest.json"])
    _assert_same_records(out, local.directory)


def test_without_failures_the_shards_are_byte_identical_to_local(release):
    out = str(release["root"] / "beam" / "valid")
    manifest = beam_prepare.prepare_split_beam(release["release"], "valid", out, CONFIG,
                                               records_per_shard=2)
    local = release["local"]["valid"]
    assert [(s.file, s.sha256, s.volume_names) for s in manifest.shards] == [
        (s.file, s.sha256, s.volume_names) for s in local.shards]


def test_rerun_after_a_kill_writes_only_the_unfinished_shards(release, monkeypatch):
    out = str(release["root"] / "beam_resume" / "train")
    entries = [e for e in list_volumes(release["release"], "train") if e.ok]
    groups = beam_prepare.plan_groups("train", entries, 2, CONFIG)
    # The killed run had completed groups 1 and 2 (but group 2's file was damaged since)
    # and left a half-written file of group 0.
    progress = os.path.join(out, beam_prepare.PROGRESS_DIR)
    os.makedirs(progress)
    kept = beam_prepare.write_group(groups[1], out, "train", CONFIG)
    damaged = beam_prepare.write_group(groups[2], out, "train", CONFIG)
    with open(os.path.join(progress, damaged["tmp_file"]), "r+b") as handle:
        handle.truncate(damaged["bytes"] // 2)
    with open(os.path.join(progress, "train-group-00000.x.tmp"), "wb"):
        pass
    ran = []
    real_run = beam_prepare.run_pipeline
    monkeypatch.setattr(beam_prepare, "run_pipeline",
                        lambda todo, *args: (ran.extend(g.index for g in todo),
                                             real_run(todo, *args)))
    manifest = beam_prepare.prepare_split_beam(release["release"], "train", out, CONFIG,
                                               records_per_shard=2)
    assert ran == [0, 2]
    assert manifest.shards[1].sha256 == kept["sha256"]
    assert not os.path.exists(os.path.join(out, beam_prepare.PROGRESS_DIR))
    _assert_same_records(out, release["local"]["train"].directory)


def test_input_pipeline_reads_the_beam_shards(release, tmp_path):
    out = str(release["root"] / "beam" / "valid")  # written by the test above
    if not os.path.exists(os.path.join(out, "manifest.json")):
        beam_prepare.prepare_split_beam(release["release"], "valid", out, CONFIG,
                                        records_per_shard=2)
    tokenizer = tmp_path / "tokenizer.json"
    train_wordpiece_tokenizer((report_text(r) for r in read_records(out)), 200, tokenizer)
    config = input_pipeline.PipelineConfig(shard_dir=out, tokenizer_path=str(tokenizer),
                                           global_batch_size=2, max_text_length=16)
    batch = next(iter(input_pipeline.make_train_dataset(config, num_epochs=1)))
    assert batch["volume"].shape == (2, 8, 16, 16)
    records = {r.volume_name: r for r in read_records(out)}
    for name, volume in zip(batch["volume_name"], batch["volume"]):
        np.testing.assert_array_equal(volume,
                                      input_pipeline.normalise_hu(records[str(name)].volume_hu))


def test_command_line_errors(release, tmp_path, monkeypatch, capsys):
    args = ["--ctrate-root", release["release"], "--split", "valid", *SHAPE_ARGS]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--out", str(tmp_path / "a"), "--", "--runner=DirectRunner"])
    assert exit_info.value.code == 2 and "need --runner beam" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "apache_beam", None)  # as if Beam were not installed
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--out", str(tmp_path / "b"), "--runner", "beam"])
    assert exit_info.value.code == 2
    assert "pip install 'ct-rate-jax[beam]'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "b")
