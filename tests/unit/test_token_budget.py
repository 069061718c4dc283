"""The encoder's token budget: the grouping against an exhaustive search, and embeddings unchanged by it."""

import itertools
import math

import numpy as np
import pytest
import torch

from tandem_serve.stage_config import EncoderConfig
from tandem_serve.text.bert import load_token_embedding
from tandem_serve.text.graphs import bucket, ladder
from tandem_serve.text.stages import EncoderStage
from tandem_serve.text.token_budget import CALL_SHARE, length_groups, row_lengths
from tandem_serve.text.tokenize import TextTokenizer
from tests.helpers import EDGE_TEXTS, assert_cosines, mixed_texts


def _objective(groups, budget):
    """What the grouping minimises, at the buckets' lengths: tokens computed plus a fixed cost per call."""
    return sum(budget / CALL_SHARE + len(g.rows) * g.length for g in groups)


def _brute_force(lengths, budget, width):
    """The cheapest split of the rows (longest first) into runs cut where the length bucket changes, each run chunked
    under the budget: every choice of cuts enumerated."""
    sizes = ladder(width, min(16, width))
    ordered = sorted(lengths, reverse=True)
    levels = [bucket(n, sizes) for n in ordered]
    edges = [i for i in range(1, len(ordered)) if levels[i] != levels[i - 1]]
    best = math.inf
    for count in range(len(edges) + 1):
        for cuts in itertools.combinations(edges, count):
            bounds = [0, *cuts, len(ordered)]
            cost = 0.0
            for start, stop in zip(bounds, bounds[1:]):
                per_call = max(1, budget // levels[start])
                cost += math.ceil((stop - start) / per_call) * budget / CALL_SHARE + (stop - start) * levels[start]
            best = min(best, cost)
    return best


def _bucketed(groups, lengths, width):
    """The groups' cost at bucket lengths (the grouping's own measure; their real lengths are at most that)."""
    sizes = ladder(width, min(16, width))
    return [type(g)(g.rows, bucket(int(lengths[g.rows[0]]), sizes)) for g in groups]


@pytest.mark.parametrize("seed", range(40))
def test_grouping_is_the_cheapest_split_and_keeps_every_row_once(seed):
    rng = np.random.default_rng(seed)
    width = int(rng.choice([64, 128, 256, 250]))
    lengths = rng.choice([3, 9, 17, 30, 47, 64, 100, 160, width], size=int(rng.integers(2, 40)))
    lengths = np.minimum(lengths, width)
    budget = int(rng.choice([256, 1024, 4096, 16384]))
    groups = length_groups(lengths, budget, width)
    rows = np.concatenate([g.rows for g in groups])
    assert sorted(rows.tolist()) == list(range(len(lengths)))
    for g in groups:
        assert lengths[g.rows].max() <= g.length <= width
        assert g.length % 8 == 0 or g.length == width
        assert g.tokens <= budget or len(g.rows) == 1, (g, budget)
        assert list(lengths[g.rows]) == sorted(lengths[g.rows], reverse=True)
    assert _objective(_bucketed(groups, lengths, width), budget) == pytest.approx(_brute_force(list(lengths), budget, width))


def test_a_small_batch_stays_one_call_and_a_large_mixed_one_splits():
    small = np.array([8, 8, 16, 24, 200])  # launch bound: one call is cheaper than two
    groups = length_groups(small, 16384, 256)
    assert len(groups) == 1 and groups[0].length == 200
    mixed = np.array([200] * 26 + [60] * 51 + [20] * 102 + [8] * 77)  # 256 rows of the suite's mix
    groups = length_groups(mixed, 16384, 256)
    assert len(groups) > 1 and all(g.tokens <= 16384 for g in groups)
    assert sum(g.tokens for g in groups) < 0.5 * 256 * 200  # far fewer positions than one padded call
    assert length_groups(mixed, 0, 256)[0].rows.tolist() == list(range(256))  # 0: as it came


def test_row_lengths_trim_right_padding_only():
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 1, 1], [1, 0, 0, 0]])
    assert row_lengths(mask).tolist() == [2, 4, 4, 1]


@pytest.fixture(scope="module")
def mixed_requests(model_files):
    tokenizer = TextTokenizer(model_files.tokenizer_json, model_files.max_seq_length)
    texts = EDGE_TEXTS + mixed_texts(30, seed=11)
    sizes = [1, 3, 1, 7, 1, 8, 2, 1, 6, 1, 4]  # requests of different lengths, merged as a dynamic batch
    requests, start = [], 0
    for size in sizes:
        batch = tokenizer(texts[start:start + size])
        requests.append((torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask)))
        start += size
    return texts[:start], requests


@pytest.mark.parametrize("fused", [True, False])
def test_a_budgeted_batch_gives_sentence_transformers_embeddings(model_files, mixed_requests, reference, fused,
                                                                  restore_torch_threads):
    """Split by length or not, every row's embedding is what sentence-transformers gives its text, and the split
    batch matches the unsplit one."""
    texts, requests = mixed_requests
    stage = EncoderStage(EncoderConfig(fuse_token_embedding=fused), "cpu")
    batch = requests
    if not fused:  # the separate encoder takes hidden states: embed each request's ids first
        embedding = load_token_embedding(model_files)
        with torch.inference_mode():
            batch = [(embedding(ids), mask) for ids, mask in requests]
    outputs = {}
    for budget in (0, 96, 1024):
        stage.max_batch_tokens = budget  # the parsed parameter, as EncoderConfig(max_batch_tokens=budget) sets it
        outputs[budget] = torch.cat(stage(batch)).numpy()
    expected = reference(texts)
    for budget, got in outputs.items():
        assert_cosines(got, expected, 0.99999)
        np.testing.assert_allclose(got, outputs[0], atol=2e-5)
