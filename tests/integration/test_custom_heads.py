"""Users' sentence-transformers models, one per architecture (BERT, RoBERTa, XLM-R, DistilBERT, MPNet) with its own
head (pooling, Dense layers, Normalize or not), exported with `tandem repository export --model-dir` and served by a
real Triton through both text ensembles, against sentence-transformers loading the same directory (issue 19)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tandem_serve.clients.triton import TextEmbeddingClient
from tandem_serve.model_files import SentenceModelFiles
from tandem_serve.triton.launcher import EmbeddedTriton, TritonOptions
from tandem_serve.triton.repository import export_repository
from tandem_serve.workloads import mixed_length_texts, random_bert
from tests.helpers import centred_cosines, cosines
from tests.sentence_models import architecture_dir, saved_model

st = pytest.importorskip("sentence_transformers")
from sentence_transformers.models import Pooling, Transformer  # noqa: E402


def _text_triton(model: Path, tmp_path: Path) -> EmbeddedTriton:
    """A real Triton serving `model` through the text models and ensembles of `tandem repository export`."""
    export_repository(tmp_path / "repo", model_dir=model)
    for name in ("image_preprocess", "detector", "nms", "object_detection"):
        shutil.rmtree(tmp_path / "repo" / name)
    return EmbeddedTriton(TritonOptions(model_repositories=[tmp_path / "repo"], workspace=tmp_path / "ws"))


# architecture, pooling, Dense (out, activation), Normalize: each architecture served once through both ensembles
SERVED = {
    "bert": (("cls", "mean"), ((80, torch.nn.Tanh()),), False),
    "roberta": ("mean", (), True),
    "xlm-roberta": ("cls", ((48, torch.nn.GELU()),), True),
    "distilbert": ("weightedmean", (), False),
    "mpnet": ("mean", ((64, torch.nn.Tanh()),), False),  # relative position buckets
}


@pytest.mark.parametrize("kind", list(SERVED))
def test_each_architecture_with_its_head_is_served_as_sentence_transformers_computes(tmp_path, kind):
    modes, dense, normalize = SERVED[kind]
    encoder = architecture_dir(kind, tmp_path / kind, SentenceModelFiles.load().root, roberta_positions=514)
    model = saved_model(encoder, tmp_path / "mine", modes, dense, normalize)
    dims = dense[-1][0] if dense else 128
    texts = mixed_length_texts(24, seed=8)
    want = st.SentenceTransformer(str(model), device="cpu").encode(texts, convert_to_numpy=True)
    with _text_triton(model, tmp_path) as server:
        for ensemble in ("text_embedding", "text_embedding_fused"):
            with TextEmbeddingClient(server.grpc_url, model=ensemble) as client:
                got = np.concatenate([client.embed(texts[:5]), client.embed(texts[5:])])
            assert got.shape == (24, dims), ensemble
            cosine = cosines(got, want)
            assert cosine.min() >= 0.9999, (ensemble, cosine.min())
            # what tells the texts apart; the split ensemble hands HIDDEN on in fp16 (its config's choice)
            bound = 0.9999 if ensemble == "text_embedding_fused" else 0.99
            assert centred_cosines(got, want).min() >= bound, (ensemble, centred_cosines(got, want).min())
            np.testing.assert_allclose(np.linalg.norm(got, axis=1), np.linalg.norm(want, axis=1), rtol=1e-3)
            # normalised exactly where the model lists Normalize
            assert (abs(np.linalg.norm(got, axis=1).mean() - 1) < 1e-4) == normalize


def test_a_refused_model_leaves_the_rest_of_the_repository_serving(tmp_path):
    """A text model the encoder cannot serve faithfully (an unknown pooling mode) is refused at load with the file
    and field named; detection keeps serving, the health endpoint says what was refused. With exit_on_error the
    server refuses to start instead."""
    import json
    import urllib.request

    from tandem_serve.clients.triton import ObjectDetectionClient
    from tandem_serve.triton.launcher import TritonStartError
    from tandem_serve.vision.shapes import encode_scene, generate_scene

    model = tmp_path / "mine"
    st.SentenceTransformer(modules=[Transformer(str(random_bert("tiny", tmp_path / "bert"))),
                                    Pooling(128, pooling_mode="mean")], device="cpu").save(str(model))
    export_repository(tmp_path / "repo", model_dir=model)  # export refuses such a model itself: break it after
    pooling = model / "1_Pooling" / "config.json"
    pooling.write_text(json.dumps({**json.loads(pooling.read_text()), "pooling_mode": "median"}))
    rng = np.random.default_rng(5)
    with EmbeddedTriton(TritonOptions(model_repositories=[tmp_path / "repo"], workspace=tmp_path / "ws")) as server:
        assert {"tokenizer", "encoder", "encoder_fused", "text_embedding"} <= set(server.refused)
        assert "pooling_mode ['median']" in server.refused["encoder"]
        with ObjectDetectionClient(server.grpc_url) as client:
            assert len(client.detect(encode_scene(generate_scene(rng), rng)).boxes) >= 1
        with urllib.request.urlopen(f"{server.health_url}/ready", timeout=5) as response:
            status = json.loads(response.read())
        assert response.status == 200 and status["models"]["encoder"]["state"] == "refused"
        assert "refused at load" in status["reason"] and status["models"]["nms"]["state"] == "serving"
        with pytest.raises(Exception, match="text_embedding"):
            with TextEmbeddingClient(server.grpc_url) as client:
                client.embed(["not served"])
    with pytest.raises(TritonStartError):
        EmbeddedTriton(TritonOptions(model_repositories=[tmp_path / "repo"], workspace=tmp_path / "ws2",
                                     exit_on_error=True, startup_timeout_s=120)).start()


def test_a_prompt_named_per_request_is_served_as_encode_prompt_name_computes(tmp_path):
    """e5-style prompts chosen per request: through both Triton ensembles (`prompt_name`) and the TorchServe text
    handler (JSON "prompt_name"), against encode(prompt_name=...); no name: the default prompt; an unknown name is
    a per-request INVALID_ARG / 400 naming the model's prompts, its batch-mates unaffected."""
    import json

    from tritonclient.utils import InferenceServerException

    from tandem_serve.torchserve.services import TextEmbeddingService

    encoder = architecture_dir("bert", tmp_path / "bert", SentenceModelFiles.load().root)
    model = saved_model(encoder, tmp_path / "mine", "mean", normalize=True)
    settings = model / "config_sentence_transformers.json"
    settings.write_text(json.dumps({**json.loads(settings.read_text()), "default_prompt_name": "passage",
                                    "prompts": {"query": "query: ", "passage": "passage: "}}))
    texts = mixed_length_texts(6, seed=12)
    reference = st.SentenceTransformer(str(model), device="cpu")
    want = {name: reference.encode(texts, prompt_name=name, convert_to_numpy=True) for name in ("query", None)}
    assert not np.allclose(want["query"], want[None], atol=1e-3)  # the prompt changes the embeddings
    with _text_triton(model, tmp_path) as server:
        for ensemble in ("text_embedding", "text_embedding_fused"):
            with TextEmbeddingClient(server.grpc_url, model=ensemble) as client:
                for name, expected in want.items():
                    assert centred_cosines(client.embed(texts, prompt_name=name), expected).min() >= 0.99, ensemble
                with pytest.raises(InferenceServerException, match=r"prompt_name 'qeury' is not one of this model's "
                                                                   r"prompts \['passage', 'query'\]"):
                    client.embed(texts, prompt_name="qeury")
    service = TextEmbeddingService(model, {"handler": {"model_dir": str(model), "pipeline": {"micro_batch_size": 2}}})
    try:
        replies = service.handle([{"body": {"text": texts, "prompt_name": "query"}}, {"body": {"text": texts}},
                                  {"body": {"text": texts, "prompt_name": "qeury"}},
                                  {"text": texts[0].encode(), "prompt_name": b"query"}],
                                 [{"content-type": "application/json"}] * 3 + [{"content-type": "multipart/form-data"}])
    finally:
        service.close()
    assert [r.status for r in replies] == [200, 200, 400, 200]
    assert "prompt_name 'qeury' is not one of this model's prompts" in json.loads(replies[2].body)["message"]
    for reply, expected in ((replies[0], want["query"]), (replies[1], want[None]), (replies[3], want["query"][:1])):
        np.testing.assert_allclose(np.array(json.loads(reply.body)["embeddings"], np.float32), expected, atol=2e-4)


def test_a_users_model_is_profiled_planned_and_its_plan_served_as_sentence_transformers_computes(tmp_path):
    """`tandem profile --model-dir` (its int8 row quantises the Dense head too), `tandem plan`, and Triton serving the
    plan's repository: the rendered configs carry the model's directory and its embedding size (48, the Dense
    layer's), and the served embeddings are sentence-transformers'."""
    import contextlib
    import io
    import json

    from tandem_serve.cli import main

    encoder = architecture_dir("xlm-roberta", tmp_path / "xlmr", SentenceModelFiles.load().root, roberta_positions=514)
    model = saved_model(encoder, tmp_path / "mine", "cls", ((48, torch.nn.GELU()),), True)
    assert main(["profile", "--out", str(tmp_path / "profile.json"), "--pipelines", "text", "--devices", "cpu",
                 "--batch-sizes", "1", "4", "--seq-lengths", "16", "--repeats", "1", "--no-serving-cost",
                 "--model-dir", str(model)]) == 0
    profiled = json.loads((tmp_path / "profile.json").read_text())
    assert profiled["models"] == {"model_dir": str(model.resolve())}
    assert {(s["stage"], s["precision"]) for s in profiled["stages"]} >= {("encoder", "int8"), ("encoder_fused", "fp32")}
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["plan", str(tmp_path / "profile.json"), "--out", str(tmp_path / "plan")]) == 0
    repo = tmp_path / "plan" / "triton"
    texts = mixed_length_texts(12, seed=21)
    want = st.SentenceTransformer(str(model), device="cpu").encode(texts, convert_to_numpy=True)
    ensemble = next(p.name for p in repo.iterdir() if p.name.startswith("text_embedding"))
    with EmbeddedTriton(TritonOptions(model_repositories=[repo], workspace=tmp_path / "ws")) as server:
        with TextEmbeddingClient(server.grpc_url, model=ensemble) as client:
            got = np.concatenate([client.embed(texts[:4]), client.embed(texts[4:])])
    assert got.shape == (12, 48)
    assert cosines(got, want).min() >= 0.9999 and centred_cosines(got, want).min() >= 0.99
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-3)
