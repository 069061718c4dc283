"""Tokenizer stage against the HuggingFace tokenizer that sentence-transformers uses."""

import numpy as np
import pytest
from transformers import AutoTokenizer

from tandem_serve.errors import InvalidInputError
from tandem_serve.text.tokenize import TextTokenizer, decode_utf8, padded_length
from tests.helpers import EDGE_TEXTS, mixed_texts


@pytest.fixture(scope="module")
def tokenizer(model_files):
    return TextTokenizer(model_files.tokenizer_json, model_files.max_seq_length)


@pytest.fixture(scope="module")
def hf_tokenizer(model_files):
    return AutoTokenizer.from_pretrained(str(model_files.root))


@pytest.mark.parametrize("text", EDGE_TEXTS + mixed_texts(20))
def test_ids_match_reference_tokenizer(tokenizer, hf_tokenizer, text):
    batch = tokenizer([text])
    expected = hf_tokenizer([text], truncation=True, max_length=256)["input_ids"][0]
    n = int(batch.attention_mask[0].sum())
    assert batch.input_ids[0, :n].tolist() == expected
    assert (batch.input_ids[0, n:] == 0).all() and (batch.attention_mask[0, n:] == 0).all()


def test_padding_policy_rounds_request_to_multiple_of_8(tokenizer):
    batch = tokenizer(["one", "a somewhat longer sentence with several more words in it"])
    longest = int(batch.attention_mask.sum(axis=1).max())
    assert batch.input_ids.shape[1] == -(-longest // 8) * 8
    assert batch.input_ids.dtype == np.int64 and batch.attention_mask.dtype == np.int64


def test_truncates_at_max_seq_length(tokenizer):
    batch = tokenizer(["token " * 1000])
    assert batch.input_ids.shape == (1, 256)
    assert int(batch.attention_mask.sum()) == 256
    assert batch.input_ids[0, -1] == 102  # [SEP] kept after truncation


def test_groups_pad_independently_and_match_single_calls(tokenizer):
    groups = [["short"], mixed_texts(5, seed=3), ["word " * 300]]
    for batch, group in zip(tokenizer.tokenize_groups(groups), groups):
        single = tokenizer(group)
        np.testing.assert_array_equal(batch.input_ids, single.input_ids)
        np.testing.assert_array_equal(batch.attention_mask, single.attention_mask)


@pytest.mark.parametrize("longest,expected", [(1, 8), (8, 8), (9, 16), (250, 256), (256, 256)])
def test_padded_length(longest, expected):
    assert padded_length(longest, 8, 256) == expected


def test_invalid_utf8_names_item_and_byte():
    with pytest.raises(InvalidInputError, match=r"TEXT\[1\] is not valid UTF-8.*byte 2"):
        decode_utf8([b"fine", b"ab\xff\xfe"])
    assert decode_utf8(["ok", "é".encode()]) == ["ok", "é"]


@pytest.mark.parametrize("parallelism", [None, "false"])
def test_serial_tokenizer_matches_the_parallel_one(model_files, tokenizer, monkeypatch, parallelism):
    """The serial paths (`encode` per text; one batch call where the library is serial) give the parallel ids."""
    from tandem_serve.text.tokenize import tokenizers_serial

    serial = TextTokenizer(model_files.tokenizer_json, model_files.max_seq_length, parallel=False)
    groups = [mixed_texts(5, seed=1), EDGE_TEXTS, mixed_texts(30, seed=2)]
    expected = tokenizer.tokenize_groups(groups)
    if parallelism is None:
        monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    else:
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", parallelism)
    assert tokenizers_serial() == (parallelism is not None)
    for got, want in zip(serial.tokenize_groups(groups), expected):
        assert np.array_equal(got.input_ids, want.input_ids)
        assert np.array_equal(got.attention_mask, want.attention_mask)


def test_text_size_limits_name_the_item_and_the_parameter():
    from tandem_serve.text.tokenize import check_text_sizes

    check_text_sizes([b"x" * 10, "é" * 5], max_text_bytes=10, max_request_bytes=20)  # 10 and 10 UTF-8 bytes: fine
    with pytest.raises(InvalidInputError, match=r"TEXT\[1\] has 12 bytes; at most 10 per text .*max_text_bytes"):
        check_text_sizes([b"ok", "é" * 6], max_text_bytes=10, max_request_bytes=100)
    with pytest.raises(InvalidInputError, match=r"texts have 24 bytes; at most 20 per request .*max_request_bytes"):
        check_text_sizes([b"x" * 8] * 3, max_text_bytes=10, max_request_bytes=20)
