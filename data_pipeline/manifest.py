"""The shard directory's ``manifest.json``: what was prepared, how, and what failed.

A manifest is read from disks that may hold other people's data, so every file
name it lists is checked to resolve inside the manifest's own directory
(`resolve_inside`): ``../x``, absolute paths and symlinks that lead outside are
refused with an error naming the manifest.
"""

from __future__ import annotations

import dataclasses
import json
import os

from data_pipeline import schema

MANIFEST_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
# Shard compression (`prepare --compression`): "zstd:N" (N = 1..22) or "none".  zstd:3,
# ArrayRecord's default compressor, is the default: a quarter to a third of the bytes
# on disk.  "none" costs no decompression when reading (the input pipeline then only
# copies, see docs/performance.md) at 3-4x the disk space.
DEFAULT_COMPRESSION = "zstd:3"
COMPRESSIONS = ("none", "zstd:N")
TMP_SUFFIX = ".tmp"


def writer_options(compression: str = DEFAULT_COMPRESSION) -> str:
    """ArrayRecord writer options for a shard `compression` ("none" or "zstd:N").

    One record per chunk (group_size 1), so that reading record i decompresses only
    record i.  Readers need no setting: ArrayRecord records each chunk's compression
    in the file, so shards of any compression read the same way.

    Raises ValueError naming the setting for anything else.
    """
    text = str(compression).strip().lower()
    if text in ("none", "uncompressed"):
        return "group_size:1,uncompressed"
    name, _, level = text.partition(":")
    if name == "zstd" and level.lstrip("-").isdigit() and 1 <= int(level) <= 22:
        return f"group_size:1,zstd:{int(level)}"
    raise ValueError(f"compression {compression!r} is not supported: use 'none' or "
                     f"'zstd:N' with N from 1 to 22 (default {DEFAULT_COMPRESSION!r})")


# The options of the default, as every manifest before `--compression` existed says.
WRITER_OPTIONS = writer_options(DEFAULT_COMPRESSION)


class UnsafePathError(ValueError):
    """A path read from a manifest or list file that leads outside its directory."""


def resolve_inside(directory: str, name: str, source: str) -> str:
    """Absolute path of `name` below `directory`; refuses anything that escapes it.

    Args:
      directory: the folder `name` must stay in.
      name: a relative file name read from `source` (e.g. a shard file name).
      source: the file `name` was read from, named in the error.

    Raises UnsafePathError for an absolute `name`, a `..` component, or a path
    whose real location (symlinks resolved) is outside `directory`.
    """
    if not isinstance(name, str) or not name or "\x00" in name:
        raise UnsafePathError(f"{source}: invalid file name {name!r}")
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in parts:
        raise UnsafePathError(f"{source}: file name {name!r} leaves the directory "
                              f"{directory} (absolute paths and '..' are not allowed)")
    root = os.path.realpath(directory)
    path = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root:
        raise UnsafePathError(f"{source}: file {name!r} resolves to {path}, outside "
                              f"{root} (a symlink leading out of the dataset is refused)")
    return os.path.join(os.path.abspath(directory), name)


@dataclasses.dataclass
class ShardInfo:
    """One shard file: its name (relative to the manifest), size and content."""

    file: str
    num_records: int
    sha256: str
    bytes: int
    volume_names: list[str]


@dataclasses.dataclass
class Manifest:
    """Contents of ``manifest.json`` in a shard directory.

    `directory` is where the manifest was loaded from or written to (not stored).
    `failed` lists {volume_name, path, reason} for every input that could not be
    prepared; `excluded` lists {volume_name, path, reason} for inputs left out on
    purpose (e.g. the release's ``no_chest_*.txt`` lists), which are not failures.
    `plan_sha256` identifies the inputs and settings, so that a rerun of the same
    command can tell that this directory is its own finished work.
    """

    split: str
    num_records: int
    shards: list[ShardInfo]
    preprocessing: dict
    source_root: str
    failed: list[dict]
    created: str
    excluded: list[dict] = dataclasses.field(default_factory=list)
    plan_sha256: str = ""
    writer_options: str = WRITER_OPTIONS
    format_version: int = MANIFEST_FORMAT_VERSION
    record_format_version: int = schema.RECORD_FORMAT_VERSION
    directory: str = dataclasses.field(default="", compare=False)

    @classmethod
    def load(cls, path: str) -> "Manifest":
        """Reads a manifest, given its path or its shard directory.

        Raises ValueError naming the manifest when it is not a manifest this code
        reads, and UnsafePathError when a shard file name leaves its directory.
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, MANIFEST_NAME)
        with open(path, encoding="utf-8") as handle:
            try:
                data = json.load(handle)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: not a JSON manifest ({error})") from None
        if not isinstance(data, dict) or data.get("format_version") != MANIFEST_FORMAT_VERSION:
            version = data.get("format_version") if isinstance(data, dict) else None
            raise ValueError(f"{path}: manifest format {version} is not "
                             f"supported (this code reads {MANIFEST_FORMAT_VERSION})")
        known = {field.name for field in dataclasses.fields(cls)} - {"directory"}
        try:
            data["shards"] = [ShardInfo(**shard) for shard in data["shards"]]
            manifest = cls(**{k: v for k, v in data.items() if k in known},
                           directory=os.path.dirname(os.path.abspath(path)))
        except (KeyError, TypeError) as error:
            raise ValueError(f"{path}: malformed manifest ({error!r})") from None
        manifest.shard_paths()  # refuse unsafe file names now, not at the first read
        return manifest

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        del data["directory"]
        return data

    def save(self, directory: str) -> str:
        """Writes ``directory/manifest.json`` atomically; returns its path."""
        path = os.path.join(directory, MANIFEST_NAME)
        write_atomically(path, json.dumps(self.to_json(), indent=2, ensure_ascii=False))
        self.directory = os.path.abspath(directory)
        return path

    def shard_paths(self) -> list[str]:
        """Absolute paths of the shards, in record order (each checked to stay inside
        the manifest's directory)."""
        source = os.path.join(self.directory, MANIFEST_NAME)
        return [resolve_inside(self.directory, shard.file, source) for shard in self.shards]


def write_atomically(path: str, text: str) -> None:
    """Writes `text` to `path` through a temporary file, fsync and rename."""
    tmp_path = path + TMP_SUFFIX
    with open(tmp_path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp_path, path)
