"""The Grain input pipeline: normalisation, batches, resumable state, host sharding."""

import dataclasses

import numpy as np
import pytest

from data_pipeline import input_pipeline, schema
from data_pipeline.prepare import Manifest


@pytest.fixture(scope="module")
def config(tiny_synthetic_data):
    return input_pipeline.PipelineConfig(
        shard_dir=tiny_synthetic_data.shard_dir("train"),
        tokenizer_path=tiny_synthetic_data.tokenizer_path, global_batch_size=4,
        max_text_length=32, seed=3)


def test_normalise_hu_is_the_official_clip_and_divide():
    hu = np.array([-3000, -1000, -500, 0, 40, 1000, 2500], np.int16)
    np.testing.assert_allclose(input_pipeline.normalise_hu(hu),
                               np.clip(hu, -1000, 1000) / 1000.0, rtol=0, atol=1e-7)
    np.testing.assert_allclose(input_pipeline.normalise_hu(hu, (-160, 240))[[3, 4]],
                               [-0.2, 0.0], atol=1e-7)


def test_batches_have_the_documented_shapes(config, tiny_synthetic_data):
    batch = next(iter(input_pipeline.make_train_dataset(config)))
    assert batch["volume"].shape == (4, 8, 16, 16) and batch["volume"].dtype == np.float32
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, 32)
    assert batch["labels"].shape == (4, schema.NUM_ABNORMALITIES)
    assert set(batch["volume_name"]) <= set(
        name for shard in Manifest.load(tiny_synthetic_data.shard_dir("train")).shards
        for name in shard.volume_names)
    assert batch["input_ids"][:, 0].tolist() == [batch["input_ids"][0, 0]] * 4  # [CLS]


def test_every_record_once_per_epoch_and_reshuffled_between_epochs(config):
    count = sum(s.num_records for s in Manifest.load(config.shard_dir).shards)
    single = dataclasses.replace(config, global_batch_size=1)
    names = [str(b["volume_name"][0]) for b, _ in zip(
        input_pipeline.make_train_dataset(single), range(2 * count))]
    first, second = names[:count], names[count:]
    assert len(set(first)) == count and sorted(first) == sorted(second)
    assert first != second


def test_iterator_state_round_trip_resumes_exactly(config):
    iterator = iter(input_pipeline.make_train_dataset(config))
    for _ in range(3):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(4)]
    resumed = iter(input_pipeline.make_train_dataset(config))
    resumed.set_state(state)
    for want, got in zip(expected, (next(resumed) for _ in range(4))):
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])


def test_two_hosts_get_disjoint_halves_of_the_same_global_batches(config):
    single = iter(input_pipeline.make_train_dataset(config))
    hosts = [iter(input_pipeline.make_train_dataset(config, process_index=i, process_count=2))
             for i in range(2)]
    for _ in range(5):
        whole = next(single)
        halves = [next(h) for h in hosts]
        assert all(len(h["volume_name"]) == 2 for h in halves)
        np.testing.assert_array_equal(
            np.concatenate([h["volume_name"] for h in halves]), whole["volume_name"])
        np.testing.assert_array_equal(
            np.concatenate([h["volume"] for h in halves]), whole["volume"])


def test_eval_batches_cover_each_record_once_with_padding_marked(config):
    count = sum(s.num_records for s in Manifest.load(config.shard_dir).shards)
    batches = list(input_pipeline.iterate_eval_batches(
        dataclasses.replace(config, global_batch_size=5)))
    valid = np.concatenate([b["valid"] for b in batches])
    names = np.concatenate([b["volume_name"] for b in batches])[valid]
    assert len(names) == len(set(names)) == count
    assert all(len(b["valid"]) == 5 for b in batches) and (~valid).sum() == (-count) % 5


def test_sentence_sampling_keeps_a_non_empty_ordered_subset():
    text = "Cardiomegaly is present. No pleural effusion. Lung nodule is present."
    rng = np.random.default_rng(0)
    sentences = text.split(". ")
    for _ in range(20):
        sample = input_pipeline.sample_sentences(text, rng)
        kept = [s.rstrip(".") for s in sample.split(". ")]
        assert kept and all(k.rstrip(".") in [s.rstrip(".") for s in sentences] for k in kept)
        positions = [[s.rstrip(".") for s in sentences].index(k) for k in kept]
        assert positions == sorted(positions)


def test_report_text_uses_the_configured_sections_and_strips_like_the_official_code():
    record = schema.CTRecord(np.zeros((1, 1, 1), np.int16), "train_1_a_1.nii.gz",
                             findings='A "small" (5 mm) nodule.', impressions="Nodule.")
    assert input_pipeline.report_text(record) == "A small 5 mm nodule."
    assert input_pipeline.report_text(record, ("findings", "impressions")) == \
        "A small 5 mm nodule. Nodule."
    with pytest.raises(ValueError, match="unknown report sections"):
        input_pipeline.report_text(record, ("history",))


@pytest.fixture(scope="module")
def shards_with_a_bad_record(tiny_synthetic_data, tmp_path_factory):
    """A copy of the train shards whose record 1 of the first shard is garbage (the
    manifest unchanged, as if the file had been damaged after preparation)."""
    import shutil

    from array_record.python.array_record_module import ArrayRecordWriter

    from data_pipeline.prepare import WRITER_OPTIONS

    directory = tmp_path_factory.mktemp("bad_shards")
    shutil.copytree(tiny_synthetic_data.shard_dir("train"), directory, dirs_exist_ok=True)
    manifest = Manifest.load(directory)
    first = manifest.shard_paths()[0]
    source = input_pipeline.grain.sources.ArrayRecordDataSource([first])
    records = [source[i] for i in range(len(source))]
    records[1] = b"not a CT-RATE record"
    writer = ArrayRecordWriter(first, WRITER_OPTIONS)
    for record in records:
        writer.write(record)
    writer.close()
    return str(directory), manifest.shards[0].file, manifest.shards[0].volume_names[1]


def test_bad_record_stops_with_its_shard_index_and_volume(config, shards_with_a_bad_record):
    directory, shard_file, volume_name = shards_with_a_bad_record
    count = sum(s.num_records for s in Manifest.load(directory).shards)
    single = dataclasses.replace(config, shard_dir=directory, global_batch_size=1)
    with pytest.raises(input_pipeline.BadRecordError,
                       match=rf"record 1 of shard .*{shard_file} \({volume_name}\)"):
        for _, _ in zip(input_pipeline.make_train_dataset(single), range(count)):
            pass


def test_bad_record_skipped_is_replaced_and_marked(config, shards_with_a_bad_record):
    directory, _, volume_name = shards_with_a_bad_record
    count = sum(s.num_records for s in Manifest.load(directory).shards)
    single = dataclasses.replace(config, shard_dir=directory, global_batch_size=1,
                                 bad_records="skip")
    batches = [b for b, _ in zip(input_pipeline.make_train_dataset(single), range(count))]
    names = [str(b["volume_name"][0]) for b in batches]
    substituted = [bool(b["substituted"][0]) for b in batches]
    assert len(batches) == count and sum(substituted) == 1
    assert volume_name not in names  # its place was taken by the next readable record
    with pytest.raises(ValueError, match="bad_records"):
        input_pipeline.RecordToExample(None, ("findings",), (-1000, 1000), bad_records="drop")


# ----------------------------------------------------------------------------------
# Augmentation, hosts, worker processes
# ----------------------------------------------------------------------------------

from data_pipeline.augment import VolumeAugmentation  # noqa: E402

AUGMENT = VolumeAugmentation(crop_shape=(6, 12, 12), flip_axes=(0, 1), intensity_scale=0.1,
                             intensity_shift=0.05)


def _batches(config, count, **kwargs):
    iterator = iter(input_pipeline.make_train_dataset(config, **kwargs))
    return [next(iterator) for _ in range(count)]


def _records_by_name(shard_dir):
    from data_pipeline.prepare import read_records

    return {r.volume_name: r for r in read_records(shard_dir)}


def test_augmentation_is_off_by_default_and_changes_nothing_when_empty(config):
    plain = _batches(config, 2)
    empty = _batches(dataclasses.replace(config, augmentation=VolumeAugmentation()), 2)
    for want, got in zip(plain, empty):
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])


def test_augmentation_crops_flips_and_jitters_deterministically(config):
    augmented = dataclasses.replace(config, augmentation=AUGMENT)
    first, again, plain = _batches(augmented, 3), _batches(augmented, 3), _batches(config, 3)
    records = _records_by_name(config.shard_dir)
    flips = set()
    for batch, repeat, reference in zip(first, again, plain):
        for key in batch:  # same seed, same records: same augmentation
            np.testing.assert_array_equal(batch[key], repeat[key])
        # Augmentation draws after the text, so the texts are untouched.
        np.testing.assert_array_equal(batch["input_ids"], reference["input_ids"])
        assert batch["volume"].shape == (4, 6, 12, 12)
        for name, volume in zip(batch["volume_name"], batch["volume"]):
            original = input_pipeline.normalise_hu(records[str(name)].volume_hu)
            match = _find_window(original, volume)
            assert match is not None, f"{name}: not a flipped crop of its record"
            flips.add(match)
    assert len(flips) > 1  # the flips are random


def _find_window(original, volume):
    """(flip d, flip h) of the crop of `original` that `volume` is an affine image of."""
    d, h, w = volume.shape
    for flip_d in (False, True):
        for flip_h in (False, True):
            flipped = original[::-1 if flip_d else 1, ::-1 if flip_h else 1]
            for z in range(original.shape[0] - d + 1):
                for y in range(original.shape[1] - h + 1):
                    for x in range(original.shape[2] - w + 1):
                        window = flipped[z:z + d, y:y + h, x:x + w].ravel()
                        inside = np.abs(volume.ravel()) < 0.999  # not clipped by the jitter
                        if window[inside].std() == 0:
                            continue
                        scale, shift = np.polyfit(window[inside], volume.ravel()[inside], 1)
                        if (abs(scale - 1) <= 0.1 + 1e-4 and abs(shift) <= 0.05 + 1e-4
                                and np.allclose(window[inside] * scale + shift,
                                                volume.ravel()[inside], atol=1e-5)):
                            return flip_d, flip_h
    return None


def test_evaluation_takes_the_centre_crop(config):
    augmented = dataclasses.replace(config, augmentation=AUGMENT)
    batch = next(input_pipeline.iterate_eval_batches(augmented))
    records = _records_by_name(config.shard_dir)
    name, volume = str(batch["volume_name"][0]), batch["volume"][0]
    np.testing.assert_array_equal(
        volume, input_pipeline.normalise_hu(records[name].volume_hu[1:7, 2:14, 2:14]))


def test_iterator_state_round_trip_with_augmentation(config):
    augmented = dataclasses.replace(config, augmentation=AUGMENT)
    iterator = iter(input_pipeline.make_train_dataset(augmented))
    next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(2)]
    resumed = iter(input_pipeline.make_train_dataset(augmented))
    resumed.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(want["volume"], next(resumed)["volume"])


def test_two_hosts_are_disjoint_and_complete_over_an_epoch(config):
    count = sum(s.num_records for s in Manifest.load(config.shard_dir).shards)
    steps = count // config.global_batch_size
    hosts = [[str(n) for b in _batches(config, steps, process_index=i, process_count=2)
              for n in b["volume_name"]] for i in range(2)]
    assert len(hosts[0]) == len(hosts[1]) == steps * config.global_batch_size // 2
    assert not set(hosts[0]) & set(hosts[1])
    everything = set(hosts[0]) | set(hosts[1])
    assert len(everything) == steps * config.global_batch_size  # each record once
    all_names = {n for s in Manifest.load(config.shard_dir).shards for n in s.volume_names}
    assert everything <= all_names and len(all_names - everything) == count % \
        config.global_batch_size


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(config):
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    threads = _batches(config, 3)
    processes = _batches(dataclasses.replace(config, num_workers=2), 3)
    for want, got in zip(threads, processes):
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])


def test_batch_level_normalisation_is_bitwise_the_per_example_path(config):
    """The pipeline normalises (and jitters) int16 views straight into the batch buffer;
    that must equal normalising each volume on its own and stacking, bit for bit."""
    from data_pipeline.tokenizer import TextEncoder

    window = (-160.5, 240.0)  # a centre and a non-integer bound exercise every step
    records = list(_records_by_name(config.shard_dir).values())[:3]
    to_example = input_pipeline.RecordToExample(
        TextEncoder.from_path(config.tokenizer_path, 32), ("findings",), window,
        augmentation=AUGMENT)
    examples = [to_example(schema.encode_record(r), np.random.default_rng(i))
                for i, r in enumerate(records)]
    batch = input_pipeline.BatchExamples(window)(examples)
    one_by_one = []
    for i, record in enumerate(records):
        rng = np.random.default_rng(i)
        rng.random()  # the text draw (sentence sampling) comes first
        one_by_one.append(AUGMENT(record.volume_hu, rng,
                                  lambda view: input_pipeline.normalise_hu(view, window)))
    assert batch["volume"].dtype == np.float32
    assert batch["volume"].tobytes() == np.stack(one_by_one).tobytes()
    assert all(e["volume_hu"].dtype == np.int16 for e in examples)  # no early float copy
    reference = records[0].volume_hu.astype(np.float32)
    reference = (np.clip(reference, np.float32(-160.5), np.float32(240.0))
                 - np.float32(39.75)) * (np.float32(1) / np.float32(200.25))
    out = np.full(records[0].volume_hu.shape, np.nan, np.float32)
    assert input_pipeline.normalise_hu(records[0].volume_hu, window, out=out) is out
    assert out.tobytes() == reference.tobytes()


def test_int16_batches_normalised_on_the_device_equal_the_host_batches(config):
    """`normalise_on_device`: batches carry the stored int16 voxels (half the bytes), and
    `schema.model_volume` inside jit gives the host pipeline's float32 volume (bitwise
    without jitter; jitter within float32 rounding), with every other field the same."""
    import jax

    to_model = jax.jit(lambda batch: schema.model_volume(batch, (-160.5, 240.0)))
    for augmentation in (None, AUGMENT):
        host_config = dataclasses.replace(config, hu_window=(-160.5, 240.0),
                                          augmentation=augmentation)
        device_config = dataclasses.replace(host_config, normalise_on_device=True)
        for host, device in zip(_batches(host_config, 2), _batches(device_config, 2)):
            assert "volume" not in device and device["volume_hu"].dtype == np.int16
            assert ("intensity_jitter" in device) == (augmentation is not None)
            arrays = {k: v for k, v in device.items() if k != "volume_name"}
            volume = np.asarray(to_model(arrays))
            if augmentation is None:
                assert volume.tobytes() == host["volume"].tobytes()
            else:
                np.testing.assert_allclose(volume, host["volume"], rtol=0, atol=2e-7)
            for key in host.keys() - {"volume"}:
                np.testing.assert_array_equal(device[key], host[key])
    # Evaluation batches stay float32 `volume` whatever the setting.
    evaluation = next(input_pipeline.iterate_eval_batches(
        dataclasses.replace(config, normalise_on_device=True)))
    assert evaluation["volume"].dtype == np.float32


def test_sentence_views_and_statement_keys(config):
    views = dataclasses.replace(config, sentence_views=3, sentence_view_length=24,
                                sentence_keys="synthetic_statement")
    plain = next(iter(input_pipeline.make_train_dataset(config)))
    batch = next(iter(input_pipeline.make_train_dataset(views)))
    assert batch["sentence_ids"].shape == batch["sentence_mask"].shape == (4, 3, 24)
    assert batch["sentence_keys"].shape == (4, 3) and batch["report_keys"].shape == (4, 64)
    for name in ("volume", "input_ids", "labels"):  # the other draws are unchanged
        np.testing.assert_array_equal(batch[name], plain[name])
    # Every view's statement is among its own report's statements.
    for keys, report in zip(batch["sentence_keys"], batch["report_keys"]):
        assert set(keys.tolist()) <= set(report.tolist()) - {-1}
    # Views are single sentences: one full stop each.
    from data_pipeline.tokenizer import TextEncoder
    tokenizer = TextEncoder.from_path(config.tokenizer_path, 24).tokenizer
    for ids in batch["sentence_ids"].reshape(-1, 24):
        assert tokenizer.decode(ids.tolist()).count(".") == 1
    with pytest.raises(ValueError, match="sentence_keys"):
        input_pipeline.sentence_key_fn("labels")
