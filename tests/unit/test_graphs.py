"""The CUDA-graph encoder's buckets and padding, run eagerly on the CPU (the graphs themselves: tests/gpu)."""

import pytest
import torch

from tandem_serve.text.bert import load_sentence_encoder, load_token_embedding
from tandem_serve.text.graphs import GraphedEncoder, bucket, ladder
from tandem_serve.text.tokenize import TextTokenizer
from tests.helpers import EDGE_TEXTS, mixed_texts


def test_ladder_buckets_every_size_with_at_most_half_padding():
    sizes = ladder(64)
    assert sizes[:8] == [1, 2, 3, 4, 6, 8, 12, 16] and sizes[-1] == 64
    for size in range(1, 65):
        chosen = bucket(size, sizes)
        assert size <= chosen <= max(2, 1.5 * size), (size, chosen)
    assert bucket(65, sizes) is None
    assert ladder(100, 16)[0] == 16 and ladder(100, 16)[-1] == 100  # an odd limit is a bucket of its own
    assert ladder(8, 16) == []


@pytest.fixture(scope="module")
def text_batches(model_files):
    tokenizer = TextTokenizer(model_files.tokenizer_json, model_files.max_seq_length)
    texts = EDGE_TEXTS + mixed_texts(40, seed=7)
    return [tokenizer(texts[start:start + size]) for start, size in ((0, 1), (1, 5), (6, 13), (19, 1), (20, 30))]


@pytest.mark.parametrize("fused", [True, False])
def test_padded_buckets_give_the_unpadded_embeddings(model_files, text_batches, fused):
    """Each batch through its bucket (padded rows and positions) equals the module on the batch as it is."""
    encoder = load_sentence_encoder(model_files, fused=fused)
    embedding = load_token_embedding(model_files)
    graphed = GraphedEncoder(encoder, torch.device("cpu"), max_batch=16, max_length=model_files.max_seq_length,
                             pad_id=model_files.bert.pad_token_id, fused=fused, capture=False)
    seen = set()
    with torch.inference_mode():
        for batch in text_batches:
            ids, mask = torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask)
            inputs = ids if fused else embedding(ids)
            expected = encoder(inputs, mask)
            got = graphed(inputs, mask)
            torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
            seen.add((len(ids), graphed.covers(*mask.shape)))
    assert {(5, True), (13, True)} <= seen and any(b > 16 and not covered for b, covered in seen)  # >16: eagerly
    assert {b for b, _ in graphed.buckets} == {1, 6, 16}  # batches of 1, 5 and 13 rows
    assert all(n in graphed.lengths for _, n in graphed.buckets)
