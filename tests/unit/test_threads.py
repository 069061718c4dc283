"""Thread counts of stage instances: one torch thread on a GPU instance, serial tokenization on request."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from tandem_serve.runtime.threads import GPU_INSTANCE_THREADS, stage_threads
from tandem_serve.stage_config import EncoderConfig
from tandem_serve.text.stages import EncoderStage


def test_gpu_instances_default_to_one_thread_and_cpu_instances_to_torchs_default():
    assert stage_threads(torch.device("cuda:0"), 0) == GPU_INSTANCE_THREADS == 1
    assert stage_threads(torch.device("cpu"), 0) is None
    assert stage_threads(torch.device("cuda:0"), 3) == 3 and stage_threads(torch.device("cpu"), 2) == 2


def test_a_cpu_encoder_takes_its_configured_threads(restore_torch_threads):
    EncoderStage(EncoderConfig(cpu_threads=2), "cpu")
    assert torch.get_num_threads() == 2


COUNT_THREADS = """
import os, sys
from tandem_serve.model_files import SentenceModelFiles
from tandem_serve.text.tokenize import TextTokenizer
files = SentenceModelFiles.load(None)
tokenizer = TextTokenizer(files.tokenizer_json, files.max_seq_length, parallel=sys.argv[1] == "parallel")
before = len(os.listdir("/proc/self/task"))
tokenizer(["a sentence of several words to tokenize"] * 4000)
print(len(os.listdir("/proc/self/task")) - before)
"""


def started_threads(mode: str, parallelism: str = "true") -> int:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": parallelism, "RAYON_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", COUNT_THREADS, mode], capture_output=True, text=True, env=env, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def test_serial_tokenization_starts_no_thread_pool():
    assert started_threads("parallel") >= 1  # encode_batch spreads the batch over rayon's pool
    assert started_threads("serial") == 0
    # where the library is serial (a stub with `parallel: false` sets it), the serial tokenizer's one batch call
    # (encode_batch_fast: 0.8x the CPU of encode) starts no pool either
    assert started_threads("serial", parallelism="false") == 0
