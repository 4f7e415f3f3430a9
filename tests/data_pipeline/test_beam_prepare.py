"""Preparation as an Apache Beam pipeline (DirectRunner): the same shard names, bytes and
manifest as the local `prepare` (also when a whole shard fails and with a no_chest list), one
record per input, resumable, read by the input pipeline."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys

import numpy as np
import pytest

pytest.importorskip("apache_beam")

from data_pipeline import beam_prepare, input_pipeline  # noqa: E402
from data_pipeline.input_pipeline import report_text  # noqa: E402
from data_pipeline.prepare import Manifest, main, prepare_split, read_records  # noqa: E402
from data_pipeline.preprocess import PreprocessConfig  # noqa: E402
from data_pipeline.release import list_volumes  # noqa: E402
from data_pipeline.shard_plan import PROGRESS_DIR  # noqa: E402
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


@pytest.fixture(scope="module")
def quirky_release(release):
    """A copy of `release` where both inputs of train shard 0 fail (two truncated files)
    and ``no_chest_valid.txt`` excludes the first valid volume."""
    root = release["root"] / "quirky"
    shutil.copytree(release["release"], root)
    train = list_volumes(root, "train")
    with open(train[0].path, "r+b") as handle:
        handle.truncate(200)
    excluded = list_volumes(root, "valid")[0].volume_name
    (root / "dataset" / "no_chest_valid.txt").write_text(excluded.removesuffix(".nii.gz") + "\n")
    return {"release": str(root), "failed": [e.volume_name for e in train[:2]],
            "excluded": excluded}


def _assert_same_output(beam_dir, local_dir):
    """Same file names, same bytes, same manifest but for its creation time."""
    beam, local = Manifest.load(beam_dir).to_json(), Manifest.load(local_dir).to_json()
    assert beam.pop("created") and local.pop("created")
    assert beam == local
    names = sorted(os.listdir(beam_dir))
    assert names == sorted(os.listdir(local_dir)) == sorted(
        [shard["file"] for shard in beam["shards"]] + ["manifest.json"])
    for name in names:
        if name != "manifest.json":
            assert _sha256(os.path.join(beam_dir, name)) == _sha256(os.path.join(local_dir, name))


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
    manifest = Manifest.load(out)
    # Exactly one record per good input, one failure entry per bad one.
    assert manifest.num_records == release["num_train"] - 1
    names = [name for shard in manifest.shards for name in shard.volume_names]
    assert len(names) == len(set(names)) and release["corrupt"] not in names
    assert [f["volume_name"] for f in manifest.failed] == [release["corrupt"]]
    for shard, path in zip(manifest.shards, manifest.shard_paths()):
        assert shard.sha256 == _sha256(path) and shard.bytes == os.path.getsize(path)
    _assert_same_output(out, release["local"]["train"].directory)


def test_uncompressed_shards_are_the_same_from_beam_and_local(release, tmp_path):
    """--compression none reaches the Beam workers: same bytes as the local runner."""
    local = prepare_split(release["release"], "train", str(tmp_path / "local"), CONFIG,
                          records_per_shard=2, workers=1, progress=False, limit=3,
                          compression="none")
    beam = beam_prepare.prepare_split_beam(release["release"], "train",
                                           str(tmp_path / "beam"), CONFIG,
                                           records_per_shard=2, limit=3, compression="none")
    assert local.writer_options == beam.writer_options == "group_size:1,uncompressed"
    _assert_same_output(beam.directory, local.directory)


def test_whole_shard_failing_and_no_chest_list_give_local_names_bytes_and_manifest(
        quirky_release, tmp_path):
    for split in ("train", "valid"):
        local = prepare_split(quirky_release["release"], split, str(tmp_path / "local" / split),
                              CONFIG, records_per_shard=2, workers=1, progress=False)
        beam = beam_prepare.prepare_split_beam(quirky_release["release"], split,
                                               str(tmp_path / "beam" / split), CONFIG,
                                               records_per_shard=2)
        _assert_same_output(beam.directory, local.directory)
    train = Manifest.load(str(tmp_path / "beam" / "train"))
    # Shard 0 has no file; the others keep their planned index and count.
    assert [s.file for s in train.shards] == ["train-00001-of-00003.array_record",
                                              "train-00002-of-00003.array_record"]
    assert [f["volume_name"] for f in train.failed] == quirky_release["failed"]
    valid = Manifest.load(str(tmp_path / "beam" / "valid"))
    assert [e["volume_name"] for e in valid.excluded] == [quirky_release["excluded"]]
    assert "no_chest_valid.txt" in valid.excluded[0]["reason"] and valid.failed == []
    assert quirky_release["excluded"] not in valid.shards[0].volume_names


def test_rerun_after_a_kill_writes_only_the_unfinished_shards(release, monkeypatch):
    out = str(release["root"] / "beam_resume" / "train")
    ran, real_run = [], beam_prepare.run_pipeline

    def run_pipeline(store, todo, *args):
        ran.append([shard.index for shard in todo])
        # The first run "dies" after shards 1 and 2; a stray temporary file remains.
        real_run(store, todo[1:] if len(ran) == 1 else todo, *args)
        open(os.path.join(store.directory, f"{todo[0].file}.x.tmp"), "wb").close()

    monkeypatch.setattr(beam_prepare, "run_pipeline", run_pipeline)
    with pytest.raises(RuntimeError, match="without completing train-00000-of-00003"):
        beam_prepare.prepare_split_beam(release["release"], "train", out, CONFIG,
                                        records_per_shard=2)
    kept, damaged = (os.path.join(out, f"train-0000{i}-of-00003.array_record") for i in (1, 2))
    kept_inode = os.stat(kept).st_ino
    with open(damaged, "r+b") as handle:  # damaged since: no longer its recorded size
        handle.truncate(os.path.getsize(damaged) // 2)
    beam_prepare.prepare_split_beam(release["release"], "train", out, CONFIG,
                                    records_per_shard=2)
    assert ran == [[0, 1, 2], [0, 2]]
    assert os.stat(kept).st_ino == kept_inode  # not written again
    assert not os.path.exists(os.path.join(out, PROGRESS_DIR))
    _assert_same_output(out, release["local"]["train"].directory)


def test_input_pipeline_reads_the_beam_shards(release, tmp_path):
    out = str(release["root"] / "beam" / "valid")
    beam_prepare.prepare_split_beam(release["release"], "valid", out, CONFIG,
                                    records_per_shard=2)
    _assert_same_output(out, release["local"]["valid"].directory)  # no failures there
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
