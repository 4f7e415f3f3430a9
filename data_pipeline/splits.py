"""Patient-level split hygiene: no patient in both the training and the validation shards.

CT-RATE splits by patient: every scan and reconstruction of a patient is in one
split, and the split is part of each VolumeName (``train_12_a_1`` is patient
``train_12``).  Preparation already refuses a volume whose name belongs to another
split than the one being prepared.  `check_patient_split` checks two prepared shard
folders against each other (e.g. before training with one and validating on the
other), which also catches a validation set carved out of the training volumes by
volume instead of by patient.
"""

from __future__ import annotations

from data_pipeline.manifest import Manifest
from data_pipeline.schema import parse_volume_name


class PatientLeakError(ValueError):
    """The same patient appears in two shard folders that must be disjoint."""


def patients_of(manifest: Manifest) -> dict[str, list[str]]:
    """patient id -> VolumeNames of that patient in the manifest's shards.

    The patient id is the VolumeName without scan and reconstruction (``train_12``);
    names that are not CT-RATE VolumeNames (a user's own scans) are left out.
    """
    patients: dict[str, list[str]] = {}
    for shard in manifest.shards:
        for name in shard.volume_names:
            try:
                patient = parse_volume_name(name).patient_id
            except ValueError:
                continue
            patients.setdefault(patient, []).append(name)
    return patients


def check_patient_split(train_dir: str, valid_dir: str) -> None:
    """Raises PatientLeakError naming both manifests if any patient is in both folders."""
    train, valid = Manifest.load(train_dir), Manifest.load(valid_dir)
    train_patients, valid_patients = patients_of(train), patients_of(valid)
    shared = sorted(set(train_patients) & set(valid_patients))
    if shared:
        examples = "; ".join(f"{p}: {train_patients[p][0]} and {valid_patients[p][0]}"
                             for p in shared[:5])
        raise PatientLeakError(
            f"{len(shared)} patient(s) are in both {train.directory} and {valid.directory} "
            f"(e.g. {examples}); a patient's volumes must all be in one split")
