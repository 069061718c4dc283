"""Queue policies, which stop Triton's batcher from prefetching: none in the shipped configs, a warning for others."""

from __future__ import annotations

import logging
import shutil

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from tandem_serve.paths import default_repositories
from tandem_serve.triton.queue_policy import disables_prefetching, stalling_models, warn_about_queue_policies


def test_every_shipped_queue_bounded_model_runs_two_instances():
    configs = [text_format.Parse(p.read_text(), mc.ModelConfig()) for r in default_repositories()
               for p in r.glob("*/config.pbtxt")]
    bounded = [c.name for c in configs if disables_prefetching(c)]
    assert {"tokenizer", "encoder_fused", "detector"} <= set(bounded)  # the bound that sheds overload is kept
    assert stalling_models(default_repositories()) == []


@pytest.mark.parametrize("policy, prefetch_off", [
    ("", False),
    ("default_queue_policy { max_queue_size: 1024 }", True),
    ("default_queue_policy { default_timeout_microseconds: 10000000 timeout_action: REJECT }", True),
    ("default_queue_policy { allow_timeout_override: true }", True),
    ("priority_levels: 2 default_priority_level: 1", True),
])
def test_prefetching_is_off_exactly_where_triton_turns_it_off(policy, prefetch_off):
    """Triton's scheduler_utils.cc: prefetching needs no priority levels, no queue size, no timeout, no override."""
    config = text_format.Parse(f"name: 'm' max_batch_size: 8 dynamic_batching {{ {policy} }}", mc.ModelConfig())
    assert disables_prefetching(config) is prefetch_off


def test_a_queue_bound_on_one_instance_is_warned_about_by_name(tmp_path, caplog):
    source = default_repositories()[0]
    for name in ("encoder_fused", "tokenizer"):
        shutil.copytree(source / name, tmp_path / name, symlinks=True)
    path = tmp_path / "encoder_fused" / "config.pbtxt"
    config = text_format.Parse(path.read_text(), mc.ModelConfig())
    config.instance_group[0].count = 1
    path.write_text(text_format.MessageToString(config))
    with caplog.at_level(logging.WARNING, logger="tandem_serve.triton.queue_policy"):
        assert warn_about_queue_policies([tmp_path]) == ["encoder_fused"]
    assert "encoder_fused: a queue policy" in caplog.text and "run 2 instances" in caplog.text
    config.instance_group[0].gpus[:] = [0, 1]  # one per GPU on two GPUs: two instances
    path.write_text(text_format.MessageToString(config))
    assert stalling_models([tmp_path]) == []
