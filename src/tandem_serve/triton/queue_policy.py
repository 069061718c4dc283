"""Queue policies and Triton's batcher: why every queue-bounded model runs two instances, and the warning where not.

Triton's dynamic batcher (core 2.51 and current `src/dynamic_batch_scheduler.cc`) prefetches the next batch only
for a model without a queue policy (`max_queue_size` 0, no default timeout, no timeout override, no priority
levels). Without prefetching, a batcher holding queued requests waits for an instance to ask for work
(`WaitForPayloadSlotAvailable`) on a condition variable that a finishing instance notifies *before* it counts as
waiting: that wake-up is lost, and the batcher sleeps out its 500 ms default wait unless a new request arrives or
another instance finishes. With one instance under a closed load (every client waiting, nothing new arriving) the
queue moves in steps of 500 ms: the `text_embedding_fused` ensemble on the 2-core CPU machine served 380-421 texts/s
at p99 640-690 ms, against 502-557/s at p99 185-205 ms without the policy, and 544/s at p99 222 ms with the policy
and two single-thread encoder instances (`bench/queue_policy.py`); a one-instance tokenizer given 64 requests at
once rejected some at its 10 s queue timeout though each took milliseconds.

The bound is kept, since it is what sheds overload: a gRPC deadline cancels a request queued at a model, but an
ensemble's steps are computed after their caller gave up (measured on 2.51). So the shipped configs run two
instances of every model (CPU instances share the cores, `threads.shared_cpu_threads`), `tandem plan` renders at
least two, and the launcher warns about a repository that has a policy on a single instance.
"""

from __future__ import annotations

import logging
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

logger = logging.getLogger(__name__)
MIN_INSTANCES = 2  # with a queue policy: another instance's completion ends a lost wake-up's wait


def disables_prefetching(config: mc.ModelConfig) -> bool:
    """Whether Triton's batcher runs this model without prefetching (Triton's scheduler_utils.cc)."""
    if not config.HasField("dynamic_batching"):
        return False
    batching = config.dynamic_batching
    policy = batching.default_queue_policy
    return bool(batching.priority_levels or policy.max_queue_size or policy.default_timeout_microseconds
                or policy.allow_timeout_override)


def instance_count(config: mc.ModelConfig) -> int:
    """Instances of the model per device it runs on (a group listing GPUs has `count` on each)."""
    return sum(g.count * max(1, len(g.gpus)) for g in config.instance_group) or 1


def stalls(config: mc.ModelConfig) -> bool:
    """A queue policy on a single instance: the queue can wait 500 ms with the instance free."""
    return disables_prefetching(config) and instance_count(config) < MIN_INSTANCES


def stalling_models(repositories: list[Path]) -> list[str]:
    """The models of these repositories that set a queue policy and run one instance."""
    found = []
    for repository in repositories:
        for path in sorted(Path(repository).glob("*/config.pbtxt")):
            try:
                config = text_format.Parse(path.read_text(), mc.ModelConfig())
            except text_format.ParseError:
                continue  # Triton reports a config it cannot parse itself
            if stalls(config):
                found.append(config.name or path.parent.name)
    return found


def warn_about_queue_policies(repositories: list[Path]) -> list[str]:
    """Log one warning naming the models that set a queue policy on one instance; return their names."""
    models = stalling_models(repositories)
    if models:
        logger.warning("%s: a queue policy (max_queue_size, a queue timeout or priority levels) on one instance. "
                       "Triton's batcher then stops prefetching and can leave requests queued for 500 ms while the "
                       "instance is free; run %d instances (see tandem_serve/triton/queue_policy.py)",
                       ", ".join(models), MIN_INSTANCES)
    return models
