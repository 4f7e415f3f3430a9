"""Reading a CT-RATE release from disk: volume files joined with the three CSVs.

The layout is the one documented in `data_pipeline.schema` (volumes under
``dataset/{train,valid}/<patient>/<scan>/<VolumeName>``, CSVs under
``dataset/metadata``, ``dataset/radiology_text_reports`` and
``dataset/multi_abnormality_labels``).  Only the standard library's csv module
is used, so listing 50k volumes needs no pandas.

`list_volumes` never raises for one bad volume: an entry whose metadata row,
report or labels are missing (or unparsable) carries an `error` reason and is
reported as a failure by preparation.  A missing CSV file, on the other hand,
is one clear `FileNotFoundError` naming the file.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from typing import Iterable

from data_pipeline.schema import (
    ABNORMALITIES,
    SPLIT_FILES,
    parse_volume_name,
    parse_xy_spacing,
)

METADATA_DIR = "metadata"
REPORTS_DIR = "radiology_text_reports"
LABELS_DIR = "multi_abnormality_labels"
_VOLUME_SUFFIXES = (".nii.gz", ".nii")
# Volumes the release marks as not (only) chest CTs; left out of preparation on purpose.
EXCLUSION_LIST = "no_chest_{split}.txt"


@dataclasses.dataclass(frozen=True)
class VolumeEntry:
    """One volume file of a release with everything preparation needs.

    Attributes:
      volume_name: the release's VolumeName, e.g. ``train_12_a_1.nii.gz``.
      path: absolute path of the NIfTI file.
      split: "train" or "valid".
      metadata: the metadata CSV row (column -> string), or None if absent.
      slope, intercept: RescaleSlope / RescaleIntercept (HU = slope * stored + intercept).
      spacing_zyx: (ZSpacing, XYSpacing row, XYSpacing column) in mm.
      findings, impressions: Findings_EN and Impressions_EN ("" when empty).
      labels: 18 ints in `schema.ABNORMALITIES` order (-1 where the cell is empty).
      error: why this volume cannot be prepared, or None.
    """

    volume_name: str
    path: str
    split: str
    metadata: dict[str, str] | None = None
    slope: float | None = None
    intercept: float | None = None
    spacing_zyx: tuple[float, float, float] | None = None
    findings: str = ""
    impressions: str = ""
    labels: tuple[int, ...] | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def resolve_dataset_dir(ctrate_root: str) -> str:
    """The release's ``dataset/`` folder, given it or the folder that contains it."""
    root = os.path.abspath(os.fspath(ctrate_root))
    nested = os.path.join(root, "dataset")
    if os.path.isdir(nested):
        return nested
    if os.path.isdir(os.path.join(root, METADATA_DIR)):
        return root
    raise FileNotFoundError(
        f"{root} is not a CT-RATE release: expected {nested} or a {METADATA_DIR}/ folder in it")


def default_volumes_dir(dataset_dir: str, split: str) -> str:
    """``{split}_fixed`` (CT-RATE v2's re-headered volumes) if present, else ``{split}``.

    The fixed files carry the HU scaling in their NIfTI headers; preparation detects
    that and does not apply the CSV's RescaleSlope / RescaleIntercept a second time.
    """
    plain = _split_files(split)["volumes"]
    fixed = f"{plain}_fixed"
    return fixed if os.path.isdir(os.path.join(dataset_dir, fixed)) else plain


def csv_paths(dataset_dir: str, split: str) -> dict[str, str]:
    """Paths of the metadata, reports and labels CSVs of `split`."""
    files = _split_files(split)
    return {
        "metadata": os.path.join(dataset_dir, METADATA_DIR, files["metadata"]),
        "reports": os.path.join(dataset_dir, REPORTS_DIR, files["reports"]),
        "labels": os.path.join(dataset_dir, LABELS_DIR, files["labels"]),
    }


def read_csv_rows(path: str, required_columns: Iterable[str]) -> dict[str, dict[str, str]]:
    """VolumeName -> row of a release CSV; the first row wins for a repeated name.

    Raises FileNotFoundError naming `path` when it is missing, and ValueError
    when a required column is absent.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CT-RATE CSV file not found: {path}")
    rows: dict[str, dict[str, str]] = {}
    # utf-8-sig: tolerate a byte-order mark written by spreadsheet tools.
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in ("VolumeName", *required_columns)
                   if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path} lacks the column(s) {missing}")
        for row in reader:
            name = (row.get("VolumeName") or "").strip()
            if name and name not in rows:
                rows[name] = {key: (value if value is not None else "")
                              for key, value in row.items() if key is not None}
    return rows


def find_volume_files(volumes_dir: str) -> dict[str, list[str]]:
    """VolumeName -> absolute paths of the files with that name below `volumes_dir`."""
    if not os.path.isdir(volumes_dir):
        raise FileNotFoundError(f"CT-RATE volume folder not found: {volumes_dir}")
    found: dict[str, list[str]] = {}
    for directory, subdirs, files in os.walk(volumes_dir):
        subdirs.sort()
        for name in sorted(files):
            if name.endswith(_VOLUME_SUFFIXES):
                found.setdefault(name, []).append(os.path.join(directory, name))
    return found


def list_volumes(ctrate_root: str, split: str, *,
                 volumes_dir: str | None = None) -> list[VolumeEntry]:
    """All volume files of `split` found on disk, joined with the CSVs, sorted by name.

    Args:
      ctrate_root: the release's ``dataset/`` folder or the folder containing it.
      split: "train" or "valid".
      volumes_dir: folder of the volumes below ``dataset/``; by default
        `default_volumes_dir` ("train_fixed" when the release has it, else "train").
    """
    dataset_dir = resolve_dataset_dir(ctrate_root)
    files = _split_files(split)
    paths = csv_paths(dataset_dir, split)
    metadata = read_csv_rows(paths["metadata"], ("RescaleSlope", "RescaleIntercept",
                                                  "XYSpacing", "ZSpacing"))
    reports = read_csv_rows(paths["reports"], ("Findings_EN", "Impressions_EN"))
    labels = read_csv_rows(paths["labels"], ABNORMALITIES)
    volume_files = find_volume_files(
        os.path.join(dataset_dir, volumes_dir or default_volumes_dir(dataset_dir, split)))

    entries = []
    for name in sorted(volume_files):
        found = volume_files[name]
        entry = _join_entry(name, found[0], split, metadata.get(name), reports.get(name),
                            labels.get(name))
        if len(found) > 1 and entry.ok:
            entry = dataclasses.replace(
                entry, error=f"{len(found)} files named {name}: {', '.join(found)}")
        entries.append(entry)
    return entries


def exclusion_list_path(ctrate_root: str, split: str) -> str | None:
    """The split's ``no_chest_{train,valid}.txt`` if the release has one.

    Looked for in ``dataset/``, ``dataset/metadata/`` and the folder above ``dataset/``.
    """
    dataset_dir = resolve_dataset_dir(ctrate_root)
    name = EXCLUSION_LIST.format(split=_split_files(split)["volumes"])
    for folder in (dataset_dir, os.path.join(dataset_dir, METADATA_DIR),
                   os.path.dirname(dataset_dir)):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def read_exclusion_list(path: str) -> set[str]:
    """VolumeNames listed in an exclusion file, one a line.

    A line may omit the ``.nii.gz`` ending; blank lines and ``#`` comments are
    ignored.  A line that is not a VolumeName is a ValueError naming the file and line.
    """
    names = set()
    with open(path, encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, 1):
            text = line.split("#", 1)[0].strip().strip(",").strip("'\"")
            if not text:
                continue
            if not text.endswith(_VOLUME_SUFFIXES):
                text += ".nii.gz"
            try:
                names.add(_stem(parse_volume_name(text).volume_name))
            except ValueError as error:
                raise ValueError(f"{path}, line {number}: {error}") from None
    return names


def excluded_volumes(entries: Iterable[VolumeEntry], ctrate_root: str,
                     split: str) -> dict[str, str]:
    """VolumeName -> reason, for the entries the split's exclusion list names."""
    path = exclusion_list_path(ctrate_root, split)
    if path is None:
        return {}
    listed = read_exclusion_list(path)
    reason = f"listed in {os.path.basename(path)} (not a chest CT): {path}"
    return {entry.volume_name: reason for entry in entries
            if _stem(entry.volume_name) in listed}


def failure_record(item, reason: str) -> dict:
    """The manifest's {volume_name, path, reason} entry for a failed or excluded input."""
    return {"volume_name": item.volume_name, "path": item.path, "reason": reason}


@dataclasses.dataclass
class SplitInputs:
    """What preparing one split works on (every runner: local, Beam, TFDS).

    Attributes:
      entries: the inputs to prepare, in VolumeName order (joined without error).
      failed: {volume_name, path, reason} of the entries that could not be joined.
      excluded: {volume_name, path, reason} of the volumes the exclusion list names.
    """

    entries: list[VolumeEntry]
    failed: list[dict]
    excluded: list[dict]


def split_inputs(ctrate_root: str, split: str, *, volumes_dir: str | None = None,
                 limit: int | None = None) -> SplitInputs:
    """`list_volumes` without the excluded volumes, first `limit` of the rest, by outcome."""
    entries = list_volumes(ctrate_root, split, volumes_dir=volumes_dir)
    exclusions = excluded_volumes(entries, ctrate_root, split)
    excluded = [failure_record(entry, exclusions[entry.volume_name])
                for entry in entries if entry.volume_name in exclusions]
    entries = [entry for entry in entries if entry.volume_name not in exclusions]
    if limit is not None:
        entries = entries[:limit]
    return SplitInputs(entries=[entry for entry in entries if entry.ok],
                       failed=[failure_record(entry, entry.error)
                               for entry in entries if not entry.ok],
                       excluded=excluded)


def _stem(volume_name: str) -> str:
    for suffix in _VOLUME_SUFFIXES:
        if volume_name.endswith(suffix):
            return volume_name[:-len(suffix)]
    return volume_name


# ----------------------------------------------------------------------------------
# Joining one volume
# ----------------------------------------------------------------------------------


def _split_files(split: str) -> dict[str, str]:
    if split not in SPLIT_FILES:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_FILES)}")
    return SPLIT_FILES[split]


def _join_entry(name: str, path: str, split: str, metadata_row: dict | None,
                report_row: dict | None, labels_row: dict | None) -> VolumeEntry:
    """Builds one VolumeEntry; the first problem found becomes its `error`."""
    entry = VolumeEntry(volume_name=name, path=path, split=split, metadata=metadata_row)
    problems = []
    try:
        if parse_volume_name(name).split != split:
            problems.append(f"{name} is not a {split} volume")
    except ValueError as error:
        problems.append(str(error))

    if metadata_row is None:
        problems.append("no row in the metadata CSV")
    else:
        try:
            entry = dataclasses.replace(entry, **_scan_parameters(metadata_row))
        except ValueError as error:
            problems.append(f"bad metadata row: {error}")

    if report_row is None:
        problems.append("no row in the reports CSV")
    else:
        entry = dataclasses.replace(
            entry, findings=(report_row.get("Findings_EN") or "").strip(),
            impressions=(report_row.get("Impressions_EN") or "").strip())

    if labels_row is None:
        problems.append("no row in the labels CSV")
    else:
        try:
            entry = dataclasses.replace(entry, labels=_parse_labels(labels_row))
        except ValueError as error:
            problems.append(f"bad labels row: {error}")

    return dataclasses.replace(entry, error="; ".join(problems)) if problems else entry


def _scan_parameters(row: dict[str, str]) -> dict:
    """slope, intercept and (z, y, x) spacing from a metadata row; ValueError if bad."""
    values = {}
    for column in ("RescaleSlope", "RescaleIntercept", "ZSpacing"):
        try:
            values[column] = float(row[column])
        except (TypeError, ValueError):
            raise ValueError(f"{column} is {row.get(column)!r}") from None
    row_spacing, column_spacing = parse_xy_spacing(row["XYSpacing"])
    spacing = (values["ZSpacing"], row_spacing, column_spacing)
    if not all(s > 0 for s in spacing):
        raise ValueError(f"non-positive spacing {spacing}")
    return {"slope": values["RescaleSlope"], "intercept": values["RescaleIntercept"],
            "spacing_zyx": spacing}


def _parse_labels(row: dict[str, str]) -> tuple[int, ...]:
    """The 18 abnormality columns as ints (the release writes 0/1; empty -> -1)."""
    labels = []
    for column in ABNORMALITIES:
        text = (row.get(column) or "").strip()
        try:
            labels.append(int(float(text)) if text else -1)
        except ValueError:
            raise ValueError(f"{column} is {text!r}") from None
    return tuple(labels)
