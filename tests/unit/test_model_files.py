"""Model directory validation names what is missing."""

import json
import shutil

import pytest

from tandem_serve.errors import ModelFilesError
from tandem_serve.model_files import REQUIRED_FILES, SentenceModelFiles


def test_default_is_packaged_minilm(model_files):
    assert model_files.max_seq_length == 256
    assert model_files.bert.hidden_size == 384 and model_files.bert.num_hidden_layers == 6


def test_missing_directory():
    with pytest.raises(ModelFilesError, match="/no/such/dir does not exist"):
        SentenceModelFiles.load("/no/such/dir")


@pytest.mark.parametrize("missing", REQUIRED_FILES)
def test_missing_file_is_named(model_files, tmp_path, missing):
    for name in REQUIRED_FILES:
        if name != missing:
            shutil.copy(model_files.root / name, tmp_path / name)
    with pytest.raises(ModelFilesError, match=f"lacks {missing}"):
        SentenceModelFiles.load(tmp_path)


def test_unsupported_architecture_and_broken_json(model_files, tmp_path):
    for name in REQUIRED_FILES:
        shutil.copy(model_files.root / name, tmp_path / name)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    with pytest.raises(ModelFilesError, match="hidden_act 'relu' unsupported"):
        SentenceModelFiles.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelFilesError, match="cannot read .*config.json"):
        SentenceModelFiles.load(tmp_path)
