"""`tandem embed` and `tandem detect` against the real Triton: results, resumption, interruption, no leaks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from tandem_serve.clients.triton import TextEmbeddingClient
from tandem_serve.triton.launcher import EmbeddedTriton, TritonOptions
from tandem_serve.triton.model_config import read_config, write_config
from tandem_serve.triton.repository import export_repository
from tandem_serve.vision.metrics import MatchCounts
from tandem_serve.vision.shapes import generate_scene
from tests.helpers import EDGE_TEXTS, assert_cosines, mixed_texts

TANDEM = [sys.executable, "-m", "tandem_serve.cli"]


def _texts(count: int) -> list[str]:
    single_line = [t.replace("\n", " ").replace("\r", " ") for t in EDGE_TEXTS]
    return (single_line + mixed_texts(count, seed=44))[:count]


def _embed(triton, source, out, *extra, window=64):
    return subprocess.run([*TANDEM, "embed", str(source), "--out", str(out), "--url", triton.grpc_url, "--batch", "16",
                           "--in-flight", "4", "--window", str(window), *extra], capture_output=True, text=True,
                          timeout=600)


def test_embed_file_matches_reference_and_resumes(triton, reference, tmp_path):
    texts = _texts(300)
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(texts) + "\n", encoding="utf-8")
    out = tmp_path / "embeddings.npy"
    before = {n for n in os.listdir("/dev/shm") if n.startswith("tandem")}
    result = _embed(triton, source, out, "--shm", "system")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["complete"] and summary["texts"] == 300 and summary["hidden"] == 384
    embeddings = np.load(out)
    assert embeddings.shape == (300, 384) and embeddings.dtype == np.float32
    assert_cosines(embeddings, reference(texts))
    assert "300/300" in result.stderr and "texts/s" in result.stderr  # the progress line (tqdm)
    assert {n for n in os.listdir("/dev/shm") if n.startswith("tandem")} == before
    assert not (tmp_path / "embeddings.npy.done").exists()

    # An interrupted job: window 2 of 5 (lines 128-191, sent in 4 requests sorted by length) never finished.
    # Rerunning does only that window.
    (tmp_path / "partial.npy.done").write_bytes(bytes([1, 1, 0, 1, 1]))
    meta = {"source": str(source.resolve()), "lines": 300, "hidden": 384, "window": 64, "model": "text_embedding"}
    (tmp_path / "partial.npy.json").write_text(json.dumps(meta))
    partial = embeddings.copy()
    partial[128:192] = 0
    np.save(tmp_path / "partial.npy", partial)
    result = _embed(triton, source, tmp_path / "partial.npy")
    assert result.returncode == 0, result.stderr
    assert "1 of 5 window(s) left" in result.stderr
    np.testing.assert_allclose(np.load(tmp_path / "partial.npy"), embeddings, atol=1e-6)


def test_embed_a_rejected_line_fails_its_window_only_and_names_it(triton, reference, tmp_path):
    texts = [t[:200] for t in mixed_texts(96, seed=5)]
    lines = texts[:40] + ["x" * 70_000] + texts[40:]  # over the tokenizer's max_text_bytes (65,536)
    source = tmp_path / "one-bad.txt"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "one-bad.npy"
    result = _embed(triton, source, out, window=32)
    assert result.returncode == 1 and result.stdout, result.stderr
    summary = json.loads(result.stdout)
    assert summary["failed_requests"] == 1 and not summary["complete"]
    assert "lines " in result.stderr and "41" in result.stderr and "max_text_bytes" in result.stderr
    assert list(np.fromfile(tmp_path / "one-bad.npy.done", np.uint8)) == [1, 0, 1, 1]
    embeddings = np.load(out)
    assert_cosines(embeddings[:32], reference(lines[:32]))
    assert_cosines(embeddings[64:], reference(lines[64:]))
    assert not embeddings[32:64].any()  # the failed window is not written


def test_embed_interrupted_with_ctrl_c_then_resumed(triton, reference, tmp_path):
    texts = [t[:200] for t in mixed_texts(1000, seed=9)]
    source = tmp_path / "many.txt"
    source.write_text("\n".join(texts) + "\n", encoding="utf-8")
    out = tmp_path / "many.npy"
    process = subprocess.Popen([*TANDEM, "embed", str(source), "--out", str(out), "--url", triton.grpc_url,
                                "--batch", "16", "--in-flight", "2", "--window", "16"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "many.npy.done").exists() or not np.fromfile(tmp_path / "many.npy.done", np.uint8).any():
        assert time.monotonic() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "rerun the same command to resume" in stderr
    done = np.fromfile(tmp_path / "many.npy.done", np.uint8)
    assert 0 < done.sum() < len(done)
    result = _embed(triton, source, out, window=16)
    assert result.returncode == 0 and json.loads(result.stdout)["complete"], result.stderr
    assert "window(s) left" in result.stderr
    assert_cosines(np.load(out), reference(texts))


def test_detect_folder_with_a_bad_file_and_resume(triton, tmp_path):
    rng = np.random.default_rng(8)
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    scenes = {}
    for i in range(6):
        scene = generate_scene(rng)
        name = f"sub/scene{i}.png" if i % 2 else f"scene{i}.jpg"
        scene.image.save(folder / name, quality=92) if name.endswith(".jpg") else scene.image.save(folder / name)
        scenes[name] = scene
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / "notes.txt").write_text("ignored")
    out = tmp_path / "results.jsonl"
    command = [*TANDEM, "detect", str(folder), "--out", str(out), "--url", triton.grpc_url, "--in-flight", "3"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["errors"] == 1
    records = {r["file"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(records) == set(scenes) | {"broken.jpg"}
    assert "not a decodable image" in records["broken.jpg"]["error"]
    counts = MatchCounts()
    for name, scene in scenes.items():
        r = records[name]
        counts.add(np.array(r["boxes"], np.float32).reshape(-1, 4), np.array(r["scores"], np.float32),
                   np.array(r["classes"], np.int32), scene.boxes, scene.classes)
    assert counts.precision >= 0.9 and counts.recall >= 0.9, counts
    Image.new("RGB", (64, 48), (20, 200, 20)).save(folder / "broken.jpg")  # fixed; the rest is not redone
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "6 of 7 image(s) already done" in result.stderr, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 7 and not [r for r in records if "error" in r]


def test_embed_sends_again_what_a_busy_server_turned_away(reference, tmp_path):
    """A request queued past the model's timeout (10 s in the shipped configs, which a CPU server with many long
    texts in flight passes) is turned away without being computed. With the encoder's queue cut to 50 ms, plain
    requests queued behind a batch are; `tandem embed` sends those again after a pause and completes."""
    repo = tmp_path / "repo"
    export_repository(repo)
    for name in ("image_preprocess", "detector", "nms", "object_detection", "encoder", "token_embedding",
                 "text_embedding"):
        shutil.rmtree(repo / name)
    path = repo / "encoder_fused" / "config.pbtxt"
    config = read_config(path)
    config.dynamic_batching.default_queue_policy.default_timeout_microseconds = 50_000
    write_config(config, path)
    rng = np.random.default_rng(12)
    words = "queue batch tensor token serving latency".split()
    texts = [" ".join(rng.choice(words, size=150)) for _ in range(192)]  # 3 requests of 64 that cannot merge
    with EmbeddedTriton(TritonOptions(model_repositories=[repo], workspace=tmp_path / "ws")) as server:
        def plain(chunk: list[str]) -> str:
            try:
                with TextEmbeddingClient(server.grpc_url, model="text_embedding_fused") as client:
                    client.embed(chunk)
                return "ok"
            except Exception as exc:  # noqa: BLE001 - the outcome is what the test reads
                return str(exc)

        with ThreadPoolExecutor(3) as pool:
            outcomes = list(pool.map(plain, [texts[i:i + 64] for i in range(0, 192, 64)]))
        assert any("Request timeout expired" in o for o in outcomes), outcomes  # the control: the queue gives up
        source = tmp_path / "long.txt"
        source.write_text("\n".join(texts) + "\n", encoding="utf-8")
        command = [*TANDEM, "embed", str(source), "--out", str(tmp_path / "long.npy"), "--url", server.grpc_url,
                   "--model", "text_embedding_fused", "--batch", "64", "--in-flight", "3"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["complete"] and summary["retried_requests"] >= 1, summary
    assert "request(s) away as busy" in result.stderr
    assert_cosines(np.load(tmp_path / "long.npy"), reference(texts))
