"""Sentence heads users bring (issue 19): each pooling mode, Dense layers, Normalize present or absent, against
sentence-transformers loading the same directory (models built and saved by sentence-transformers itself, with a
random 2-layer BERT), and the refusals that name the file and field."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tandem_serve.errors import ModelFilesError
from tandem_serve.model_files import SentenceModelFiles
from tandem_serve.text.bert import load_sentence_encoder
from tandem_serve.text.tokenize import TextTokenizer
from tandem_serve.workloads import mixed_length_texts, random_bert
from tests.helpers import centred_cosines, cosines
from tests.sentence_models import architecture_dir, saved_model

st = pytest.importorskip("sentence_transformers")

TEXTS = mixed_length_texts(12, seed=19) + ["a", "the same words, twice over: the same words, twice over"]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return random_bert("tiny", tmp_path_factory.mktemp("bert"))


def served(model_dir: Path, fused: bool = True) -> np.ndarray:
    """The project's encoder on the CPU in fp32, on one padded batch of TEXTS."""
    files = SentenceModelFiles.load(model_dir)
    encoder = load_sentence_encoder(files, "cpu", torch.float32, fused=fused)
    batch = TextTokenizer(files.tokenizer_json, files.max_seq_length, 8, files.bert.pad_token_id)(TEXTS)
    with torch.inference_mode():
        ids, mask = torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask)
        if not fused:
            from tandem_serve.text.bert import load_token_embedding

            ids = load_token_embedding(files)(ids)
        return encoder(ids, mask).numpy()


def reference(model_dir: Path) -> np.ndarray:
    return st.SentenceTransformer(str(model_dir), device="cpu").encode(TEXTS, convert_to_numpy=True, batch_size=64)


def assert_same_embeddings(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    cosine = cosines(got, want)
    assert cosine.min() >= 0.9999, cosine.min()
    assert centred_cosines(got, want).min() >= 0.9999, centred_cosines(got, want).min()
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), np.linalg.norm(want, axis=1), rtol=1e-3)


@pytest.mark.parametrize("modes", ["mean", "cls", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken",
                                   ("cls", "mean"), ("max", "weightedmean", "lasttoken")])
def test_each_pooling_mode_without_normalize_matches_sentence_transformers(bert_dir, tmp_path, modes):
    model = saved_model(bert_dir, tmp_path / "model", modes)
    files = SentenceModelFiles.load(model)
    assert not files.head.normalize and files.embedding_size == 128 * (1 if isinstance(modes, str) else len(modes))
    assert_same_embeddings(served(model), reference(model))


@pytest.mark.parametrize("dense,normalize", [(((64, torch.nn.Tanh()),), True),
                                             (((96, torch.nn.Identity()), (32, torch.nn.ReLU())), False),
                                             (((48, torch.nn.GELU()),), False)])
def test_dense_layers_and_normalize_match_sentence_transformers(bert_dir, tmp_path, dense, normalize):
    model = saved_model(bert_dir, tmp_path / "model", ("cls", "mean"), dense, normalize)
    files = SentenceModelFiles.load(model)
    assert files.embedding_size == dense[-1][0] and files.head.normalize == normalize
    want = reference(model)
    assert_same_embeddings(served(model), want)
    assert_same_embeddings(served(model, fused=False), want)  # the separate token-embedding placement


def test_the_shipped_minilm_keeps_mean_pooling_and_normalize():
    files = SentenceModelFiles.load()
    assert files.head.pooling == ("mean",) and files.head.normalize and files.embedding_size == 384


def test_max_seq_length_comes_from_where_sentence_transformers_reads_it(bert_dir, tmp_path):
    model = saved_model(bert_dir, tmp_path / "model", "mean")  # new saves: no max_seq_length in sentence_bert_config
    assert "max_seq_length" not in json.loads((model / "sentence_bert_config.json").read_text())
    assert SentenceModelFiles.load(model).max_seq_length == st.SentenceTransformer(str(model), device="cpu").max_seq_length
    assert SentenceModelFiles.load(bert_dir).max_seq_length == 256  # an older save's sentence_bert_config.json


def _edit(path: Path, **changes) -> None:
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


def test_what_cannot_be_served_exactly_is_refused_naming_the_file(bert_dir, tmp_path):
    model = saved_model(bert_dir, tmp_path / "model", "mean", ((64, torch.nn.Tanh()),), True)
    _edit(model / "1_Pooling" / "config.json", include_prompt=False)
    with pytest.raises(ModelFilesError, match=r"1_Pooling/config.json: include_prompt false"):
        SentenceModelFiles.load(model)
    _edit(model / "1_Pooling" / "config.json", include_prompt=True, pooling_mode="median")
    with pytest.raises(ModelFilesError, match=r"1_Pooling/config.json: pooling_mode \['median'\]"):
        SentenceModelFiles.load(model)
    _edit(model / "1_Pooling" / "config.json", pooling_mode="mean")
    _edit(model / "2_Dense" / "config.json", activation_function="torch.nn.modules.activation.Softplus")
    with pytest.raises(ModelFilesError, match=r"2_Dense/config.json: activation_function .*Softplus"):
        SentenceModelFiles.load(model)
    _edit(model / "2_Dense" / "config.json", activation_function="torch.nn.modules.activation.Tanh", in_features=100)
    with pytest.raises(ModelFilesError, match=r"2_Dense/config.json: in_features 100 does not match the 128"):
        SentenceModelFiles.load(model)
    _edit(model / "2_Dense" / "config.json", in_features=128)
    listing = json.loads((model / "modules.json").read_text())
    (model / "modules.json").write_text(json.dumps(listing + [{"idx": 9, "name": "9", "path": "9_LayerNorm",
                                                               "type": "sentence_transformers.models.LayerNorm"}]))
    with pytest.raises(ModelFilesError, match=r"modules.json: module 'LayerNorm' after Normalize"):
        SentenceModelFiles.load(model)
    (model / "modules.json").write_text(json.dumps(listing[:1]))
    with pytest.raises(ModelFilesError, match="modules.json: no Pooling module"):
        SentenceModelFiles.load(model)


def test_legacy_pooling_keys_and_no_modules_json_read_as_sentence_transformers_does(bert_dir, tmp_path):
    model = saved_model(bert_dir, tmp_path / "model", "cls")
    (model / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 128, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    assert SentenceModelFiles.load(model).head.pooling == ("cls",)
    assert_same_embeddings(served(model), reference(model))
    (model / "modules.json").unlink()  # a plain transformers directory: mean pooling, no normalisation
    assert SentenceModelFiles.load(model).head.pooling == ("mean",) and not SentenceModelFiles.load(model).head.normalize


@pytest.fixture(scope="module", params=["roberta", "xlm-roberta", "distilbert", "mpnet"])
def other_arch_dir(request, tmp_path_factory) -> Path:
    return architecture_dir(request.param, tmp_path_factory.mktemp(request.param), SentenceModelFiles.load().root)


def test_roberta_xlm_roberta_distilbert_and_mpnet_encoders_match_sentence_transformers(other_arch_dir, tmp_path):
    model = saved_model(other_arch_dir, tmp_path / "model", "mean", normalize=True)
    files = SentenceModelFiles.load(model)
    if files.bert.model_type == "distilbert":
        assert files.bert.type_vocab_size == 0 and files.bert.position_offset == 0
    else:  # positions 2..257 of 258: sentence-transformers' saved 258 is cut to what the table holds
        assert files.bert.position_offset == 2 and files.max_seq_length == 256
    assert_same_embeddings(served(model), reference(model))
    assert_same_embeddings(served(model, fused=False), reference(model))


def test_other_architectures_are_refused_naming_the_field(bert_dir, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(bert_dir, model)
    _edit(model / "config.json", model_type="deberta-v2")
    with pytest.raises(ModelFilesError, match=r"config.json: model_type 'deberta-v2' is not served"):
        SentenceModelFiles.load(model)
    _edit(model / "config.json", model_type="mpnet", relative_attention_num_buckets=64)
    with pytest.raises(ModelFilesError, match=r"config.json: relative_attention_num_buckets 64 is not served"):
        SentenceModelFiles.load(model)


def test_a_default_prompt_is_prepended_as_sentence_transformers_does(bert_dir, tmp_path):
    from tandem_serve.stage_config import TokenizerConfig
    from tandem_serve.text.stages import TokenizeStage

    model = saved_model(bert_dir, tmp_path / "model", "mean", normalize=True)
    _edit(model / "config_sentence_transformers.json", prompts={"query": "query: ", "document": ""},
          default_prompt_name="query")
    files = SentenceModelFiles.load(model)
    assert files.prompt == "query: "
    batch = TokenizeStage(TokenizerConfig(model_dir=str(model)))([TEXTS])[0]
    encoder = load_sentence_encoder(files, "cpu", torch.float32, fused=True)
    with torch.inference_mode():
        got = encoder(torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask)).numpy()
    want = reference(model)
    assert_same_embeddings(got, want)
    assert not np.allclose(got, served(model), atol=1e-3)  # the prompt changes the embeddings
    _edit(model / "config_sentence_transformers.json", default_prompt_name="passage")
    with pytest.raises(ModelFilesError, match="default_prompt_name 'passage' is not one of prompts"):
        SentenceModelFiles.load(model)


def test_a_prompt_named_per_request_is_prepended_as_encode_prompt_name_does(bert_dir, tmp_path):
    """encode(prompt_name=...) for each of the model's prompts; no name: the default; an unknown name or names that
    differ within a request are refused naming the model's prompts."""
    from tandem_serve.errors import InvalidInputError
    from tandem_serve.stage_config import TokenizerConfig
    from tandem_serve.text.stages import TokenizeStage

    model = saved_model(bert_dir, tmp_path / "model", "mean", normalize=True)
    _edit(model / "config_sentence_transformers.json", prompts={"query": "query: ", "passage": "passage: "},
          default_prompt_name="passage")
    stage = TokenizeStage(TokenizerConfig(model_dir=str(model)))
    encoder = load_sentence_encoder(stage.files, "cpu", torch.float32, fused=True)
    st_model = st.SentenceTransformer(str(model), device="cpu")
    requests = [TEXTS[:5], TEXTS[5:9], TEXTS[9:]]
    names = ["query", None, "passage"]  # one batch, three requests, each its own prompt
    sent = [np.array([[b"query"]] * len(requests[0]), dtype=object), None, "passage"]  # as Triton / TorchServe pass them
    batches = stage(requests, [stage.prompt(raw, len(r)) for raw, r in zip(sent, requests)])
    for texts, name, batch in zip(requests, names, batches):
        with torch.inference_mode():
            got = encoder(torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask)).numpy()
        assert_same_embeddings(got, st_model.encode(texts, prompt_name=name, convert_to_numpy=True))
    with pytest.raises(InvalidInputError, match=r"prompt_name 'qeury' is not one of this model's prompts \['passage', 'query'\]"):
        stage.prompt("qeury", 3)
    with pytest.raises(InvalidInputError, match="PROMPT_NAME must name one prompt per request"):
        stage.prompt(np.array([[b"query"], [b"passage"]], dtype=object), 2)
    with pytest.raises(InvalidInputError, match=r"PROMPT_NAME must hold one name or one per text \(3\), got 2"):
        stage.prompt(np.array([[b"query"], [b"query"]], dtype=object), 3)
    with pytest.raises(InvalidInputError, match="PROMPT_NAME\\[0\\] is not valid UTF-8"):
        stage.prompt(np.array([[b"\xff"]], dtype=object), 1)
