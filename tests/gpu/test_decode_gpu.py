"""nvJPEG decoding on the GPU against the CPU path: pixels within a stated tolerance, the same detections, and the
same per-image errors. Figures (difference, images/s) are recorded in $TANDEM_RESULTS."""

from __future__ import annotations

import io
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image

from tandem_serve.runtime.per_request import Failure
from tandem_serve.stage_config import DetectorConfig
from tandem_serve.vision.detector import DetectStage
from tandem_serve.vision.letterbox import preprocess
from tandem_serve.vision.metrics import MatchCounts
from tandem_serve.vision.nms import iou_one_to_many, postprocess
from tandem_serve.vision.shapes import generate_scene
from tandem_serve.workloads import mixed_size_jpegs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# Decoders differ in IDCT and chroma upsampling, and the CPU path decodes large JPEGs at a reduced DCT scale:
# letterboxed pixels may differ by a few grey levels on average.
MEAN_ABS_TOLERANCE = 3.0


@pytest.fixture(scope="module")
def decoder():
    from tandem_serve.vision.gpu_decode import GpuDecoder

    return GpuDecoder(640, "cuda:0")


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def test_gpu_and_cpu_letterboxes_agree(decoder, results):
    images = mixed_size_jpegs(32, seed=8)
    gpu = decoder([decoder.check(d) for d in images])
    diffs = []
    for data, (pixels, box) in zip(images, gpu):
        cpu_pixels, cpu_box = preprocess(data, 640)
        assert box == cpu_box  # the same geometry
        diffs.append(np.abs(pixels.cpu().numpy().astype(np.int16) - cpu_pixels).ravel())
    diffs = np.concatenate(diffs)
    results["gpu_decode_vs_cpu"] = {"mean_abs": float(diffs.mean()), "p99_abs": float(np.percentile(diffs, 99)),
                                    "max_abs": int(diffs.max())}
    assert diffs.mean() <= MEAN_ABS_TOLERANCE, results["gpu_decode_vs_cpu"]
    assert decoder.fallbacks == 0


def test_both_paths_detect_the_same_shapes(decoder, results):
    stage = DetectStage(DetectorConfig(), "cuda:0")
    rng = np.random.default_rng(99)
    scenes = [generate_scene(rng) for _ in range(60)]
    datas = [_jpeg(s.image, int(rng.integers(75, 96))) for s in scenes]
    gpu = decoder([decoder.check(d) for d in datas])
    counts = {"gpu": MatchCounts(), "cpu": MatchCounts()}
    matched, total = 0, 0
    for scene, data, (pixels, box) in zip(scenes, datas, gpu):
        found = {}
        for path, (p, b) in (("gpu", (pixels, box)), ("cpu", preprocess(data, 640))):
            tensor = p if isinstance(p, torch.Tensor) else torch.from_numpy(p)
            rows = stage([tensor[None].to("cuda:0")])[0][0].cpu().numpy()
            found[path] = postprocess(rows, b, 0.25, 0.45, 300)
            counts[path].add(found[path].boxes, found[path].scores, found[path].classes, scene.boxes, scene.classes)
        if len(found["gpu"].boxes):
            matched += sum(int(iou_one_to_many(b, found["gpu"].boxes).max() >= 0.9) for b in found["cpu"].boxes)
        total += len(found["cpu"].boxes)
    results["gpu_decode_detection"] = {p: {"precision": c.precision, "recall": c.recall} for p, c in counts.items()}
    results["gpu_decode_boxes_matched_iou_0.9"] = matched / max(1, total)
    for c in counts.values():
        assert c.precision >= 0.9 and c.recall >= 0.9, counts
    assert matched >= 0.95 * total, (matched, total)


def test_bad_images_fail_alone_and_other_formats_fall_back(decoder):
    rng = np.random.default_rng(5)
    good = _jpeg(generate_scene(rng).image)
    png = io.BytesIO()
    generate_scene(rng).image.save(png, format="PNG")
    truncated = good[: good.index(b"\xff\xda") + 40]  # headers intact, the scan cut short: refused on both paths
    before = decoder.fallbacks
    items = [decoder.check(d) for d in (good, png.getvalue(), truncated, good)]
    out = decoder(items)
    assert isinstance(out[2], Failure) and out[2].invalid and "not a decodable image" in out[2].message, out[2]
    for index in (0, 1, 3):
        pixels, box = out[index]
        assert pixels.device.type == "cuda" and pixels.shape == (3, 640, 640) and pixels.dtype == torch.uint8
    assert decoder.fallbacks - before == 2  # the PNG and the truncated JPEG went to the CPU path
    from tandem_serve.errors import InvalidInputError

    for data, message in ((b"", "empty"), (b"not an image" * 10, "not a decodable image")):
        with pytest.raises(InvalidInputError, match=message):
            decoder.check(data)


def test_gpu_decode_throughput(decoder, results):
    images = mixed_size_jpegs(64, seed=21)
    items = [decoder.check(d) for d in images]
    decoder(items)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        decoder(items)
    torch.cuda.synchronize()
    gpu_rate = 5 * len(images) / (time.perf_counter() - start)
    torch.set_num_threads(1)
    start = time.perf_counter()
    for data in images:
        preprocess(data, 640)
    cpu_rate = len(images) / (time.perf_counter() - start)
    results["gpu_decode_images_per_s_batch64"] = gpu_rate
    results["cpu_path_images_per_s_one_core"] = cpu_rate
    assert gpu_rate > cpu_rate


def test_triton_decodes_on_both_devices_in_tandem(tmp_path, results):
    """image_preprocess with a KIND_GPU (nvJPEG) and two KIND_CPU instances: Triton hands each batch to whichever
    instance is free, the detector reads the GPU instance's PIXELS over CUDA IPC, and the answers stay right."""
    from concurrent.futures import ThreadPoolExecutor

    from tritonclient.grpc import model_config_pb2 as mc

    from tandem_serve.clients.triton import ObjectDetectionClient
    from tandem_serve.triton.launcher import EmbeddedTriton, TritonOptions
    from tandem_serve.triton.repository import export_repository
    from tandem_serve.triton.model_config import read_config, write_config
    from tandem_serve.vision.shapes import encode_scene

    repository = tmp_path / "repo"
    export_repository(repository)
    for name in ("tokenizer", "token_embedding", "encoder", "encoder_fused", "text_embedding", "text_embedding_fused"):
        shutil.rmtree(repository / name)  # the detection pipeline alone
    config = read_config(repository / "image_preprocess" / "config.pbtxt")
    del config.instance_group[:]
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=1, gpus=[0])
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=2)
    write_config(config, repository / "image_preprocess" / "config.pbtxt")
    rng = np.random.default_rng(17)
    scenes = [generate_scene(rng) for _ in range(80)]
    datas = [_jpeg(s.image, 90) for s in scenes]
    with EmbeddedTriton(TritonOptions(model_repositories=[repository], workspace=tmp_path / "ws")) as server:
        def detect(data):
            with ObjectDetectionClient(server.grpc_url) as client:
                return client.detect(data)

        with ThreadPoolExecutor(8) as pool:
            found = list(pool.map(detect, datas))
        log = server.log_path.read_text()
    assert "image_preprocess decodes on the GPU (nvJPEG)" in log and "image_preprocess decodes on the CPU" in log
    assert "nvJPEG decoded its first batch" in log  # the GPU instance took work
    counts = MatchCounts()
    for scene, f in zip(scenes, found):
        counts.add(f.boxes, f.scores, f.classes, scene.boxes, scene.classes)
    results["triton_tandem_decode"] = {"precision": counts.precision, "recall": counts.recall}
    assert counts.precision >= 0.9 and counts.recall >= 0.9, counts
