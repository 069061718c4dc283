"""The measurements behind `tandem profile`: each stage of each pipeline timed on library objects."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from tandem_serve.model_files import SentenceModelFiles
from tandem_serve.stage_config import DetectorConfig, EncoderConfig
from tandem_serve.text.bert import load_sentence_encoder, load_token_embedding, parse_dtype
from tandem_serve.text.graphs import GraphedEncoder
from tandem_serve.text.tokenize import TextTokenizer
from tandem_serve.timing import median_seconds
from tandem_serve.tuning.profile import (
    WORDS,
    Progress,
    ProfileOptions,
    StageTiming,
    cpu_threads,
    precisions_for,
)
from tandem_serve.workloads import mixed_size_jpegs

logger = logging.getLogger(__name__)


def sentences(count: int, words: int, seed: int = 0) -> list[str]:
    """`count` sentences of `words` common words (about one token each)."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=max(1, words))) for _ in range(count)]


def quantized_int8(module: torch.nn.Module) -> torch.nn.Module:
    """Dynamic INT8 quantisation of the Linear layers (CPU)."""
    return torch.ao.quantization.quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8)


def _encoder(files: SentenceModelFiles, device: str, precision: str, fused: bool) -> Callable[..., torch.Tensor]:
    """The encoder as it serves: on a GPU through CUDA graphs up to the default batch (captured on first use)."""
    if precision == "int8":
        return quantized_int8(load_sentence_encoder(files, "cpu", torch.float32, fused=fused))
    module = load_sentence_encoder(files, device, parse_dtype(precision), fused=fused)
    max_batch = EncoderConfig().cuda_graph_max_batch
    if not device.startswith("cuda") or not max_batch:
        return module
    return GraphedEncoder(module, torch.device(device), max_batch, files.max_seq_length, files.bert.pad_token_id, fused)


def text_timings(options: ProfileOptions, devices: list[str]) -> list[StageTiming]:
    """tokenize and token_embedding (CPU), encoder and encoder_fused on every device and precision."""
    files = SentenceModelFiles.load(options.model_dir or None)
    hidden_size = files.bert.hidden_size
    tokenizer = TextTokenizer(files.tokenizer_json, files.max_seq_length, 8, files.bert.pad_token_id,
                              parallel=False)  # core-seconds, like every CPU stage
    embedding = load_token_embedding(files)
    encoders = [(stage, device, precision) for stage in ("encoder", "encoder_fused") for device in devices
                for precision in precisions_for(device, stage)]
    cases = [(length, batch) for length in options.seq_lengths for batch in options.batch_sizes]
    progress = Progress(len(cases) * (2 + len(encoders)))
    check = tokenizer(sentences(16, max(options.seq_lengths), seed=99))
    check_ids, check_mask = torch.from_numpy(check.input_ids), torch.from_numpy(check.attention_mask)
    with torch.inference_mode(), cpu_threads(1):
        reference = load_sentence_encoder(files, "cpu", torch.float32, fused=True)(check_ids, check_mask)
    rows: list[StageTiming] = []
    batches = {}
    for length, batch in cases:
        texts = sentences(batch, length - 2, seed=length * 1000 + batch)
        tokens = tokenizer(texts)
        ids, mask = torch.from_numpy(tokens.input_ids), torch.from_numpy(tokens.attention_mask)
        size = ids.shape[1]
        with torch.inference_mode(), cpu_threads(1):
            hidden = embedding(ids).to(torch.float16)
            rows.append(StageTiming("text", "tokenize", "cpu", "-", batch, size,
                                    median_seconds(lambda: tokenizer(texts), "cpu", options.repeats),
                                    0, size * 16))
            progress.step(f"tokenize batch {batch} length {size}")
            rows.append(StageTiming("text", "token_embedding", "cpu", "fp32", batch, size,
                                    median_seconds(lambda: embedding(ids).to(torch.float16), "cpu", options.repeats),
                                    size * 8, size * hidden_size * 2))
            progress.step(f"token_embedding batch {batch} length {size}")
        batches[(length, batch)] = (ids, mask, hidden)
    for stage, device, precision in encoders:
        fused = stage == "encoder_fused"
        module = _encoder(files, device, precision, fused)
        with torch.inference_mode():
            if fused:
                got = module(check_ids.to(device), check_mask.to(device))
            else:
                got = module(embedding(check_ids).to(device), check_mask.to(device))
            accuracy = float(torch.nn.functional.cosine_similarity(got.float().cpu(), reference).min())
        for length, batch in cases:
            if device == "cpu" and batch > options.cpu_max_batch:
                progress.step(f"{stage} {device} {precision} batch {batch}: skipped on the CPU")
                continue
            ids, mask, hidden = batches[(length, batch)]
            size = ids.shape[1]
            inputs = (ids if fused else hidden).to(device)
            mask_on = mask.to(device)
            with torch.inference_mode(), cpu_threads(1):
                seconds = median_seconds(lambda: module(inputs, mask_on), device, options.repeats)
            in_bytes = size * 16 if fused else size * (hidden_size * 2 + 8)
            rows.append(StageTiming("text", stage, device, precision, batch, size, seconds, in_bytes, hidden_size * 4,
                                    accuracy))
            progress.step(f"{stage} {device} {precision} batch {batch} length {size}: {batch / seconds:.0f}/s")
        del module
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def scenes(count: int, seed: int) -> list[bytes]:
    """`count` encoded synthetic scenes (JPEG or PNG, mixed sizes)."""
    from tandem_serve.vision.shapes import encode_scene, generate_scene

    rng = np.random.default_rng(seed)
    return [encode_scene(generate_scene(rng), rng) for _ in range(count)]


def _box_recall(found: list, reference: list, iou: float = 0.5) -> float:
    """Recall of the reference detections (fp32, first device) by `found`, class required, at IoU >= iou."""
    from tandem_serve.vision.metrics import MatchCounts

    counts = MatchCounts()
    for f, r in zip(found, reference):
        counts.add(f.boxes, f.scores, f.classes, r.boxes, r.classes, iou)
    return counts.recall


def random_detector(size: str) -> Path:
    """Random YOLOv5 weights of `size` (with the bias prior) in the temporary directory (speed, not accuracy)."""
    from tandem_serve.workloads import random_yolov5

    return random_yolov5(size, Path(tempfile.gettempdir()))


def gpu_decode_timings(options: ProfileOptions, devices: list[str], encoded: list[bytes]) -> list[StageTiming]:
    """image_preprocess on each GPU: nvJPEG batch decode + GPU letterbox (vision/gpu_decode.py); none where
    torchvision is missing (logged). Output stays on the GPU for the detector."""
    from tandem_serve.errors import ConfigError
    from tandem_serve.vision.gpu_decode import GpuDecoder

    rows = []
    in_bytes = int(np.mean([len(d) for d in encoded]))
    for device in devices:
        for size in options.image_sizes:
            try:
                decoder = GpuDecoder(size, device)
            except ConfigError as exc:
                logger.info("GPU decoding not profiled: %s", exc)
                return rows
            for batch in options.batch_sizes:
                items = [decoder.check(d) for d in encoded[:batch]]
                seconds = median_seconds(lambda: decoder(items), device, options.repeats)
                rows.append(StageTiming("detection", "image_preprocess", device, "-", batch, size, seconds, in_bytes,
                                        3 * size * size))
                logger.info("image_preprocess %s batch %d size %d: %.0f images/s (nvJPEG)", device, batch, size,
                            batch / seconds)
    return rows


def detection_timings(options: ProfileOptions, devices: list[str]) -> list[StageTiming]:
    """image_preprocess and nms (CPU), the detector on every device and precision."""
    from tandem_serve.vision.detector import DetectStage, own_precision_and_device
    from tandem_serve.vision.letterbox import preprocess
    from tandem_serve.vision.nms import postprocess

    weights = options.detector_weights or (str(random_detector(options.detector_size)) if options.detector_size else "")
    config = DetectorConfig(weights=weights, head_format=options.head_format)
    config.validate()
    # ONNX and AOTInductor models run in the precision they were exported at (autocast does not reach them); an
    # AOTInductor package only on the device type it was compiled for
    own_precision, only_on = own_precision_and_device(weights)
    detectors = [(device, precision) for device in devices for precision in precisions_for(device, "detector")
                 if (not own_precision or precision == "fp32") and (only_on is None or device.split(":")[0] == only_on)]
    cases = [(size, batch) for size in options.image_sizes for batch in options.batch_sizes]
    progress = Progress(len(cases) * (2 + len(detectors)))
    # the JPEG mix the suite and `tandem tune` send (PNGs cost several times more to decode and are rare in traffic)
    encoded = mixed_size_jpegs(max(options.batch_sizes), seed=5)
    check_images = scenes(8, seed=77)
    rows: list[StageTiming] = []
    prepared = {}
    per_image = {}
    for size in options.image_sizes:
        # decode + letterbox loops over requests (no batching gain): time the whole image mix once,
        # so every batch size sees the same mix; a call on b images costs b x the mean
        with cpu_threads(1):
            seconds = median_seconds(lambda: [preprocess(item, size) for item in encoded], "cpu", options.repeats)
        per_image[size] = seconds / len(encoded)
        done = [preprocess(item, size) for item in encoded]
        for batch in options.batch_sizes:
            rows.append(StageTiming("detection", "image_preprocess", "cpu", "-", batch, size, per_image[size] * batch,
                                    int(np.mean([len(i) for i in encoded])), 3 * size * size))
            prepared[(size, batch)] = (torch.from_numpy(np.stack([p for p, _ in done[:batch]])), [b for _, b in done[:batch]])
            progress.step(f"image_preprocess batch {batch} size {size}: {1 / per_image[size]:.0f} images/s per core")
    rows += gpu_decode_timings(options, [d for d in devices if d.startswith("cuda")], encoded)
    reference = None
    candidates_of = {}
    for device, precision in detectors:
        stage = DetectStage(DetectorConfig(**{**config.__dict__, "precision": precision}), device)
        if precision == "int8":
            stage.model = quantized_int8(stage.model)
        check = [preprocess(item, options.image_sizes[-1]) for item in check_images]
        check_pixels = torch.from_numpy(np.stack([p for p, _ in check])).to(device)
        padded, counts = stage.filtered(check_pixels)
        found = [postprocess(padded[i, : counts[i]].cpu().numpy(), box, 0.25, 0.45, 300) for i, (_, box) in enumerate(check)]
        if reference is None:
            reference = found
        accuracy = None if options.detector_size else _box_recall(found, reference)  # random weights: speed only
        for size, batch in cases:
            if device == "cpu" and batch > options.cpu_max_batch:
                progress.step(f"detector {device} {precision} batch {batch}: skipped on the CPU")
                continue
            pixels = prepared[(size, batch)][0].to(device)
            with cpu_threads(1):
                seconds = median_seconds(lambda: stage.filtered(pixels), device, options.repeats)
                padded, counts = stage.filtered(pixels)
            candidates_of.setdefault((size, batch), (padded.cpu().numpy(), counts))  # the first device's
            rows.append(StageTiming("detection", "detector", device, precision, batch, size, seconds, 3 * size * size,
                                    int(np.mean(counts) * 24), accuracy))
            progress.step(f"detector {device} {precision} batch {batch} size {size}: {batch / seconds:.0f}/s")
        del stage
    for size in options.image_sizes:
        # NMS also loops over requests: the mean over the largest batch's images, times b
        largest = max((b for (s_, b) in candidates_of if s_ == size), default=0)
        if not largest:
            continue
        padded, counts = candidates_of[(size, largest)]
        boxes = prepared[(size, largest)][1]
        seconds = median_seconds(lambda: [postprocess(padded[i, : counts[i]], boxes[i], 0.25, 0.45, 300)
                                          for i in range(largest)], "cpu", options.repeats) / largest
        for batch in options.batch_sizes:
            rows.append(StageTiming("detection", "nms", "cpu", "-", batch, size, seconds * batch, int(np.mean(counts) * 24), 0))
            progress.step(f"nms batch {batch} size {size}: {1 / seconds:.0f} images/s per core")
    return rows
