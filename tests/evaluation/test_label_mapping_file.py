"""--label-mapping: a named mapping or a JSON file declaring one."""

import json

import numpy as np
import pytest

from ct_rate_jax.evaluation.label_mapping import RAD_CHESTCT_MAPPING, load_label_mapping


def test_named_and_file_mappings(tmp_path):
    assert load_label_mapping("rad_chestct") is RAD_CHESTCT_MAPPING
    assert len(RAD_CHESTCT_MAPPING.target_names) == 16
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"merge": "noisy_or", "classes": {
        "calcification": ["Arterial wall calcification", "Coronary artery wall calcification"],
        "Effusion": ["Pleural effusion", "Pericardial effusion"]}}))
    mapping = load_label_mapping(str(path))
    assert mapping.target_names == ["calcification", "Effusion"] and mapping.merge == "noisy_or"
    scores = np.full((1, 18), 0.5)
    np.testing.assert_allclose(mapping.map_scores(scores), [[0.75, 0.75]])


@pytest.mark.parametrize("content,message", [
    ("{", "label mapping file"),
    ('{"classes": {"x": ["No such class"]}}', "not among source_names"),
    ('{"classes": {"x": "Cardiomegaly"}}', "list of CT-RATE"),
    ('{"merge": "max"}', "missing key"),
    ('{"classes": {"x": ["Cardiomegaly"]}, "extra": 1}', "unknown key"),
])
def test_bad_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        load_label_mapping(str(path))
    assert str(path) in str(error.value)
    with pytest.raises(FileNotFoundError, match="neither a known name"):
        load_label_mapping(str(tmp_path / "missing.json"))
