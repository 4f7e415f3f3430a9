"""The demo's synthetic-data set-up refuses a folder built from other settings."""

from __future__ import annotations

import dataclasses
import json

import pytest

from experiments.synthetic_setup import SyntheticData


def test_root_built_with_other_settings_is_refused(tmp_path):
    built = SyntheticData(root=str(tmp_path), num_volumes=30, conspicuity=2.5)
    with open(built.spec_path, "w", encoding="utf-8") as handle:
        json.dump(dataclasses.asdict(built), handle)
    built.check_root_matches()  # same settings: fine
    wanted = dataclasses.replace(built, num_volumes=40)
    with pytest.raises(ValueError, match=r"num_volumes: 30 there, 40 now.*delete it"):
        wanted.check_root_matches()


def test_fresh_root_is_accepted(tmp_path):
    SyntheticData(root=str(tmp_path / "new")).check_root_matches()
