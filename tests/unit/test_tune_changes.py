"""`tandem tune`'s changes to a bottleneck stage, on the shipped configs parsed by tritonclient's ModelConfig."""

from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from tandem_serve.tuning.tune import candidate_changes

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


def shipped(model: str) -> mc.ModelConfig:
    return text_format.Parse((REPOSITORY / model / "config.pbtxt").read_text(), mc.ModelConfig())


def counts(config: mc.ModelConfig) -> dict[str, int]:
    return {mc.ModelInstanceGroup.Kind.Name(g.kind): g.count for g in config.instance_group}


def test_a_stage_of_one_kind_gets_one_more_instance_then_a_longer_batching_window():
    current = shipped("image_preprocess")
    (more, more_config), (batch, batch_config) = candidate_changes("image_preprocess", current)
    assert counts(more_config) == {"KIND_CPU": 3} and "3 instance" in more
    assert counts(batch_config) == {"KIND_CPU": 2}
    assert batch_config.dynamic_batching.max_queue_delay_microseconds == 500
    assert list(batch_config.dynamic_batching.preferred_batch_size)[-1] == 2
    assert counts(current) == {"KIND_CPU": 2}  # the config read is left as it was


def test_a_split_stage_is_tuned_one_kind_at_a_time_and_its_split_can_move():
    current = shipped("image_preprocess")
    current.instance_group.add(kind=mc.ModelInstanceGroup.Kind.KIND_GPU, count=2)  # 2 CPU + 2 nvJPEG instances
    changes = candidate_changes("image_preprocess", current)
    assert [counts(config) for _, config in changes[:-1]] == [
        {"KIND_CPU": 2, "KIND_GPU": 3},  # one more GPU instance
        {"KIND_CPU": 3, "KIND_GPU": 2},  # one more CPU instance
        {"KIND_CPU": 3, "KIND_GPU": 1},  # one moved from the GPU to the CPU
        {"KIND_CPU": 1, "KIND_GPU": 3},  # one moved from the CPU to the GPU
    ]
    assert [label.split(": ")[1] for label, _ in changes[:-1]] == [
        "one more GPU instance (3)", "one more CPU instance (3)",
        "one instance moved from GPU to CPU (1 + 3)", "one instance moved from CPU to GPU (1 + 3)"]
    assert counts(changes[-1][1]) == {"KIND_CPU": 2, "KIND_GPU": 2} and "queue delay" in changes[-1][0]


def test_a_kind_down_to_one_instance_is_not_moved_away():
    current = shipped("image_preprocess")
    del current.instance_group[:]
    current.instance_group.add(kind=mc.ModelInstanceGroup.Kind.KIND_GPU, count=1)
    current.instance_group.add(kind=mc.ModelInstanceGroup.Kind.KIND_CPU, count=4)
    moved = [counts(config) for label, config in candidate_changes("image_preprocess", current) if "moved" in label]
    assert moved == [{"KIND_GPU": 2, "KIND_CPU": 3}]


def test_a_stage_that_never_batches_gets_instances_only():
    current = shipped("tokenizer")
    assert current.max_batch_size == 0
    [(label, config)] = candidate_changes("tokenizer", current)
    assert sum(g.count for g in config.instance_group) == sum(g.count for g in current.instance_group) + 1
