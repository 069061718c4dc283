"""Token embedding and encoder modules against sentence-transformers."""

import numpy as np
import pytest
import torch

from tandem_serve.errors import InvalidInputError, ModelFilesError
from tandem_serve.model_files import SentenceModelFiles
from tandem_serve.text.bert import check_token_ids, load_sentence_encoder, load_token_embedding
from tandem_serve.text.tokenize import TextTokenizer
from tests.helpers import EDGE_TEXTS, assert_cosines, mixed_texts

TEXTS = EDGE_TEXTS + mixed_texts(16)


@pytest.fixture(scope="module")
def stages(model_files):
    tokenizer = TextTokenizer(model_files.tokenizer_json, model_files.max_seq_length)
    return tokenizer, load_token_embedding(model_files), load_sentence_encoder(model_files), load_sentence_encoder(model_files, fused=True)


def _embed(stages, texts, hidden_dtype=torch.float16):
    tokenizer, embedding, encoder, fused = stages
    batch = tokenizer(texts)
    ids, mask = torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask)
    with torch.inference_mode():
        return encoder(embedding(ids).to(hidden_dtype), mask).numpy(), fused(ids, mask).numpy()


def test_split_stages_match_sentence_transformers(stages, reference):
    expected = reference(TEXTS)
    separate_fp16, fused = _embed(stages, TEXTS)
    separate_fp32, _ = _embed(stages, TEXTS, torch.float32)
    assert_cosines(fused, expected, 0.99999)
    assert_cosines(separate_fp32, expected, 0.99999)
    assert_cosines(separate_fp16, expected, 0.9999)


def test_padding_does_not_change_embeddings(stages):
    tokenizer, embedding, encoder, _ = stages
    batch = tokenizer(["padding must be masked out"])
    ids, mask = torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask)
    long_ids = torch.nn.functional.pad(ids, (0, 40))
    long_mask = torch.nn.functional.pad(mask, (0, 40))
    with torch.inference_mode():
        short = encoder(embedding(ids), mask)
        padded = encoder(embedding(long_ids), long_mask)
    torch.testing.assert_close(short, padded, atol=1e-5, rtol=1e-5)


def test_check_token_ids_rejects_bad_requests(model_files):
    config = model_files.bert
    ok = torch.ones((2, 4), dtype=torch.int64)
    check_token_ids(ok, ok, config, 256)
    with pytest.raises(InvalidInputError, match="values must lie"):
        check_token_ids(ok * config.vocab_size, None, config, 256)
    with pytest.raises(InvalidInputError, match="exceeds max_seq_length"):
        check_token_ids(torch.ones((1, 300), dtype=torch.int64), None, config, 256)
    with pytest.raises(InvalidInputError, match="no token to attend"):
        check_token_ids(ok, torch.zeros_like(ok), config, 256)
    with pytest.raises(InvalidInputError, match="does not match"):
        check_token_ids(ok, ok[:, :2], config, 256)


def test_weights_missing_a_tensor_name_it(model_files, tmp_path):
    from safetensors.torch import load_file, save_file

    for name in ("config.json", "tokenizer.json", "sentence_bert_config.json"):
        (tmp_path / name).write_bytes((model_files.root / name).read_bytes())
    weights = load_file(str(model_files.weights))
    del weights["encoder.layer.3.output.dense.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"))
    files = SentenceModelFiles.load(tmp_path)
    load_token_embedding(files)  # the embedding tensors are all there
    with pytest.raises(ModelFilesError, match=r"lacks tensor 'encoder.layer.3.output.dense.weight'"):
        load_sentence_encoder(files)


def test_a_random_bert_directory_reads_the_same_in_sentence_transformers(tmp_path):
    """random_bert writes HuggingFace keys: sentence-transformers loads the same network from it."""
    from sentence_transformers import SentenceTransformer

    from tandem_serve.model_files import SentenceModelFiles
    from tandem_serve.text.bert import load_sentence_encoder
    from tandem_serve.text.tokenize import TextTokenizer
    from tandem_serve.workloads import random_bert

    files = SentenceModelFiles.load(random_bert("tiny", tmp_path))
    assert files.bert.hidden_size == 128 and files.bert.num_hidden_layers == 2
    texts = ["hello world", "a much longer sentence about serving models on a gpu next to the cpu"]
    batch = TextTokenizer(files.tokenizer_json, files.max_seq_length, 8, files.bert.pad_token_id)(texts)
    with torch.inference_mode():
        ours = load_sentence_encoder(files, fused=True)(torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask))
    reference = SentenceTransformer(str(files.root), device="cpu").encode(texts, normalize_embeddings=True)
    assert np.all((ours.numpy() * reference).sum(axis=1) > 0.9999)
