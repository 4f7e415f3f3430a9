"""Tests of the synthetic CT-RATE release generator (real rendering, small volumes)."""

from __future__ import annotations

import csv
import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from data_pipeline.schema import (
    ABNORMALITIES, METADATA_COLUMNS, REPORT_COLUMNS, SPLIT_FILES, parse_volume_name,
    parse_xy_spacing)
from data_pipeline.synthetic import PREVALENCES, RENDERINGS, generate_release, render_volume
from data_pipeline.synthetic.abnormalities import RENDERERS
from data_pipeline.synthetic.conspicuity import DEMO_CONSPICUITY
from data_pipeline.synthetic.labels import draw_labels, label_probabilities
from data_pipeline.synthetic.release import main, save_nifti, to_stored
from data_pipeline.synthetic.reports import (
    FILLER, NEGATIVE_TEMPLATES, NORMAL_IMPRESSIONS, POSITIVE_TEMPLATES, canonical, write_report)

NUM_VOLUMES = 16
SEED = 3
NEGATION = re.compile(r"\b(no|not|without)\b", re.IGNORECASE)
# Rendering grid for the per-abnormality tests: 2 x 2 x 2 blocks of it are exactly the
# demo's 5.6 x 5.6 x 11.25 mm voxels.
FINE_SHAPE, FINE_SPACING = (128, 128, 64), (2.8, 2.8, 5.625)


def _read_csv(path) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames), list(reader)


def _tree_bytes(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    return generate_release(out, NUM_VOLUMES, SEED, workers=1)


@pytest.fixture(scope="module")
def tables(release):
    """Per split: (metadata rows, report rows, label rows), each keyed by VolumeName."""
    result = {}
    for split, files in SPLIT_FILES.items():
        parts = []
        for folder, key in (("metadata", "metadata"), ("radiology_text_reports", "reports"),
                            ("multi_abnormality_labels", "labels")):
            _, rows = _read_csv(release.root / folder / files[key])
            parts.append({row["VolumeName"]: row for row in rows})
        result[split] = tuple(parts)
    return result


def _volumes(release, tables):
    """Yields (split, VolumeName, nibabel image, metadata row) for every volume."""
    for split, (metadata, _, _) in tables.items():
        for name, row in metadata.items():
            path = release.root / parse_volume_name(name).relative_path(
                SPLIT_FILES[split]["volumes"])
            yield split, name, nib.load(path), row


# ----------------------------------------------------------------------------------
# Layout and CSVs
# ----------------------------------------------------------------------------------


def test_layout_and_csv_columns(release):
    root = release.root
    assert root.name == "dataset"
    assert release.num_train + release.num_valid == NUM_VOLUMES
    assert release.num_train > 0 and release.num_valid > 0
    for split, files in SPLIT_FILES.items():
        columns, rows = _read_csv(root / "metadata" / files["metadata"])
        assert tuple(columns) == METADATA_COLUMNS
        assert [r["VolumeName"] for r in rows] == release.volume_names[split]
        columns, rows = _read_csv(root / "radiology_text_reports" / files["reports"])
        assert tuple(columns) == REPORT_COLUMNS
        assert [r["VolumeName"] for r in rows] == release.volume_names[split]
        columns, rows = _read_csv(root / "multi_abnormality_labels" / files["labels"])
        assert tuple(columns) == ("VolumeName",) + ABNORMALITIES
        assert [r["VolumeName"] for r in rows] == release.volume_names[split]
        assert all(row[name] in ("0", "1") for row in rows for name in ABNORMALITIES)
        files_on_disk = {p.name for p in (root / files["volumes"]).rglob("*.nii.gz")}
        assert files_on_disk == set(release.volume_names[split])
    assert len(release.volume_names["train"]) == release.num_train


def test_volume_names_match_paths_and_numbering(release):
    for split, names in release.volume_names.items():
        patients = set()
        for name in names:
            ids = parse_volume_name(name)
            assert ids.split == split
            assert (release.root / ids.relative_path(SPLIT_FILES[split]["volumes"])).is_file()
            assert ids.scan in ("a", "b") and ids.reconstruction in (1, 2)
            patients.add(ids.patient)
        assert patients == set(range(1, len(patients) + 1))  # numbering starts at 1 per split
    assert not set(release.volume_names["train"]) & set(release.volume_names["valid"])


def test_patient_level_split_and_scan_grouping(release, tables):
    num_patients = sum(release.num_patients.values())
    assert release.num_patients["valid"] == round(0.2 * num_patients)
    for split, (metadata, reports, labels) in tables.items():
        by_scan, sex_by_patient = {}, {}
        for name in metadata:
            ids = parse_volume_name(name)
            by_scan.setdefault(ids.scan_id, []).append(name)
            sex_by_patient.setdefault(ids.patient_id, set()).add(metadata[name]["PatientSex"])
        assert all(len(sexes) == 1 for sexes in sex_by_patient.values())
        for names in by_scan.values():  # reconstructions share labels and report ...
            assert len({tuple(labels[n].values())[1:] for n in names}) == 1
            assert len({reports[n]["Findings_EN"] for n in names}) == 1
            if len(names) == 2:  # ... but not spacing and kernel
                first, second = (metadata[n] for n in names)
                assert first["ZSpacing"] != second["ZSpacing"]
                assert first["ConvolutionKernel"] != second["ConvolutionKernel"]


# ----------------------------------------------------------------------------------
# Volumes
# ----------------------------------------------------------------------------------


def test_header_matches_metadata_and_carries_no_scaling(release, tables):
    for _, _, image, row in _volumes(release, tables):
        xy, _ = parse_xy_spacing(row["XYSpacing"])
        z = float(row["ZSpacing"])
        assert image.shape == (int(row["Rows"]), int(row["Columns"]), int(row["NumberofSlices"]))
        np.testing.assert_allclose(image.header.get_zooms(), (xy, xy, z), rtol=1e-5)
        np.testing.assert_allclose(image.affine, np.diag([xy, xy, z, 1.0]), rtol=1e-5)
        assert image.get_data_dtype() == np.int16
        assert np.isnan(image.header["scl_slope"]) and np.isnan(image.header["scl_inter"])
        assert float(row["ReconstructionDiameter"]) == pytest.approx(xy * image.shape[1])


def test_spacing_differs_between_volumes_and_is_anisotropic(release, tables):
    spacings = [(float(parse_xy_spacing(row["XYSpacing"])[0]), float(row["ZSpacing"]))
                for split in tables.values() for row in split[0].values()]
    assert len(set(spacings)) == len(spacings)
    for xy, z in spacings:
        assert 4.2 <= xy <= 5.2 and 5.0 <= z <= 9.0 and z != xy


def test_hu_after_rescale_is_realistic(release, tables):
    for _, name, image, row in _volumes(release, tables):
        stored = np.asarray(image.dataobj)
        hu = stored * float(row["RescaleSlope"]) + float(row["RescaleIntercept"])
        np.testing.assert_array_equal(image.get_fdata(), stored)  # no header scaling
        assert hu.min() >= -1024 and hu.max() <= 3071
        assert abs(hu[:6, :6, :].mean() + 1000) < 15, name  # air in the corner
        assert hu.max() > 300, name  # bone
        lung_like = np.mean((hu > -950) & (hu < -750))
        assert lung_like > 0.01, name
        soft = np.mean((hu > 0) & (hu < 80))
        assert soft > 0.1, name


def test_stored_values_follow_the_intercept(tmp_path):
    hu = np.array([[[-1000.0, 40.0], [400.0, 3000.0]]], np.float32)
    for intercept in (-1024.0, -8192.0):
        path = tmp_path / f"v{int(-intercept)}.nii.gz"
        save_nifti(path, to_stored(hu, 1.0, intercept), (0.7, 0.7, 1.5))
        stored = nib.load(path).get_fdata()
        np.testing.assert_array_equal(stored, hu - intercept)


def test_render_hu_realism_and_orientation():
    shape = (80, 80, 48)
    volume, masks = render_volume(np.zeros(18), np.random.default_rng(0), shape,
                                  (4.5, 4.5, 6.5), return_masks=True)
    assert volume.shape == shape and volume.dtype == np.float32
    anterior_air = ~masks["body"] & (np.arange(shape[0]) < shape[0] // 2)[:, None, None]
    assert abs(volume[anterior_air].mean() + 1000) < 5
    assert -900 < volume[masks["parenchyma"]].mean() < -800
    assert np.median(volume[masks["bone"]]) > 300
    heart = masks["heart"]
    assert 20 < np.median(volume[heart]) < 60
    # Orientation: heart anterior, left and in the lower half; spine posterior;
    # lungs wider at the base than at the apex.
    rows, cols, slices = (np.nonzero(heart)[a].mean() for a in range(3))
    assert rows < shape[0] / 2 and cols > shape[1] / 2 and slices < shape[2] / 2
    assert np.nonzero(masks["bone"])[0].mean() > shape[0] / 2
    lung_area = masks["lungs"].sum((0, 1))
    lung_slices = np.nonzero(lung_area)[0]
    lower, upper = np.array_split(lung_slices, 2)
    assert lung_area[lower].mean() > lung_area[upper[-3:]].mean()


@pytest.fixture(scope="module")
def normal_render():
    return render_volume(np.zeros(18), np.random.default_rng(SEED), FINE_SHAPE, FINE_SPACING)


def _demo_grid(volume):
    """2 x 2 x 2 block means: the demo's 5.6 x 5.6 x 11.25 mm voxels."""
    h, w, d = (n // 2 for n in volume.shape)
    return volume.reshape(h, 2, w, 2, d, 2).mean((1, 3, 5))


@pytest.mark.parametrize("index", range(len(ABNORMALITIES)), ids=list(ABNORMALITIES))
def test_each_abnormality_is_visible_in_its_region(index, normal_render):
    name = ABNORMALITIES[index]
    labels = np.zeros(18)
    labels[index] = 1
    volume, masks = render_volume(labels, np.random.default_rng(SEED), FINE_SHAPE,
                                  FINE_SPACING, return_masks=True)
    diff = np.abs(volume - normal_render)
    changed = diff > 50
    changed_cm3 = changed.sum() * np.prod(FINE_SPACING) / 1000
    assert changed_cm3 > 1.0, f"{name} changes only {changed_cm3:.2f} cm3"
    assert diff[changed].mean() > 90
    region = ndimage.binary_dilation(masks[RENDERERS[name].region], iterations=2)
    inside = changed[region].sum() / changed.sum()
    assert inside > 0.95, f"{name}: {inside:.0%} of the change in {RENDERERS[name].region}"
    coarse = np.abs(_demo_grid(volume) - _demo_grid(normal_render))
    assert (coarse > 50).sum() >= 20, f"{name} does not survive the demo grid"


def test_conspicuity_one_is_the_realistic_rendering():
    args = (np.eye(18)[9] + np.eye(18)[12], (40, 40, 20), (9.0, 9.0, 15.0))
    default = render_volume(args[0], np.random.default_rng(5), *args[1:])
    explicit = render_volume(args[0], np.random.default_rng(5), *args[1:], conspicuity=1.0)
    np.testing.assert_array_equal(default, explicit)
    with pytest.raises(ValueError, match="conspicuity"):
        render_volume(args[0], np.random.default_rng(5), *args[1:], conspicuity=0.5)


@pytest.mark.parametrize("name", ["Lung nodule", "Emphysema", "Lymphadenopathy",
                                  "Coronary artery wall calcification"])
def test_conspicuity_exaggerates_the_finding(name):
    """The demo's conspicuity changes more voxels, by more HU, than the realistic one."""
    labels = np.eye(18)[ABNORMALITIES.index(name)]

    def change(conspicuity):
        kwargs = dict(noise_sigma=0.0, conspicuity=conspicuity)
        normal = render_volume(np.zeros(18), np.random.default_rng(SEED), FINE_SHAPE,
                               FINE_SPACING, **kwargs)
        finding = render_volume(labels, np.random.default_rng(SEED), FINE_SHAPE,
                                FINE_SPACING, **kwargs)
        return np.abs(_demo_grid(finding) - _demo_grid(normal)).sum()

    assert change(DEMO_CONSPICUITY) > 1.3 * change(1.0), name


def test_renderings_are_documented_for_every_abnormality():
    assert tuple(RENDERINGS) == ABNORMALITIES
    assert all(len(text) > 20 for text in RENDERINGS.values())


def test_same_seed_same_volume():
    args = (np.eye(18)[9], (40, 40, 20), (9.0, 9.0, 15.0))
    first = render_volume(args[0], np.random.default_rng(5), *args[1:])
    second = render_volume(args[0], np.random.default_rng(5), *args[1:])
    other = render_volume(args[0], np.random.default_rng(6), *args[1:])
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)


# ----------------------------------------------------------------------------------
# Labels and reports
# ----------------------------------------------------------------------------------


def test_label_prevalences_and_min_prevalence():
    rng = np.random.default_rng(0)
    draws = np.array([draw_labels(rng, rng.uniform(25, 90)) for _ in range(6000)])
    for name, target in PREVALENCES.items():
        assert abs(draws[:, ABNORMALITIES.index(name)].mean() - target) < 0.03, name
    raised = np.array([draw_labels(rng, rng.uniform(25, 90), 0.3) for _ in range(3000)])
    assert raised.mean(0).min() > 0.27
    assert label_probabilities(30.0)[1] < label_probabilities(80.0)[1]  # age-driven


def test_templates_use_canonical_names():
    for name, templates in POSITIVE_TEMPLATES.items():
        assert "{Name} is present." in templates
        with_name = [t for t in templates if "{name}" in t.lower()]
        assert len(with_name) * 2 >= len(templates), name
        assert not any(NEGATION.search(t) for t in templates), name
    assert "{Name} is not present." in NEGATIVE_TEMPLATES
    for text, _ in FILLER:
        assert not any(canonical(n) in text.lower() for n in ABNORMALITIES)


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=\.)\s+", text) if s]


def _check_report(report: dict, labels) -> None:
    positives = {n for n, v in zip(ABNORMALITIES, labels) if int(v)}
    fillers = {text for text, _ in FILLER}
    findings = _sentences(report["Findings_EN"])
    positive_sentences = [s for s in findings if s not in fillers and not NEGATION.search(s)]
    assert len(positive_sentences) == len(positives)
    for sentence in findings:
        named = [n for n in ABNORMALITIES if canonical(n).lower() in sentence.lower()]
        if NEGATION.search(sentence):
            assert not set(named) & positives, f"positive negated: {sentence}"
    for name in positives:
        assert name.lower() in report["Impressions_EN"].lower()
    if not positives:
        assert "no" in report["Impressions_EN"].lower()


def test_reports_mention_positives_and_negate_only_negatives():
    rng = np.random.default_rng(1)
    for _ in range(300):
        labels = (rng.random(18) < 0.3).astype(int)
        _check_report(write_report(labels, rng), labels)


def test_release_reports_agree_with_labels(tables):
    for _, reports, labels in tables.values():
        for name, report in reports.items():
            _check_report(report, [labels[name][a] for a in ABNORMALITIES])
            assert report["ClinicalInformation_EN"] and report["Technique_EN"]


# ----------------------------------------------------------------------------------
# Determinism, options and the command line
# ----------------------------------------------------------------------------------


def test_same_seed_gives_identical_files(release, tmp_path):
    again = generate_release(tmp_path / "again", NUM_VOLUMES, SEED, workers=2)
    assert _tree_bytes(again.root) == _tree_bytes(release.root)
    other = generate_release(tmp_path / "other", 4, SEED + 1, workers=1)
    _, rows = _read_csv(other.root / "metadata" / "train_metadata.csv")
    _, ours = _read_csv(release.root / "metadata" / "train_metadata.csv")
    assert rows[0]["ZSpacing"] != ours[0]["ZSpacing"]


def test_realistic_size_options(tmp_path):
    summary = generate_release(tmp_path, 1, 0, valid_fraction=0.0, matrix=96,
                               xy_spacing_range=(0.6, 0.8), z_spacing_range=(1.0, 1.5),
                               length_mm_range=(40.0, 50.0), workers=1)
    assert (summary.num_train, summary.num_valid) == (1, 0)
    name = summary.volume_names["train"][0]
    image = nib.load(summary.root / parse_volume_name(name).relative_path())
    xy, _, z = image.header.get_zooms()
    assert image.shape[:2] == (96, 96) and 0.6 <= xy <= 0.8 and 1.0 <= z <= 1.5
    assert 40 <= image.shape[2] * z <= 51


def test_refuses_to_overwrite_a_foreign_dataset(tmp_path):
    (tmp_path / "dataset" / "train").mkdir(parents=True)
    (tmp_path / "dataset" / "train" / "real.nii.gz").write_bytes(b"x")
    with pytest.raises(FileExistsError):
        generate_release(tmp_path, 2, workers=1)
    assert (tmp_path / "dataset" / "train" / "real.nii.gz").exists()


def test_regenerating_replaces_an_earlier_synthetic_release(tmp_path):
    generate_release(tmp_path, 6, 0, workers=1)
    summary = generate_release(tmp_path, 2, 0, workers=1)
    on_disk = {p.name for p in (tmp_path / "dataset").rglob("*.nii.gz")}
    assert on_disk == set(summary.volume_names["train"] + summary.volume_names["valid"])


def test_command_line(tmp_path, capsys):
    summary = main(["--out", str(tmp_path / "a"), "--num-volumes", "3", "--seed", "2",
                    "--min-prevalence", "0.5", "--workers", "1"])
    assert "3 volumes" in capsys.readouterr().out
    assert summary.num_train + summary.num_valid == 3
    result = subprocess.run(
        [sys.executable, "-m", "data_pipeline.synthetic", "--out", str(tmp_path / "b"),
         "--num-volumes", "2", "--seed", "2", "--workers", "1"],
        capture_output=True, text=True, check=True)
    assert "2 volumes" in result.stdout


def test_statement_keys_name_each_finding_sentence_and_its_polarity():
    from data_pipeline.input_pipeline import report_sentences
    from data_pipeline.synthetic.statements import statement_key

    rng = np.random.default_rng(5)
    fillers = {text.lower() for text, _ in FILLER}
    for _ in range(200):
        labels = (rng.random(18) < 0.3).astype(int)
        report = write_report(labels, rng, negation_fraction=0.5)
        text = f"{report['Findings_EN']} {report['Impressions_EN']}".replace("(", "")
        keys = [statement_key(s) for s in report_sentences(text.replace(")", ""))]
        stated = [k for k in keys if ": " in k]
        for key in stated:
            name, polarity = key.split(": ")
            assert labels[ABNORMALITIES.index(name)] == (polarity == "present"), key
        present = {k.split(": ")[0] for k in stated if k.endswith("present")}
        assert present == {n for n, v in zip(ABNORMALITIES, labels) if v}
        assert {k for k in keys if ": " not in k} <= fillers | {
            s.lower() for s in NORMAL_IMPRESSIONS}
    assert statement_key("No evidence of pleural effusion was seen.") == \
        statement_key("Pleural effusion is not present.") == "Pleural effusion: absent"
