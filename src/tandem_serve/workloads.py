"""The request mixes the benchmarks and `tandem tune` send: texts of a stated length mix, JPEGs of mixed sizes."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import torch

LENGTH_MIX = {4: 0.3, 16: 0.4, 48: 0.2, 160: 0.1}  # words per text: share of requests
IMAGE_SIZES = ((640, 480), (1280, 720), (1920, 1080), (800, 600))  # original sizes, cycled
WORDS = ("the model serves tokens on a fast accelerator while the host prepares the next batch of requests "
         "from shared memory queues").split()
OUTPUTS = {"text": ["embedding"], "detection": ["boxes", "scores", "classes"]}


def mixed_length_texts(count: int, seed: int = 0) -> list[str]:
    """`count` texts whose word counts follow LENGTH_MIX (about one token per word)."""
    rng = np.random.default_rng(seed)
    lengths = rng.choice(list(LENGTH_MIX), size=count, p=list(LENGTH_MIX.values()))
    return [" ".join(rng.choice(WORDS, size=int(n))) for n in lengths]


def mixed_size_jpegs(count: int, seed: int = 0, quality: int = 90) -> list[bytes]:
    """`count` synthetic scenes as JPEGs, resized to IMAGE_SIZES in turn."""
    from PIL import Image

    from tandem_serve.vision.shapes import generate_scene

    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        scene = generate_scene(rng).image.resize(IMAGE_SIZES[i % len(IMAGE_SIZES)], Image.BILINEAR)
        buffer = io.BytesIO()
        scene.save(buffer, format="JPEG", quality=quality)
        images.append(buffer.getvalue())
    return images


def pipeline_of(ensemble: str) -> str:
    """'text' or 'detection' for an ensemble name."""
    return "text" if ensemble.startswith("text") else "detection"


def ensemble_requests(ensemble: str, count: int, seed: int = 0) -> list[list[tuple[str, np.ndarray]]]:
    """`count` requests of the kind `ensemble` takes: a text (its UTF-8 bytes for text_embedding_utf8) or an image."""
    return triton_requests(pipeline_of(ensemble), count, seed, utf8=ensemble == "text_embedding_utf8")


def triton_requests(pipeline: str, count: int, seed: int = 0, items: int = 1,
                    utf8: bool = False) -> list[list[tuple[str, np.ndarray]]]:
    """Inputs of `count` requests of `items` texts (text) or one image each to a pipeline's ensemble, as (name, array)
    pairs; `utf8`: one text per request as its UTF-8 bytes, for `text_embedding_utf8`."""
    if pipeline == "text":
        texts = [t.encode("utf-8") for t in mixed_length_texts(count * items, seed)]
        if utf8:
            if items != 1:
                raise ValueError("text_embedding_utf8 takes one text per request")
            return [[("text", np.frombuffer(t, np.uint8)[None])] for t in texts]
        return [[("text", np.array(texts[i:i + items], dtype=object).reshape(items, 1))]
                for i in range(0, len(texts), items)]
    if items != 1:
        raise ValueError("detection requests carry one image each")
    return [[("image", np.frombuffer(data, np.uint8)[None])] for data in mixed_size_jpegs(count, seed)]


def random_yolov5(size: str, directory: Path, num_classes: int = 80) -> Path:
    """A YOLOv5 of `size` (n/s/m/l/x) with random weights and YOLOv5's bias prior, as safetensors (speed only).

    Without the prior a random head scores all 25,200 anchors near 0.25, and a benchmark would
    time NMS over thousands of candidates per image instead of the network."""
    from safetensors.torch import save_file

    from tandem_serve.vision.yolo import YoloSpec, YoloV5

    torch.manual_seed(0)
    model = YoloV5(YoloSpec.of_size(size, num_classes))
    model.head.initialise_biases()
    path = Path(directory) / f"yolov5{size}-random.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"size": size, "num_classes": str(num_classes)})
    return path


def calibrated_yolov8(images: np.ndarray, num_classes: int = 4, seed: int = 19, size: str = "n") -> torch.nn.Module:
    """A YOLOv8-style network (eval mode) with seeded random weights whose BatchNorms took `images`' statistics
    (uint8 [B, 3, S, S]) and whose class biases are -1: a few dozen boxes per image score above 0.5, their scores apart.
    Left random, every cell scores alike, and near-ties make NMS (and any comparison of detections) chaotic."""
    from tandem_serve.vision.yolov8 import YoloV8, YoloV8Spec

    torch.manual_seed(seed)
    network = YoloV8(YoloV8Spec.of_size(size, num_classes))
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a plain average of the batch statistics
    with torch.no_grad():
        network.train()(torch.from_numpy(np.ascontiguousarray(images)))
        for branch in network.head.cv3:
            branch[-1].bias.fill_(-1.0)
    return network.eval()


BERT_SIZES = {"tiny": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 512},
              "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
              "large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096}}


def random_bert(size: str, directory: Path, source: Path | None = None) -> Path:
    """A sentence-transformers directory with a BERT of `size` ("tiny", "base", "large", or "source": the source's
    own architecture) and random weights (speed only), the tokenizer and settings copied from `source` (default: the
    shipped all-MiniLM-L6-v2; its weights need not be there)."""
    from safetensors.torch import save_file

    from tandem_serve.model_files import BertConfig, SentenceModelFiles
    from tandem_serve.text.bert import SentenceEncoder, TokenEmbedding, hf_state_dict

    files = SentenceModelFiles.load(source)
    target = Path(directory) / f"bert-{size}-random"
    shutil.copytree(files.root, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    raw = json.loads((files.root / "config.json").read_text())
    raw.update({} if size == "source" else BERT_SIZES[size])
    (target / "config.json").write_text(json.dumps(raw, indent=1))
    torch.manual_seed(0)
    config = BertConfig.from_dict(raw, target / "config.json")
    model = SentenceEncoder(config, TokenEmbedding(config))
    save_file(hf_state_dict(model), str(target / "model.safetensors"))
    return target
