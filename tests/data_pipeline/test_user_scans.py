"""A user's own scans: real DICOM series written by pydicom, real NIfTI written by nibabel."""

import os

import nibabel as nib
import numpy as np
import pytest

from data_pipeline import schema
from data_pipeline.prepare import Manifest, main, read_records
from data_pipeline.preprocess import PreprocessConfig, preprocess_volume
from data_pipeline.user_scans import (
    find_user_scans,
    iter_user_volumes,
    load_user_scan,
)

CONFIG = PreprocessConfig(target_spacing_mm=(3.0, 1.5, 1.5), target_shape=(10, 12, 12),
                          min_slices=6)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # normal +z
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # normal (-1, 0, 0)


def write_series(folder, hu_drc, *, slope, intercept, z_spacing, orientation=AXIAL,
                 pixel_spacing=(0.7, 0.8), seed=0, uid=None, prefix="IM"):
    """Writes HU volume [D, Rows, Columns] as one CT slice per file, under shuffled file
    names and instance numbers, slice d at distance d * z_spacing along the normal."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    os.makedirs(folder, exist_ok=True)
    uid = uid or generate_uid()
    normal = np.cross(orientation[:3], orientation[3:])
    stored = np.round((hu_drc - intercept) / slope).astype(np.int16)
    assert np.array_equal(stored * slope + intercept, hu_drc)  # exactly representable
    order = np.random.default_rng(seed).permutation(len(hu_drc))
    for file_index, depth in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "CT", uid, "1.2.3"
        ds.InstanceNumber = int(file_index + 1)  # deliberately not the slice order
        ds.Rows, ds.Columns = hu_drc.shape[1:]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation, ds.SamplesPerPixel = 1, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        origin = np.array([-90.0, -110.0, 40.0])
        ds.ImagePositionPatient = [float(v) for v in origin + depth * z_spacing * normal]
        ds.ImageOrientationPatient = list(orientation)
        ds.PixelSpacing = list(pixel_spacing)
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = np.ascontiguousarray(stored[depth], "<i2").tobytes()
        ds.save_as(os.path.join(folder, f"{prefix}{file_index * 7919 % 1000:04d}"),
                   enforce_file_format=True)
    return uid


def _hu(shape, seed):
    """Random HU with air, in steps of 2 (exact with slope 2)."""
    values = np.random.default_rng(seed).integers(-520, 600, size=shape) * 2
    values[:, 0, :] = -1000
    return values.astype(np.float32)


@pytest.mark.parametrize("orientation", [AXIAL, SAGITTAL], ids=["axial", "sagittal"])
def test_dicom_series_gives_hu_in_position_order_and_header_spacing(tmp_path, orientation):
    hu = _hu((14, 20, 18), seed=1)
    write_series(tmp_path / "series", hu, slope=2.0, intercept=-1024.0, z_spacing=2.5,
                 orientation=orientation)
    (scan,) = find_user_scans(str(tmp_path / "series"))
    assert scan.kind == "dicom" and scan.volume_name == "series" and len(scan.files) == 14
    volume, spacing, info = load_user_scan(scan)
    np.testing.assert_array_equal(volume, hu)  # slices by position, not by file name
    assert spacing == pytest.approx((2.5, 0.7, 0.8))
    assert info["slope_intercept_applied"] == [2.0, -1024.0]

    ((name, volume_hu, info),) = list(iter_user_volumes(str(tmp_path / "series"), CONFIG))
    assert name == "series" and volume_hu.dtype == np.int16
    np.testing.assert_array_equal(volume_hu,
                                  preprocess_volume(hu, 1.0, 0.0, (2.5, 0.7, 0.8), CONFIG))
    assert info["original_shape_dhw"] == [14, 20, 18]
    assert info["original_spacing_mm"] == pytest.approx([2.5, 0.7, 0.8])


def test_slope_and_intercept_may_differ_per_slice(tmp_path):
    hu = _hu((8, 10, 10), seed=2)
    uid = write_series(tmp_path / "s", hu[:4], slope=2.0, intercept=-1024.0, z_spacing=1.0)
    # The upper half in another file set of the same series, other scaling.
    folder = tmp_path / "upper"
    write_series(folder, hu[4:], slope=1.0, intercept=-1000.0, z_spacing=1.0, uid=uid)
    for name in os.listdir(folder):  # move them 4 mm up and into the same folder
        import pydicom

        ds = pydicom.dcmread(folder / name)
        ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1],
                                   ds.ImagePositionPatient[2] + 4.0]
        ds.save_as(tmp_path / "s" / f"up_{name}")
    (scan,) = find_user_scans(str(tmp_path / "s"))
    volume, _, info = load_user_scan(scan)
    np.testing.assert_array_equal(volume, hu)
    assert sorted(info["slope_intercept_applied"]) == [[1.0, -1000.0], [2.0, -1024.0]]


def _nifti(path, stored_hwd, *, slope=None, intercept=None, zooms=(0.7, 0.7, 2.0)):
    image = nib.Nifti1Image(stored_hwd, np.diag([*zooms, 1.0]))
    if slope is not None:
        image.header.set_slope_inter(slope, intercept)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(image, str(path))


@pytest.fixture
def scan_folder(tmp_path):
    """A folder of series folders, NIfTI files and bad files."""
    root = tmp_path / "scans"
    write_series(root / "patient_a" / "chest", _hu((12, 16, 16), 3), slope=1.0,
                 intercept=-1024.0, z_spacing=2.0)
    # Two series in one folder: one volume each.
    write_series(root / "patient_b", _hu((10, 16, 16), 4), slope=1.0, intercept=0.0,
                 z_spacing=3.0, uid="1.2.826.0.1.1")
    write_series(root / "patient_b", _hu((10, 16, 16), 5), slope=1.0, intercept=0.0,
                 z_spacing=3.0, uid="1.2.826.0.1.2", seed=1, prefix="CT")
    # A series with a missing slice is refused with a clear reason.
    hu = _hu((12, 16, 16), 6)
    write_series(root / "patient_c", hu, slope=1.0, intercept=0.0, z_spacing=2.0)
    removed = sorted(os.listdir(root / "patient_c"))[5]
    os.remove(root / "patient_c" / removed)
    stored = np.random.default_rng(7).integers(0, 2000, (16, 16, 12)).astype(np.int16)
    _nifti(root / "scaled.nii.gz", stored, slope=1.0, intercept=-1024.0)
    with open(root / "broken.nii.gz", "wb") as handle:
        handle.write(b"\x1f\x8b\x08 not really gzip")
    with open(root / "patient_a" / "garbage.dcm", "wb") as handle:
        handle.write(b"not a dicom file at all" * 10)
    with open(root / "notes.txt", "w") as handle:
        handle.write("ignored")
    return root, stored


def test_a_folder_of_series_and_nifti_files_with_bad_files_in_it(scan_folder):
    root, stored = scan_folder
    errors = []
    results = {name: (volume, info) for name, volume, info in
               iter_user_volumes(str(root), CONFIG, errors=errors)}
    assert sorted(results) == ["patient_a/chest", "patient_b/1.2.826.0.1.1",
                               "patient_b/1.2.826.0.1.2", "scaled.nii.gz"]
    failed = {os.path.basename(path): reason for path, reason in errors}
    assert sorted(failed) == ["broken.nii.gz", "garbage.dcm", "patient_c"]
    assert "evenly spaced" in failed["patient_c"]
    volume, info = results["scaled.nii.gz"]
    assert info["kind"] == "nifti" and info["slope_intercept_applied"] == [1.0, -1024.0]
    hu_dhw = np.transpose(stored.astype(np.float32) - 1024.0, (2, 0, 1))
    np.testing.assert_array_equal(volume, preprocess_volume(hu_dhw, 1.0, 0.0, (2.0, 0.7, 0.7),
                                                            CONFIG))
    assert all(v.shape == CONFIG.target_shape and v.dtype == np.int16
               for v, _ in results.values())


def test_single_nifti_file_without_scaling_is_taken_as_hu(tmp_path):
    stored = np.random.default_rng(8).integers(-1000, 1000, (16, 16, 12)).astype(np.int16)
    _nifti(tmp_path / "one.nii", stored, zooms=(0.8, 0.8, 2.5))
    ((name, volume, info),) = list(iter_user_volumes(str(tmp_path / "one.nii"), CONFIG))
    assert name == "one.nii" and info["slope_intercept_applied"] == [1.0, 0.0]
    np.testing.assert_array_equal(volume, preprocess_volume(
        stored, 1.0, 0.0, (2.5, 0.8, 0.8), CONFIG, layout="hwd"))
    with pytest.raises(FileNotFoundError, match="no such scan"):
        list(iter_user_volumes(str(tmp_path / "missing"), CONFIG))


def test_prepare_scans_writes_shards_that_the_readers_accept(scan_folder, tmp_path, capsys,
                                                             tiny_synthetic_data):
    from data_pipeline import input_pipeline

    root, _ = scan_folder
    out = str(tmp_path / "shards")
    status = main(["--scans", str(root), "--out", out, "--target-spacing", "3,1.5,1.5",
                   "--target-shape", "10,12,12", "--min-slices", "6", "--workers", "1",
                   "--no-progress"])
    assert status == 1  # three inputs failed
    assert "prepared 4 of 7 volumes" in capsys.readouterr().out
    manifest = Manifest.load(out)
    assert manifest.split == "scans" and len(manifest.failed) == 3
    records = list(read_records(out))
    assert [r.volume_name for r in records] == sorted(r.volume_name for r in records)
    for record, (name, volume, _) in zip(records, iter_user_volumes(str(root), CONFIG,
                                                                      errors=[])):
        assert record.volume_name == name
        np.testing.assert_array_equal(record.volume_hu, volume)
        assert record.findings == record.impressions == ""
        assert record.labels.tolist() == [-1] * schema.NUM_ABNORMALITIES
    config = input_pipeline.PipelineConfig(
        shard_dir=out, tokenizer_path=tiny_synthetic_data.tokenizer_path,
        global_batch_size=3, max_text_length=16)
    batches = list(input_pipeline.iterate_eval_batches(config))
    names = np.concatenate([b["volume_name"] for b in batches])[
        np.concatenate([b["valid"] for b in batches])]
    assert sorted(names) == sorted(r.volume_name for r in records)
