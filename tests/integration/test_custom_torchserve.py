"""Models users bring, packaged with `tandem archive` and served by a real TorchServe (issue 19): an MPNet
sentence-transformers model with mean pooling and a Dense layer (not normalised) against sentence-transformers,
and a YOLOv8-style detector from safetensors (`--head-format yolov8`) against the same stages run in this process."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tandem_serve.cli import main
from tandem_serve.model_files import SentenceModelFiles
from tandem_serve.stage_config import DetectorConfig
from tandem_serve.torchserve.client import TorchServeClient
from tandem_serve.torchserve.launcher import EmbeddedTorchServe, TorchServeOptions
from tandem_serve.workloads import mixed_length_texts
from tests.conftest import require_torchserve
from tests.detector_files import assert_same_detections, in_process, yolov8_files
from tests.helpers import centred_cosines, cosines
from tests.sentence_models import architecture_dir, saved_model

st = pytest.importorskip("sentence_transformers")
CONF, MAX_DET = 0.5, 40


def test_a_users_text_model_and_detector_archived_and_served_by_torchserve(tmp_path):
    require_torchserve()
    encoder = architecture_dir("mpnet", tmp_path / "mpnet", SentenceModelFiles.load().root, roberta_positions=514)
    model = saved_model(encoder, tmp_path / "mine", "mean", ((64, torch.nn.Tanh()),), False)
    encoded, weights = yolov8_files(tmp_path)
    store = tmp_path / "store"
    assert main(["archive", "--store", str(store), "--model-dir", str(model), "--weights", str(weights),
                 "--head-format", "yolov8"]) == 0

    texts = mixed_length_texts(10, seed=4)
    want = st.SentenceTransformer(str(model), device="cpu").encode(texts, convert_to_numpy=True)
    expected = in_process(DetectorConfig(weights=str(weights), head_format="yolov8"), encoded, CONF, MAX_DET)
    assert min(len(e.boxes) for e in expected) >= 1

    options = TorchServeOptions(model_store=store, workspace=tmp_path / "ts")
    with EmbeddedTorchServe(options) as server:
        client = TorchServeClient(server.inference_url, server.key_file)
        got = np.concatenate([client.embed(texts[:3]), client.embed(texts[3:], binary=False)])
        served = [client.detect(data, conf_threshold=CONF, max_det=MAX_DET) for data in encoded]
    assert got.shape == (10, 64)
    assert cosines(got, want).min() >= 0.9999 and centred_cosines(got, want).min() >= 0.999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), np.linalg.norm(want, axis=1), rtol=1e-3)
    assert abs(np.linalg.norm(got, axis=1).mean() - 1) > 1e-2  # no Normalize listed: not normalised
    for found, wanted in zip(served, expected):  # the same arithmetic on the same CPU: the same boxes
        assert_same_detections(found, wanted)
