"""`tandem embed` and `tandem detect` against the real Triton: results, resumption, interruption, no leaks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
from PIL import Image

from tandem_serve.vision.metrics import MatchCounts
from tandem_serve.vision.shapes import encode_scene, generate_scene
from tests.helpers import EDGE_TEXTS, assert_cosines, mixed_texts

TANDEM = [sys.executable, "-m", "tandem_serve.cli"]


def _texts(count: int) -> list[str]:
    single_line = [t.replace("\n", " ").replace("\r", " ") for t in EDGE_TEXTS]
    return (single_line + mixed_texts(count, seed=44))[:count]


def _embed(triton, source, out, *extra):
    return subprocess.run([*TANDEM, "embed", str(source), "--out", str(out), "--url", triton.grpc_url, "--batch", "16",
                           "--in-flight", "4", *extra], capture_output=True, text=True, timeout=600)


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
    assert "300/300 texts" in result.stderr  # the progress line
    assert {n for n in os.listdir("/dev/shm") if n.startswith("tandem")} == before
    assert not (tmp_path / "embeddings.npy.done").exists()

    # An interrupted job: chunk 5 never finished. Rerunning does only that chunk.
    np.memmap(tmp_path / "partial.npy.done", np.uint8, mode="w+", shape=(19,))[:] = 1
    (tmp_path / "partial.npy.done").write_bytes(bytes([1] * 5 + [0] + [1] * 13))
    meta = {"source": str(source.resolve()), "lines": 300, "hidden": 384, "batch": 16, "model": "text_embedding"}
    (tmp_path / "partial.npy.json").write_text(json.dumps(meta))
    partial = embeddings.copy()
    partial[80:96] = 0
    np.save(tmp_path / "partial.npy", partial)
    result = _embed(triton, source, tmp_path / "partial.npy")
    assert result.returncode == 0, result.stderr
    assert "1 of 19 chunk(s) left" in result.stderr
    np.testing.assert_allclose(np.load(tmp_path / "partial.npy"), embeddings, atol=1e-6)


def test_embed_interrupted_with_ctrl_c_then_resumed(triton, reference, tmp_path):
    texts = [t[:200] for t in mixed_texts(1000, seed=9)]
    source = tmp_path / "many.txt"
    source.write_text("\n".join(texts) + "\n", encoding="utf-8")
    out = tmp_path / "many.npy"
    process = subprocess.Popen([*TANDEM, "embed", str(source), "--out", str(out), "--url", triton.grpc_url,
                                "--batch", "16", "--in-flight", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
    result = _embed(triton, source, out)
    assert result.returncode == 0 and json.loads(result.stdout)["complete"], result.stderr
    assert "chunk(s) left" in result.stderr
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
