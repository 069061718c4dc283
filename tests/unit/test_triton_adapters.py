"""The Python-backend adapters, driven in-process with a fake pb_utils and the real configs."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from tandem_serve.errors import ConfigError, ModelFilesError
from tandem_serve.paths import default_repositories
from tests.helpers import assert_cosines
from tests.unit import fake_pb_utils
from tests.unit.fake_pb_utils import Request, initialize_args

fake_pb_utils.install()
from tandem_serve.triton.text_models import EncoderModel, TokenEmbeddingModel, TokenizerModel  # noqa: E402

REPO = default_repositories()[0]


def _init(model_cls, name: str, mutate=None, **overrides: str):
    model = model_cls()
    model.initialize(initialize_args(REPO / name / "config.pbtxt", mutate=mutate, **overrides))
    return model


@pytest.fixture(scope="module")
def models():
    return _init(TokenizerModel, "tokenizer"), _init(TokenEmbeddingModel, "token_embedding"), _init(EncoderModel, "encoder")


def test_pipeline_through_adapters_matches_reference(models, reference):
    tokenizer, embedding, encoder = models
    texts = [["a short one", "a considerably longer sentence about dynamic batching"], ["solo"]]
    requests = [Request(TEXT=np.array([[t.encode()] for t in group], dtype=object)) for group in texts]
    tokens = tokenizer.execute(requests)
    assert all(r.error is None for r in tokens)
    hidden = embedding.execute([Request(INPUT_IDS=r.output("INPUT_IDS")) for r in tokens])
    assert hidden[0].output("HIDDEN").dtype == torch.float16
    assert hidden[0].output("HIDDEN").shape[1] == tokens[0].output("INPUT_IDS").shape[1]
    out = encoder.execute([Request(HIDDEN=h.output("HIDDEN"), ATTENTION_MASK=t.output("ATTENTION_MASK"))
                           for h, t in zip(hidden, tokens)])
    served = torch.cat([r.output("EMBEDDING") for r in out]).numpy()
    assert_cosines(served, reference([t for group in texts for t in group]))


def test_invalid_request_fails_alone_with_invalid_arg(models):
    tokenizer = models[0]
    responses = tokenizer.execute([
        Request(TEXT=np.array([[b"good"]], dtype=object)),
        Request(TEXT=np.array([[b"\xc3\x28"]], dtype=object)),
    ])
    assert responses[0].error is None and responses[0].output("INPUT_IDS").shape[0] == 1
    assert responses[1].error.code() == "INVALID_ARG"
    assert "TEXT[0] is not valid UTF-8" in responses[1].error.message()


def test_internal_error_is_reported_per_request_without_details(models, monkeypatch):
    encoder = models[2]
    monkeypatch.setattr(encoder.stage, "module", lambda *a: (_ for _ in ()).throw(RuntimeError("cuda exploded")))
    request = Request(HIDDEN=torch.zeros(1, 8, 384, dtype=torch.float16), ATTENTION_MASK=torch.ones(1, 8, dtype=torch.int64))
    (response,) = encoder.execute([request])
    assert response.error.code() == "INTERNAL" and "cuda exploded" not in response.error.message()


def test_bad_parameters_fail_initialize_naming_them():
    with pytest.raises(ConfigError, match="'precision' must be"):
        _init(EncoderModel, "encoder", precision="fp8")
    with pytest.raises(ModelFilesError, match="/nowhere does not exist"):
        _init(TokenizerModel, "tokenizer", model_dir="/nowhere")


def test_config_dims_that_disagree_with_the_model_fail_initialize():
    def widen_output(config):
        config.output[0].dims[:] = [768]

    with pytest.raises(ConfigError, match=r"output EMBEDDING dims \[768\] do not match the model \(\[384\]\)"):
        _init(EncoderModel, "encoder_fused", mutate=widen_output)


def test_a_float_output_is_sent_in_its_declared_float_type(reference):
    """EMBEDDING declared TYPE_FP16 in the config: the client gets float16 rows (half the bytes), still the model's
    embeddings; the tokenizer's declared INT64 outputs stay as they are."""
    from tritonclient.grpc import model_config_pb2 as mc

    def half(config):
        config.output[0].data_type = mc.TYPE_FP16

    tokenizer, encoder = _init(TokenizerModel, "tokenizer"), _init(EncoderModel, "encoder_fused", mutate=half)
    texts = ["a short one", "a considerably longer sentence about the declared output type"]
    (tokens,) = tokenizer.execute([Request(TEXT=np.array([[t.encode()] for t in texts], dtype=object))])
    assert tokens.output("INPUT_IDS").dtype == torch.int64
    (out,) = encoder.execute([Request(INPUT_IDS=tokens.output("INPUT_IDS"), ATTENTION_MASK=tokens.output("ATTENTION_MASK"))])
    assert out.error is None and out.output("EMBEDDING").dtype == torch.float16
    assert_cosines(out.output("EMBEDDING").float().numpy(), reference(texts))


def test_a_declared_output_type_the_model_cannot_produce_fails_initialize_naming_it():
    from tritonclient.grpc import model_config_pb2 as mc

    def int_embedding(config):
        config.output[0].data_type = mc.TYPE_INT32

    def int32_ids(config):
        next(t for t in config.output if t.name == "INPUT_IDS").data_type = mc.TYPE_INT32

    with pytest.raises(ConfigError, match="output EMBEDDING is declared TYPE_INT32; the model produces TYPE_FP32, so "
                                          "declare TYPE_FP16, TYPE_FP32, TYPE_FP64 here"):
        _init(EncoderModel, "encoder_fused", mutate=int_embedding)
    with pytest.raises(ConfigError, match="output INPUT_IDS is declared TYPE_INT32; the model produces TYPE_INT64, so "
                                          "declare TYPE_INT64 here"):
        _init(TokenizerModel, "tokenizer", mutate=int32_ids)


def test_a_tokenizer_sized_one_core_keeps_its_stub_serial(monkeypatch):
    """`parallel: false` (the plan's instances of a core each): the stub's batch calls run on the instance's thread."""
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    _init(TokenizerModel, "tokenizer")  # shipped: parallel true, the library left as it is
    assert "TOKENIZERS_PARALLELISM" not in os.environ
    _init(TokenizerModel, "tokenizer", parallel="false")
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"


def test_oversized_texts_fail_alone_with_the_limit_named():
    tokenizer = _init(TokenizerModel, "tokenizer", max_text_bytes="64", max_request_bytes="100")
    responses = tokenizer.execute([
        Request(TEXT=np.array([[b"fits"]], dtype=object)),
        Request(TEXT=np.array([[b"x" * 65]], dtype=object)),
        Request(TEXT=np.array([[b"y" * 60], [b"z" * 60]], dtype=object)),
    ])
    assert responses[0].error is None
    assert responses[1].error.code() == "INVALID_ARG" and "TEXT[0] has 65 bytes; at most 64" in responses[1].error.message()
    assert responses[2].error.code() == "INVALID_ARG" and "120 bytes; at most 100 per request" in responses[2].error.message()


def test_attention_mask_values_and_hidden_length_are_checked(models):
    encoder = models[2]
    ones = torch.ones(1, 8, dtype=torch.int64)
    twos = Request(HIDDEN=torch.zeros(1, 8, 384, dtype=torch.float16), ATTENTION_MASK=2 * ones)
    long = Request(HIDDEN=torch.zeros(1, 257, 384, dtype=torch.float16), ATTENTION_MASK=torch.ones(1, 257, dtype=torch.int64))
    good = Request(HIDDEN=torch.zeros(1, 8, 384, dtype=torch.float16), ATTENTION_MASK=ones)
    bad_mask, too_long, fine = encoder.execute([twos, long, good])
    assert bad_mask.error.code() == "INVALID_ARG" and "ATTENTION_MASK values must be 0 or 1" in bad_mask.error.message()
    assert too_long.error.code() == "INVALID_ARG" and "length 257 exceeds max_seq_length 256" in too_long.error.message()
    assert fine.error is None and fine.output("EMBEDDING").shape == (1, 384)


def test_preprocess_output_dims_must_match_its_image_size():
    from tandem_serve.triton.vision_models import ImagePreprocessModel

    model = _init(ImagePreprocessModel, "image_preprocess")
    assert model.stage.config.image_size == 640
    with pytest.raises(ConfigError, match=r"PIXELS dims \[3, 640, 640\] do not match the model \(\[3, 320, 320\]\).*detector"):
        _init(ImagePreprocessModel, "image_preprocess", image_size="320")
