"""The encoder's token budget served by the real Triton: requests of very different lengths merged by the dynamic
batcher, run in groups by length, each answer still sentence-transformers' embedding of its text."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tritonclient.grpc as grpcclient

from tandem_serve.clients.triton import TextEmbeddingClient
from tandem_serve.triton.launcher import EmbeddedTriton, TritonOptions
from tandem_serve.triton.model_config import read_config, write_config
from tandem_serve.triton.repository import export_repository
from tandem_serve.triton.statistics import read_statistics
from tests.helpers import EDGE_TEXTS, assert_cosines, mixed_texts


def test_merged_requests_split_by_length_answer_each_text_right(reference, tmp_path):
    repo = tmp_path / "repo"
    export_repository(repo)
    for name in ("image_preprocess", "detector", "nms", "object_detection", "encoder", "token_embedding",
                 "text_embedding"):
        shutil.rmtree(repo / name)
    path = repo / "encoder_fused" / "config.pbtxt"
    config = read_config(path)
    config.parameters["max_batch_tokens"].string_value = "256"
    config.dynamic_batching.max_queue_delay_microseconds = 50_000  # long enough for the threads' requests to merge
    write_config(config, path)
    texts = EDGE_TEXTS + mixed_texts(40, seed=21)  # 1 to ~300 tokens: one row over the budget runs alone
    with EmbeddedTriton(TritonOptions(model_repositories=[repo], workspace=tmp_path / "ws")) as server:
        def embed(text: str):
            with TextEmbeddingClient(server.grpc_url, model="text_embedding_fused") as client:
                return client.embed([text])[0]

        with ThreadPoolExecutor(12) as pool:
            got = list(pool.map(embed, texts))
        stats = {s.model: s for s in read_statistics(grpcclient.InferenceServerClient(server.grpc_url), "grpc")}
        log = server.log_path.read_text(errors="replace")
    assert_cosines(np.stack(got), reference(texts), 0.99999)
    encoder = stats["encoder_fused"]
    assert encoder.requests == len(texts) and encoder.executions < encoder.requests, encoder  # batches were merged
    assert "at most 256 tokens per call" in log
