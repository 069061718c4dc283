"""`tandem repository export`: one self-contained repository, relative weights read from the model's directory."""

from __future__ import annotations

import shutil

import pytest

from tandem_serve.errors import ConfigError
from tandem_serve.paths import default_repositories, shipped_weights
from tandem_serve.stage_config import DetectorConfig, parse_stage_config, resolve_paths
from tandem_serve.triton.repository import export_repository
from tandem_serve.triton.model_config import read_config


def test_export_writes_every_model_and_ensemble_into_one_repository(tmp_path):
    names = export_repository(tmp_path / "repo")
    expected = sorted(p.name for r in default_repositories() for p in r.iterdir() if (p / "config.pbtxt").is_file())
    assert sorted(names) == expected
    for name in names:
        assert read_config(tmp_path / "repo" / name / "config.pbtxt").name == name
        assert not list((tmp_path / "repo" / name).rglob("__pycache__"))
    assert (tmp_path / "repo" / "object_detection" / "1").is_dir()  # ensembles keep their version directory


def test_exported_weights_move_with_the_repository(tmp_path):
    weights = tmp_path / "mine.safetensors"
    shutil.copy(shipped_weights(), weights)
    export_repository(tmp_path / "repo", weights=weights)
    moved = tmp_path / "elsewhere"
    shutil.move(tmp_path / "repo", moved)
    config = read_config(moved / "detector" / "config.pbtxt")
    assert config.parameters["weights"].string_value == "mine.safetensors"
    values = resolve_paths({k: v.string_value for k, v in config.parameters.items()}, str(moved / "detector"))
    settings = parse_stage_config(DetectorConfig, values)
    assert settings.weights == str(moved / "detector" / "mine.safetensors")
    assert (moved / "detector" / "mine.safetensors").read_bytes() == shipped_weights().read_bytes()


def test_absolute_and_empty_paths_stay_as_given():
    assert resolve_paths({"weights": "/abs/w.pt", "model_dir": ""}, "/models/detector") == \
        {"weights": "/abs/w.pt", "model_dir": ""}
    assert resolve_paths({"model_dir": "minilm"}, "/models/encoder") == {"model_dir": "/models/encoder/minilm"}


def test_export_refuses_a_non_empty_directory_and_missing_weights(tmp_path):
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "keep.txt").write_text("user data")
    with pytest.raises(ConfigError, match="not empty"):
        export_repository(tmp_path / "repo")
    with pytest.raises(ConfigError, match="do not exist"):
        export_repository(tmp_path / "other", weights=tmp_path / "missing.pt")
