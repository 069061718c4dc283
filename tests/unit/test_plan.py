"""The planner on synthetic profiles whose best answer is known, and the configs it renders."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import yaml
from tritonclient.grpc import model_config_pb2 as mc

from tandem_serve.paths import project_root
from tandem_serve.stage_config import MODEL_SETTINGS, ImagePreprocessConfig, parse_stage_config
from tandem_serve.triton.model_config import ensemble_problems, read_config
from tandem_serve.triton.queue_policy import stalling_models
from tandem_serve.tuning.explain import format_report
from tandem_serve.tuning.plan import Objective, make_plan
from tandem_serve.tuning.profile import Profile, StageTiming, TransferTiming
from tandem_serve.tuning.render import apply_stage, render
from tandem_serve.tuning.serving_cost import ServingCost
from tandem_serve.tuning.torchserve_workers import TorchServeCost

MB = 1 << 20


def timing(stage: str, device: str, batch: int, per_item_ms: float, precision: str = "fp32", in_bytes: int = 0,
           out_bytes: int = 0, size: int = 640, fixed_ms: float = 0.0, accuracy: float | None = None,
           pipeline: str = "detection") -> StageTiming:
    seconds = (fixed_ms + per_item_ms * batch) / 1e3
    return StageTiming(pipeline, stage, device, precision, batch, size, seconds, in_bytes, out_bytes, accuracy)


def transfers(gb_per_s: float) -> list[TransferTiming]:
    return [TransferTiming(size, size / gb_per_s / 1e9, size / gb_per_s / 1e9) for size in (4 << 10, MB, 64 * MB)]


def detection_profile(gpu_ms: float, cpu_ms: float, image_bytes: int, gb_per_s: float, cpus: int = 16) -> Profile:
    rows = []
    for batch in (1, 4, 16):
        rows += [timing("image_preprocess", "cpu", batch, 1.0, "-", 50_000, image_bytes),
                 timing("detector", "cpu", batch, cpu_ms, in_bytes=image_bytes, out_bytes=2400),
                 timing("detector", "cuda:0", batch, gpu_ms, in_bytes=image_bytes, out_bytes=2400, fixed_ms=2.0),
                 timing("nms", "cpu", batch, 0.1, "-", 2400, 0)]
    return Profile({"cpus": cpus, "gpus": ["Test GPU"]}, rows, transfers(gb_per_s))


def test_gpu_50x_faster_but_transfer_costlier_than_the_cpu_stage_stays_on_the_cpu():
    # detector: 10 ms/item on a core, 0.2 ms on the GPU (50x), but 1.2 MB per image at 0.05 GB/s = 24 ms
    profile = detection_profile(gpu_ms=0.2, cpu_ms=10.0, image_bytes=1_200_000, gb_per_s=0.05)
    plan = make_plan(profile, Objective()).chosen["detection"]
    assert [s.device for s in plan.stages] == ["cpu", "cpu", "cpu"]
    assert plan.throughput > 0


def test_the_same_stage_goes_to_the_gpu_when_the_transfer_is_cheap():
    profile = detection_profile(gpu_ms=0.2, cpu_ms=10.0, image_bytes=1_200_000, gb_per_s=25.0)
    plan = make_plan(profile, Objective()).chosen["detection"]
    detector = next(s for s in plan.stages if s.stage == "detector")
    assert detector.device == "cuda:0" and detector.batch == 16  # the fixed 2 ms per call favours the big batch
    assert detector.transfer_per_item_ms == pytest.approx(1_200_000 / 25e9 * 1e3 + 2400 / 25e9 * 1e3, rel=1e-3)


def test_a_latency_bound_picks_a_smaller_batch():
    profile = detection_profile(gpu_ms=0.2, cpu_ms=10.0, image_bytes=1_200_000, gb_per_s=25.0)
    fast = make_plan(profile, Objective()).chosen["detection"]
    bounded = make_plan(profile, Objective(p99_ms=12.0)).chosen["detection"]
    assert bounded.latency_ms * 2 <= 12.0 < fast.latency_ms * 2
    assert sum(s.batch for s in bounded.stages) < sum(s.batch for s in fast.stages)


def text_profile(hidden_gb_per_s: float) -> Profile:
    rows = []
    hidden = 128 * 384 * 2
    for batch in (1, 8, 32):
        rows += [timing("tokenize", "cpu", batch, 0.05, "-", 0, 128 * 16, size=128, pipeline="text"),
                 timing("token_embedding", "cpu", batch, 0.05, in_bytes=128 * 8, out_bytes=hidden, size=128, pipeline="text"),
                 timing("encoder", "cuda:0", batch, 0.10, "fp16", hidden + 128 * 8, 384 * 4, 128, 1.0, 0.9999, "text"),
                 timing("encoder_fused", "cuda:0", batch, 0.11, "fp16", 128 * 16, 384 * 4, 128, 1.0, 0.9999, "text"),
                 timing("encoder", "cpu", batch, 20.0, "fp32", hidden + 128 * 8, 384 * 4, 128, 0, 1.0, "text"),
                 timing("encoder_fused", "cpu", batch, 20.0, "fp32", 128 * 16, 384 * 4, 128, 0, 1.0, "text"),
                 timing("encoder_fused", "cuda:0", batch, 0.05, "bf16", 128 * 16, 384 * 4, 128, 1.0, 0.95, "text")]
    return Profile({"cpus": 8, "gpus": ["Test GPU"]}, rows, transfers(hidden_gb_per_s))


def test_token_embedding_moves_onto_the_gpu_when_shipping_hidden_states_costs_more_than_ids():
    report = make_plan(text_profile(hidden_gb_per_s=1.0), Objective())
    plan = report.chosen["text"]
    assert plan.ensemble == "text_embedding_fused"
    assert [s.stage for s in plan.stages] == ["tokenize", "encoder_fused"]
    assert all(s.precision != "bf16" for s in plan.stages)  # 0.95 accuracy is under the 0.99 floor
    assert any("encoder_fused cuda:0 bf16" in line for line in report.rejected)


def test_the_tokenizer_takes_one_request_per_execution(tmp_path):
    """It reads the clients' BYTES: the plan never batches requests there, and renders it so (max_batch_size 0, which
    no batcher setting can override), beside ensembles of max_batch_size 64."""
    report = make_plan(text_profile(hidden_gb_per_s=1.0), Objective())
    tokenize = report.chosen["text"].stages[0]
    assert tokenize.stage == "tokenize" and tokenize.batch == 1 and tokenize.queue_delay_us == 0
    render(report, tmp_path)
    config = read_config(tmp_path / "triton" / "tokenizer" / "config.pbtxt")
    assert config.max_batch_size == 0 and list(config.dynamic_batching.preferred_batch_size) == []
    assert read_config(tmp_path / "triton" / report.chosen["text"].ensemble / "config.pbtxt").max_batch_size == 64
    assert ensemble_problems(tmp_path / "triton", report.chosen["text"].ensemble) == []
    assert config.dynamic_batching.max_queue_delay_microseconds == 0
    assert config.dynamic_batching.default_queue_policy.max_queue_size > 0  # the shipped queue bound is kept
    assert stalling_models([tmp_path / "triton"]) == []  # and on two instances or more wherever it is set


def test_a_queue_bounded_stage_planned_on_one_instance_is_rendered_on_two():
    """One GPU encoder instance may be all the plan needs, but with the shipped queue bound Triton's batcher would
    lose the wake-up of a finishing instance (triton/queue_policy.py): the rendered config runs two."""
    report = make_plan(text_profile(hidden_gb_per_s=1.0), Objective())
    encoder = dataclasses.replace(report.chosen["text"].stages[-1], instances=1)
    shipped = read_config(project_root() / "model_repository" / encoder.stage / "config.pbtxt")
    config = apply_stage(shipped, encoder, min_batch=1)
    assert config.dynamic_batching.default_queue_policy.max_queue_size > 0
    assert [(g.kind, g.count, list(g.gpus)) for g in config.instance_group] == [(mc.ModelInstanceGroup.KIND_GPU, 2, [0])]
    assert apply_stage(shipped, dataclasses.replace(encoder, instances=3), min_batch=1).instance_group[0].count == 3


def test_the_plan_s_settings_reach_a_config_that_did_not_list_them_and_every_rendered_setting_parses():
    """A user's encoder config without `precision` or `cpu_threads` still gets the plan's (it would otherwise serve
    fp32 where the plan chose fp16), and a model whose settings take no such key is not given it: each rendered
    config's parameters parse with the settings class its Triton model reads them with."""
    report = make_plan(text_profile(hidden_gb_per_s=1.0), Objective())
    encoder = dataclasses.replace(report.chosen["text"].stages[-1], precision="fp16", device="cpu")
    shipped = read_config(project_root() / "model_repository" / encoder.stage / "config.pbtxt")
    for key in ("precision", "cpu_threads", "max_batch_tokens"):
        del shipped.parameters[key]
    config = apply_stage(shipped, encoder, min_batch=1)
    assert config.parameters["precision"].string_value == "fp16"
    assert config.parameters["cpu_threads"].string_value == "1"
    assert "parallel" not in config.parameters  # a tokenizer setting: EncoderConfig would refuse it
    parsed = parse_stage_config(MODEL_SETTINGS[encoder.stage], {k: v.string_value for k, v in config.parameters.items()})
    assert parsed.precision == "fp16" and parsed.cpu_threads == 1
    preprocess = read_config(project_root() / "model_repository" / "image_preprocess" / "config.pbtxt")
    cpu_stage = dataclasses.replace(encoder, stage="image_preprocess", precision="-")
    rendered = apply_stage(preprocess, cpu_stage, min_batch=1)
    assert "cpu_threads" not in rendered.parameters and "parallel" not in rendered.parameters
    parse_stage_config(ImagePreprocessConfig, {k: v.string_value for k, v in rendered.parameters.items()})


def test_token_embedding_stays_on_the_cpu_when_the_copy_is_free_and_the_gpu_is_the_bottleneck():
    plan = make_plan(text_profile(hidden_gb_per_s=1e6), Objective()).chosen["text"]
    assert plan.ensemble == "text_embedding" and plan.bottleneck == "GPU"


def test_measured_ensemble_step_costs_favour_the_pipeline_with_fewer_steps_and_bytes(tmp_path):
    # compute alone: the unfused ensemble wins (GPU-bound, its encoder is cheaper); each Triton step costing
    # 0.5 ms of CPU plus 1 ms per MiB received makes the CPU the bottleneck, where 3 steps lose to 2
    profile = text_profile(hidden_gb_per_s=1e6)
    profile.serving = ServingCost(step_s=0.5e-3, byte_s=1e-3 / MB, payload_bytes=MB, latencies_s={})
    plan = make_plan(profile, Objective()).chosen["text"]
    assert plan.ensemble == "text_embedding_fused" and plan.bottleneck == "CPU"
    received = {"tokenize": 0, "encoder_fused": 128 * 16}  # bytes per item each step receives
    step_ms = {stage: 0.5 + 1e-3 * b / MB * 1e3 for stage, b in received.items()}
    assert [s.serving_per_item_ms for s in plan.stages] == pytest.approx([step_ms["tokenize"], step_ms["encoder_fused"]])
    # one encoder instance is busy ~0.64 ms per item (0.14 compute + 0.5 step): four (the cap) to keep up, a core each
    assert plan.stages[1].instances == 4
    cores = 8 - 4
    assert plan.throughput == pytest.approx(cores / ((0.05 + sum(step_ms.values())) / 1e3), rel=1e-6)
    saved = tmp_path / "profile.json"
    profile.save(saved)
    assert Profile.load(saved).serving == profile.serving


def test_measured_cpu_times_are_what_the_cores_are_charged_a_one_request_step_paying_its_execution_alone():
    """With CPU times in the serving cost, the cores pay each step's CPU time (its per-execution part shared by the
    step's batch: whole for the one-request tokenizer, a 32nd for an encoder at batch 32) and each request's own; the
    latency figures stay the instances' busy time. Fewer cores (`cpus`) lower the CPU bound in proportion."""
    profile = text_profile(hidden_gb_per_s=1e6)
    profile.serving = ServingCost(step_s=0.1e-3, byte_s=0.0, payload_bytes=MB, latencies_s={}, step_cpu_s=0.4e-3,
                                  step_cpu_shared_s=0.3e-3, byte_cpu_s=0.0, request_cpu_s=0.25e-3, batched_mean=6.0)
    plan = make_plan(profile, Objective()).chosen["text"]
    assert plan.ensemble == "text_embedding_fused"
    tokenize, encoder = plan.stages
    assert tokenize.batch == 1 and tokenize.serving_cpu_per_item_ms == pytest.approx(0.4)
    assert encoder.serving_cpu_per_item_ms == pytest.approx(0.1 + 0.3 / encoder.batch)
    assert tokenize.serving_per_item_ms == pytest.approx(0.1)  # latency, not CPU
    sum_c_ms = tokenize.cost_per_item_ms + tokenize.serving_cpu_per_item_ms + encoder.serving_cpu_per_item_ms + 0.25
    cores = 8 - encoder.instances
    assert plan.cpu_bound == pytest.approx(cores / (sum_c_ms / 1e3), rel=1e-6)
    fewer = make_plan(profile, Objective(), cpus=6).chosen["text"]
    assert fewer.cpu_bound == pytest.approx((6 - fewer.stages[1].instances) / (sum_c_ms / 1e3), rel=1e-6)
    legacy = ServingCost.from_json({"step_s": 1e-3, "byte_s": 0.0, "payload_bytes": MB, "latencies_s": {}})
    assert not legacy.cpu_measured and legacy.step_cpu_seconds(0, 32) == pytest.approx(1e-3)  # older profiles


def test_the_cpu_fit_separates_per_execution_per_request_and_per_byte_costs():
    """Chains of 1 and 3 steps whose CPU per request follows request + steps x (own + shared / batch + bytes), the
    one-request chains at batch 1, the batching ones at 5."""
    from tandem_serve.tuning.serving_cost import CpuRun, _fit_cpu

    request, own, shared, stub, per_byte, small, large = 0.2e-3, 0.05e-3, 0.15e-3, 0.08e-3, 1e-9, 16, MB

    def cpu(steps: int, size: int, batch: float) -> CpuRun:
        return CpuRun(request + steps * (own + shared / batch + per_byte * size), steps * stub, batch)

    runs = {(f"{'single' if batch == 1 else 'chain'}_{n}", b): cpu(n, b, batch)
            for n in (1, 3) for b in (small, large) for batch in (1.0, 5.0)}
    fit = _fit_cpu(runs, small, large)
    assert fit["step_cpu_s"] == pytest.approx(own + shared + per_byte * small)
    assert fit["step_cpu_shared_s"] == pytest.approx(shared)
    assert fit["step_stub_cpu_s"] == pytest.approx(stub)
    assert fit["byte_cpu_s"] == pytest.approx(per_byte, rel=1e-6)
    assert fit["request_cpu_s"] == pytest.approx(request)
    unbatched = _fit_cpu({k: cpu(int(k[0][-1]), k[1], 1.0) for k in runs}, small, large)
    assert unbatched["step_cpu_shared_s"] == 0.0  # nothing batched: no split, the whole step per request


def test_a_one_request_stage_measured_served_is_costed_and_given_instances_by_what_was_measured():
    """The tokenizer served alone kept an instance 0.6 ms per request and spent 0.35 ms of its stub's CPU: the cores
    pay that plus the server's side of its step, and it gets instances enough for 0.6 ms each at 1.25x the plan's
    rate."""
    from tandem_serve.tuning.serving_cost import AdapterCost

    profile = text_profile(hidden_gb_per_s=1e6)
    profile.machine["cpus"] = 32
    serving = ServingCost(step_s=0.1e-3, byte_s=0.0, payload_bytes=MB, latencies_s={}, step_cpu_s=0.4e-3,
                          step_cpu_shared_s=0.3e-3, step_stub_cpu_s=0.25e-3, request_cpu_s=0.25e-3,
                          adapters={"tokenize": AdapterCost("tokenizer", busy_s=0.6e-3, stub_cpu_s=0.35e-3)})
    profile.serving = serving
    plan = make_plan(profile, Objective()).chosen["text"]
    tokenize = plan.stages[0]
    assert tokenize.cost_per_item_ms == pytest.approx(0.35) and tokenize.busy_per_item_ms == pytest.approx(0.6)
    assert tokenize.serving_cpu_per_item_ms == pytest.approx(0.4 - 0.25)  # tritonserver's side only
    # enough instances of 0.6 ms for the rate, and a quarter more: served instances are busier than profiled ones
    assert tokenize.instances >= math.ceil(1.25 * plan.throughput * 0.6e-3)
    assert ServingCost.from_json(serving.to_json()) == serving  # the adapters survive the profile's JSON


def test_a_one_request_stage_is_given_instances_for_its_period_when_it_was_measured():
    """Served alone, the tokenizer's instance computed 0.4 ms per request but took requests 0.55 ms apart (Triton's
    hand-off between executions): its instances are sized, and its instance bound computed, with the 0.55 ms."""
    from tandem_serve.tuning.serving_cost import AdapterCost

    def plan_with(adapter: AdapterCost):
        profile = text_profile(hidden_gb_per_s=1e6)
        profile.machine["cpus"] = 32
        profile.serving = ServingCost(step_s=0.1e-3, byte_s=0.0, payload_bytes=MB, latencies_s={}, step_cpu_s=0.4e-3,
                                      step_cpu_shared_s=0.3e-3, step_stub_cpu_s=0.25e-3, request_cpu_s=0.25e-3,
                                      adapters={"tokenize": adapter})
        return make_plan(profile, Objective()).chosen["text"]

    compute_only = plan_with(AdapterCost("tokenizer", busy_s=0.4e-3, stub_cpu_s=0.35e-3))
    with_period = plan_with(AdapterCost("tokenizer", busy_s=0.4e-3, stub_cpu_s=0.35e-3, period_s=0.55e-3))
    assert compute_only.stages[0].busy_per_item_ms == pytest.approx(0.4)
    assert with_period.stages[0].busy_per_item_ms == pytest.approx(0.55)
    assert with_period.stages[0].instances >= math.ceil(1.25 * with_period.throughput * 0.55e-3)
    assert with_period.stages[0].cost_per_item_ms == pytest.approx(0.35)  # the CPU it costs is the stub's, as before
    assert AdapterCost(**{"model": "tokenizer", "busy_s": 0.4e-3, "stub_cpu_s": 0.3e-3}).instance_s == 0.4e-3  # old JSON


def test_gpu_instances_follow_their_step_cost_and_bound_the_pipeline():
    # a cheap GPU stage behind a per-item step cost of 2 ms: one instance serves 1/(2 ms + compute) items/s at most
    profile = detection_profile(gpu_ms=0.2, cpu_ms=10_000.0, image_bytes=10_000, gb_per_s=25.0, cpus=64)  # no CPU share
    profile.serving = ServingCost(step_s=2e-3, byte_s=0.0, payload_bytes=MB, latencies_s={})
    plan = make_plan(profile, Objective()).chosen["detection"]
    detector = next(s for s in plan.stages if s.stage == "detector")
    assert detector.device == "cuda:0" and detector.instances == 4 and not detector.cpu_share  # capped at 4
    per_instance = 1e3 / (detector.cost_per_item_ms + detector.serving_per_item_ms)
    assert plan.throughput == pytest.approx(4 * per_instance, rel=1e-6)  # the instances, not the GPU, bound it
    assert plan.throughput < plan.gpu_bound and plan.throughput < plan.cpu_bound and plan.bottleneck == "GPU-instance"
    legacy = make_plan(detection_profile(gpu_ms=0.2, cpu_ms=10.0, image_bytes=10_000, gb_per_s=25.0, cpus=64),
                       Objective()).chosen["detection"]
    assert next(s for s in legacy.stages if s.stage == "detector").instances == 2  # no step costs: compute only


def test_spare_cpu_takes_a_share_of_a_gpu_bound_stage_and_the_config_has_both_kinds(tmp_path):
    # GPU 2 ms/item; CPU 8 ms/item on each of 32 cores: the CPU can add a lot
    profile = detection_profile(gpu_ms=2.0, cpu_ms=8.0, image_bytes=10_000, gb_per_s=25.0, cpus=32)
    plan = make_plan(profile, Objective()).chosen["detection"]
    detector = next(s for s in plan.stages if s.stage == "detector")
    assert detector.device == "cuda:0" and 0 < detector.cpu_share < 1 and detector.cpu_instances >= 1
    gpu_only = 1 / ((detector.cost_per_item_ms) / 1e3)
    assert plan.throughput > gpu_only * 1.1
    render(make_plan(profile, Objective()), tmp_path)
    kinds = [g.kind for g in read_config(tmp_path / "triton" / "detector" / "config.pbtxt").instance_group]
    assert kinds == [mc.ModelInstanceGroup.KIND_GPU, mc.ModelInstanceGroup.KIND_CPU]
    assert read_config(tmp_path / "triton" / "detector" / "config.pbtxt").parameters["cpu_threads"].string_value == "1"
    served = yaml.safe_load((tmp_path / "torchserve" / "object_detection" / "model-config.yaml").read_text())
    workers = served["minWorkers"]  # the handler's balancer: the plan's CPU instances shared out among its workers
    assert served["handler"]["pipeline"]["cpu_lane_threads"] == math.ceil(detector.cpu_instances / workers)
    assert served["handler"]["decode"] == "cpu"  # no nvJPEG timings in this profile: decoding planned on the CPU


def test_rendered_configs_keep_the_ensembles_consistent(tmp_path):
    profile = Profile({"cpus": 8, "gpus": ["Test GPU"]},
                      text_profile(1.0).stages + detection_profile(0.2, 10.0, 1_200_000, 25.0).stages, transfers(1.0))
    report = make_plan(profile, Objective())
    written = render(report, tmp_path)
    assert ensemble_problems(tmp_path / "triton", "text_embedding_fused") == []
    assert ensemble_problems(tmp_path / "triton", "object_detection") == []
    encoder = read_config(tmp_path / "triton" / "encoder_fused" / "config.pbtxt")
    original = read_config(project_root() / "model_repository" / "encoder_fused" / "config.pbtxt")
    assert encoder.parameters["precision"].string_value == "fp16"
    assert [t.name for t in encoder.input] == [t.name for t in original.input]
    assert encoder.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert encoder.dynamic_batching.preferred_batch_size == [16, 32]
    assert encoder.parameters["cpu_threads"].string_value == "0"  # a GPU instance: one thread (threads.py)
    tokenizer = read_config(tmp_path / "triton" / "tokenizer" / "config.pbtxt")
    assert tokenizer.parameters["parallel"].string_value == "false"  # the plan's instances are one core each
    values = yaml.safe_load((tmp_path / "torchserve" / "text_embedding" / "model-config.yaml").read_text())
    served = report.torchserve["text"]
    assert values["batchSize"] == served.batch_size and values["deviceType"] == "gpu"
    assert values["handler"]["pipeline"]["micro_batch_size"] == served.micro_batch_size
    assert values["handler"]["encoder"] == {"fuse_token_embedding": True, "precision": "fp16", "cuda_graph_max_batch": 64,
                                           "max_batch_tokens": 0}
    assert len(written) == 2 + 3 + 2


def test_ensemble_problems_name_a_broken_type(tmp_path):
    report = make_plan(detection_profile(0.2, 10.0, 1_200_000, 25.0), Objective())
    render(report, tmp_path)
    config = read_config(tmp_path / "triton" / "nms" / "config.pbtxt")
    config.input[0].data_type = mc.TYPE_FP16
    (tmp_path / "triton" / "nms" / "config.pbtxt").write_text(str(config))
    problems = ensemble_problems(tmp_path / "triton", "object_detection")
    assert problems and "nms" in problems[0] and "TYPE_FP16" in problems[0]


def test_a_profiled_model_of_another_size_is_what_the_configs_point_at(tmp_path):
    from tandem_serve.model_files import SentenceModelFiles
    from tandem_serve.workloads import random_bert, random_yolov5

    model_dir = random_bert("tiny", tmp_path / "models")
    weights = random_yolov5("n", tmp_path / "models")
    assert SentenceModelFiles.load(model_dir).bert.hidden_size == 128
    profile = Profile({"cpus": 8, "gpus": ["Test GPU"]},
                      text_profile(1.0).stages + detection_profile(0.2, 10.0, 1_200_000, 25.0).stages, transfers(1.0),
                      models={"model_dir": str(model_dir), "detector_weights": str(weights),
                              "detector_head_format": "yolov8"})
    profile.save(tmp_path / "profile.json")
    report = make_plan(Profile.load(tmp_path / "profile.json"), Objective())
    render(report, tmp_path / "out", Profile.load(tmp_path / "profile.json").models)
    repo = tmp_path / "out" / "triton"
    encoder = read_config(repo / "encoder_fused" / "config.pbtxt")
    assert encoder.parameters["model_dir"].string_value == str(model_dir)
    assert [list(t.dims) for t in encoder.output if t.name == "EMBEDDING"] == [[128]]
    assert read_config(repo / "tokenizer" / "config.pbtxt").parameters["model_dir"].string_value == str(model_dir)
    assert list(read_config(repo / "text_embedding_fused" / "config.pbtxt").output[0].dims) == [128]
    detector = read_config(repo / "detector" / "config.pbtxt")
    assert detector.parameters["weights"].string_value == str(weights)
    assert detector.parameters["head_format"].string_value == "yolov8"
    assert ensemble_problems(repo, "text_embedding_fused") == [] and ensemble_problems(repo, "object_detection") == []
    served = yaml.safe_load((tmp_path / "out" / "torchserve" / "text_embedding" / "model-config.yaml").read_text())
    assert served["handler"]["model_dir"] == str(model_dir)
    served = yaml.safe_load((tmp_path / "out" / "torchserve" / "object_detection" / "model-config.yaml").read_text())
    assert served["handler"]["detector"]["weights"] == str(weights)
    assert served["handler"]["detector"]["head_format"] == "yolov8"


def test_two_gpus_double_a_gpu_bound_plan_and_spread_its_instances(tmp_path):
    # GPU-bound detection (cheap CPU stages, 64 cores): the GPU bound is what a second GPU doubles
    profile = detection_profile(gpu_ms=2.0, cpu_ms=5000.0, image_bytes=10_000, gb_per_s=25.0, cpus=64)
    one = make_plan(profile, Objective()).chosen["detection"]
    two = make_plan(profile, Objective(), gpus=2).chosen["detection"]
    assert one.bottleneck == "GPU" and two.gpus == 2
    assert two.gpu_bound == pytest.approx(2 * one.gpu_bound)
    assert two.throughput > 1.5 * one.throughput
    render(make_plan(profile, Objective(), gpus=2), tmp_path)
    detector = next(s for s in two.stages if s.stage == "detector")
    groups = read_config(tmp_path / "triton" / "detector" / "config.pbtxt").instance_group
    gpu_groups = [g for g in groups if g.kind == mc.ModelInstanceGroup.KIND_GPU]
    assert [list(g.gpus) for g in gpu_groups] == [[0, 1]]
    assert gpu_groups[0].count * 2 >= detector.instances  # count is per listed GPU


def _with_gpu_decode(profile: Profile, gpu_ms: float, fixed_ms: float = 1.0) -> Profile:
    """The profile plus image_preprocess rows on cuda:0 (nvJPEG; PIXELS stay on the GPU)."""
    rows = [timing("image_preprocess", "cuda:0", batch, gpu_ms, "-", 50_000, 3 * 640 * 640, fixed_ms=fixed_ms)
            for batch in (1, 4, 16)]
    return Profile(profile.machine, profile.stages + rows, profile.transfers, serving=profile.serving)


def test_gpu_decoding_is_chosen_when_the_cores_limit_and_counted_against_the_gpu(tmp_path):
    # 4 cores decoding at 10 ms/image bound the pipeline at ~400/s; nvJPEG at 0.3 ms/image shares the GPU with a
    # 0.5 ms/image detector
    cpu_only = detection_profile(gpu_ms=0.5, cpu_ms=50.0, image_bytes=3 * 640 * 640, gb_per_s=25.0, cpus=4)
    cpu_only = Profile(cpu_only.machine, [replace_seconds(t, 10.0) if t.stage == "image_preprocess" else t
                                          for t in cpu_only.stages], cpu_only.transfers)
    before = make_plan(cpu_only, Objective()).chosen["detection"]
    plan = make_plan(_with_gpu_decode(cpu_only, gpu_ms=0.3), Objective()).chosen["detection"]
    preprocess = next(s for s in plan.stages if s.stage == "image_preprocess")
    detector = next(s for s in plan.stages if s.stage == "detector")
    assert before.bottleneck == "CPU" and preprocess.device == "cuda:0"
    assert plan.throughput > 2 * before.throughput
    # the GPU bound holds both GPU stages' time, and PIXELS do not cross PCIe between them
    assert plan.gpu_bound <= 1e3 / (preprocess.cost_per_item_ms * (1 - preprocess.cpu_share) + detector.cost_per_item_ms) + 1
    assert detector.transfer_per_item_ms < 0.01 and preprocess.transfer_per_item_ms < 0.01
    render(make_plan(_with_gpu_decode(cpu_only, gpu_ms=0.3), Objective()), tmp_path)
    kinds = [g.kind for g in read_config(tmp_path / "triton" / "image_preprocess" / "config.pbtxt").instance_group]
    assert kinds[0] == mc.ModelInstanceGroup.KIND_GPU
    assert (mc.ModelInstanceGroup.KIND_CPU in kinds) == bool(preprocess.cpu_share)
    served = yaml.safe_load((tmp_path / "torchserve" / "object_detection" / "model-config.yaml").read_text())
    assert served["handler"]["decode"] == ("tandem" if preprocess.cpu_share else "gpu")  # the handler decodes there too


def test_slow_gpu_decoding_stays_off_when_cores_suffice():
    many_cores = detection_profile(gpu_ms=0.5, cpu_ms=50.0, image_bytes=3 * 640 * 640, gb_per_s=25.0, cpus=64)
    plan = make_plan(_with_gpu_decode(many_cores, gpu_ms=5.0), Objective()).chosen["detection"]
    assert next(s for s in plan.stages if s.stage == "image_preprocess").device == "cpu"


def replace_seconds(t: StageTiming, per_item_ms: float) -> StageTiming:
    from dataclasses import replace

    return replace(t, seconds=per_item_ms * t.batch / 1e3)


def test_batching_delays_and_step_costs_follow_where_inputs_come_from(tmp_path):
    """nms (batch 1, a flat cost per item) renders no preferred sizes, so Triton hands it what is queued at once;
    GPU stages wait at most MAX_QUEUE_DELAY_US for a fuller batch; a detector fed from a GPU decoder is charged no
    bytes through host memory for its step, one fed from the host is."""
    from tandem_serve.tuning.plan import MAX_QUEUE_DELAY_US

    profile = detection_profile(gpu_ms=0.5, cpu_ms=50.0, image_bytes=3 * 640 * 640, gb_per_s=25.0, cpus=4)
    profile = Profile(profile.machine, [replace_seconds(t, 10.0) if t.stage == "image_preprocess" else t
                                        for t in profile.stages], profile.transfers)  # 4 slow cores: GPU decoding pays
    serving = ServingCost(step_s=0.2e-3, byte_s=1.5e-3 / MB, payload_bytes=MB, latencies_s={})
    host_fed = make_plan(Profile(profile.machine, profile.stages, profile.transfers, serving=serving),
                         Objective()).chosen["detection"]
    gpu_fed = make_plan(_with_gpu_decode(Profile(profile.machine, profile.stages, profile.transfers, serving=serving),
                                         gpu_ms=0.05), Objective()).chosen["detection"]
    by_stage = {p: {s.stage: s for s in plan.stages} for p, plan in (("host", host_fed), ("gpu", gpu_fed))}
    assert by_stage["gpu"]["image_preprocess"].device == "cuda:0" and by_stage["host"]["image_preprocess"].device == "cpu"
    pixels_mib = 3 * 640 * 640 / MB
    assert by_stage["host"]["detector"].serving_per_item_ms == pytest.approx(0.2 + 1.5 * pixels_mib, rel=1e-3)
    assert by_stage["gpu"]["detector"].serving_per_item_ms == pytest.approx(0.2, rel=1e-3)
    assert all(s.queue_delay_us <= MAX_QUEUE_DELAY_US for plan in (host_fed, gpu_fed) for s in plan.stages)
    nms = by_stage["host"]["nms"]
    assert nms.batch == 1 and nms.preferred_batches == []
    render(make_plan(Profile(profile.machine, profile.stages, profile.transfers, serving=serving), Objective()), tmp_path)
    config = read_config(tmp_path / "triton" / "nms" / "config.pbtxt")
    assert list(config.dynamic_batching.preferred_batch_size) == [] and config.max_batch_size > 1


def test_every_profiled_batch_counts_though_bigger_batches_padded_longer():
    """The profile's texts pad to 48 tokens in batches of 1 and 16 but to 56 in batches of 64: the plan still weighs
    every batch size at the size asked for (before, only the batch of 64 was left at size 56), and a one-request
    stage is costed and shown at batch 1."""
    from tandem_serve.tuning.plan import TimingTable

    rows = []
    for batch, size in ((1, 48), (16, 48), (64, 56)):
        rows += [timing("tokenize", "cpu", batch, 0.05, "-", 0, size * 16, size=size, pipeline="text"),
                 timing("encoder_fused", "cuda:0", batch, 0.05, "fp16", size * 16, 384 * 4, size, 1.0, 0.9999, "text")]
    profile = Profile({"cpus": 8, "gpus": ["Test GPU"]}, rows, transfers(25.0))
    options = TimingTable(profile).options("encoder_fused", 56, 0.99)
    assert [t.batch for t in options[("cuda:0", "fp16")]] == [1, 16, 64]
    plan = make_plan(profile, Objective(), sizes={"text": 56}).chosen["text"]
    tokenize = plan.stages[0]
    assert tokenize.batch == 1 and tokenize.cost_per_item_ms == pytest.approx(0.05)


def test_torchserve_workers_cover_the_cpu_bound_at_the_measured_per_request_costs(tmp_path):
    # text on 12 cores: tokenize 0.05 ms/item on the CPU, the encoder on the GPU with a CPU share (the handler's CPU
    # lane, its cores per item = its threads / the plan's rate). Each request also costs a worker's 0.40 ms and the
    # frontend's 0.25 ms; a worker's main thread serves 0.8 / 0.40 ms = 2,000/s
    report = make_plan(text_profile(hidden_gb_per_s=1.0), Objective(), cpus=12)
    plan, served = report.chosen["text"], report.torchserve["text"]
    tokenize, encoder = plan.stages
    assert tokenize.cost_per_item_ms == pytest.approx(0.05) and encoder.cpu_share > 0 and encoder.cpu_instances > 0
    per_request_ms = 0.40 + 0.25 + 0.05 + 1e3 * encoder.cpu_instances / plan.throughput
    assert served.cpu_bound == pytest.approx(12e3 / per_request_ms)
    workers = max(2, math.ceil(min(served.cpu_bound, plan.gpu_bound) / 2000))
    assert served.workers == workers > encoder.instances  # not the Triton plan's GPU instances
    assert served.throughput == pytest.approx(min(served.cpu_bound, plan.gpu_bound, 2000 * workers))
    assert f"TorchServe: {workers} workers" in format_report(report)
    render(report, tmp_path)
    values = yaml.safe_load((tmp_path / "torchserve" / "text_embedding" / "model-config.yaml").read_text())
    assert values["minWorkers"] == values["maxWorkers"] == workers
    assert values["handler"]["pipeline"]["cpu_lane_threads"] == math.ceil(encoder.cpu_instances / workers)  # shared out
    assert json.loads((tmp_path / "plan.json").read_text())["plans"]["text"]["torchserve"]["workers"] == workers
    cheaper = make_plan(text_profile(1.0), Objective(), cpus=12, torchserve_cost=TorchServeCost(request_ms=0.1))
    assert cheaper.torchserve["text"].cpu_bound > served.cpu_bound and cheaper.torchserve["text"].workers < workers


def test_torchserve_workers_stay_at_two_where_the_gpu_bounds_and_at_a_core_each_where_the_cpu_does():
    slow_gpu = detection_profile(gpu_ms=2.0, cpu_ms=5000.0, image_bytes=10_000, gb_per_s=25.0, cpus=64)
    report = make_plan(slow_gpu, Objective())
    plan, served = report.chosen["detection"], report.torchserve["detection"]
    assert plan.bottleneck == "GPU" and served.gpu_bound == plan.gpu_bound < served.cpu_bound
    assert served.workers == max(2, math.ceil(plan.gpu_bound / 2000))  # 500/s on the GPU: two
    many = make_plan(text_profile(1.0), Objective(), cpus=4, torchserve_cost=TorchServeCost(request_ms=5.0))
    assert many.torchserve["text"].workers == 4  # 755/s wants 5 workers of 160/s: never more than a core each
    with pytest.raises(ValueError, match="positive"):
        make_plan(text_profile(1.0), Objective(), torchserve_cost=TorchServeCost(request_ms=0))


def test_torchserve_batches_give_every_worker_one_of_the_requests_in_flight(tmp_path):
    """TorchServe hands a free worker every queued request up to batchSize: the plan sizes it as the requests in
    flight over the workers (a power of two), with micro-batches of the plan's GPU batch or half a TorchServe batch."""
    from tandem_serve.tuning.torchserve_workers import torchserve_batches

    report = make_plan(text_profile(hidden_gb_per_s=1.0), Objective(), cpus=12, torchserve_concurrency=512)
    plan, served = report.chosen["text"], report.torchserve["text"]
    gpu_batch = plan.stages[-1].batch
    expected = 1 << (512 // served.workers).bit_length() - 1
    assert served.batch_size == expected and expected <= 512 / served.workers < 2 * expected
    assert served.micro_batch_size == min(expected, max(gpu_batch, expected // 2))
    assert f"batchSize {expected} (512 requests in flight over {served.workers} workers)" in format_report(report)
    assert torchserve_batches(plan, 8, 512) == (64, max(gpu_batch, 32))
    assert torchserve_batches(plan, 8, 64) == (8, 8)  # low load: a batch of 8 per worker, one micro-batch
    assert torchserve_batches(plan, 8, 4) == (1, 1)  # fewer requests than workers: one each
    with pytest.raises(ValueError, match="concurrency"):
        torchserve_batches(plan, 8, 0)
    render(report, tmp_path)
    values = yaml.safe_load((tmp_path / "torchserve" / "text_embedding" / "model-config.yaml").read_text())
    assert (values["batchSize"], values["handler"]["pipeline"]["micro_batch_size"]) == (expected, served.micro_batch_size)
    assert json.loads((tmp_path / "plan.json").read_text())["plans"]["text"]["torchserve"]["batch_size"] == expected


def test_torchserve_counts_the_tokenizer_as_the_handler_runs_it_not_as_triton_serves_it():
    """Triton's tokenizer stub costs 0.35 ms of CPU per request (measured served); the handler tokenizes a whole
    micro-batch in its pool, at the profiled 0.05 ms per text: TorchServe's CPU per request counts the latter."""
    from tandem_serve.tuning.serving_cost import AdapterCost

    profile = text_profile(hidden_gb_per_s=1e6)
    profile.serving = ServingCost(step_s=0.1e-3, byte_s=0.0, payload_bytes=MB, latencies_s={},
                                  adapters={"tokenize": AdapterCost("tokenizer", busy_s=0.6e-3, stub_cpu_s=0.35e-3)})
    report = make_plan(profile, Objective(), cpus=12)
    plan, served = report.chosen["text"], report.torchserve["text"]
    assert plan.stages[0].cost_per_item_ms == pytest.approx(0.35)  # Triton's
    others_ms = sum(s.cost_per_item_ms for s in plan.stages if s.device == "cpu" and s.stage != "tokenize")
    others_ms += sum(1e3 * s.cpu_instances / plan.throughput for s in plan.stages if s.cpu_share)
    assert served.cpu_ms_per_request == pytest.approx(0.40 + 0.25 + 0.05 + others_ms)


def test_the_encoder_token_budget_is_where_its_token_rate_levels_off(tmp_path):
    """An encoder bound by a 1 ms launch floor up to 3,333 tokens and by 0.3 us per token beyond: its rate is at its
    best from 4,096 tokens (batch 32 x 128), so rows run in calls of at most that many; where the rate still climbs
    at the largest batch (text_profile: 1 ms + 0.1 ms per text) the plan sets no budget."""
    rows = []
    for batch in (1, 8, 32, 128):
        seconds = max(1e-3, batch * 128 * 0.3e-6)
        rows += [timing("tokenize", "cpu", batch, 0.01, "-", 0, 128 * 16, size=128, pipeline="text"),
                 StageTiming("text", "encoder_fused", "cuda:0", "fp16", batch, 128, seconds, 128 * 16, 384 * 4, 0.9999)]
    report = make_plan(Profile({"cpus": 8, "gpus": ["Test GPU"]}, rows, transfers(25.0)), Objective())
    encoder = next(s for s in report.chosen["text"].stages if s.stage == "encoder_fused")
    assert encoder.max_batch_tokens == 4096
    render(report, tmp_path)
    config = read_config(tmp_path / "triton" / "encoder_fused" / "config.pbtxt")
    assert config.parameters["max_batch_tokens"].string_value == "4096"
    assert "encoder_fused: at most 4096 tokens per call" in format_report(report)
    flat = make_plan(text_profile(25.0), Objective())
    assert all(s.max_batch_tokens == 0 for s in flat.chosen["text"].stages)
    assert ": no token budget (its profiled token rate still climbs" in format_report(flat)


def test_clients_sending_one_utf8_text_get_one_step_that_tokenizes_on_its_instances(tmp_path):
    """--text-input utf8: the only placement is text_embedding_utf8, whose encoder_utf8 has encoder_fused's timings and
    tokenize's CPU per item on its instances (their busy time, on the cores reserved for them), not a step of its own:
    with the same measured step costs the cores serve more than through two steps; rendered with serial tokenization and
    the ensemble, consistent. The default plan never offers it (the clients' input would change)."""
    profile = text_profile(hidden_gb_per_s=1e6)
    profile.machine["cpus"] = 16
    profile.serving = ServingCost(step_s=0.1e-3, byte_s=0.0, payload_bytes=MB, latencies_s={}, step_cpu_s=0.4e-3,
                                  step_cpu_shared_s=0.3e-3, byte_cpu_s=0.0, request_cpu_s=0.25e-3, batched_mean=6.0)
    two_steps = make_plan(profile, Objective()).chosen["text"]
    report = make_plan(profile, Objective(), text_input="utf8")
    plan = report.chosen["text"]
    assert plan.ensemble == "text_embedding_utf8" and all(a.ensemble == "text_embedding_utf8"
                                                          for a in report.alternatives["text"])
    assert not any(a.ensemble == "text_embedding_utf8" for a in make_plan(profile, Objective()).alternatives["text"])
    (stage,) = plan.stages
    assert (stage.stage, stage.model, stage.device, stage.precision) == ("encoder_utf8", "encoder_utf8", "cuda:0", "fp16")
    assert stage.host_cpu_per_item_ms == pytest.approx(0.05)  # tokenize's profiled CPU per item
    assert stage.cost_per_item_ms == pytest.approx(0.11 + 1.0 / stage.batch, rel=1e-3)  # encoder_fused's
    busy_s = (stage.cost_per_item_ms + stage.serving_per_item_ms + 0.05) / 1e3
    cores = 16 - stage.instances
    assert plan.cpu_bound == pytest.approx(cores / ((stage.serving_cpu_per_item_ms + 0.25) / 1e3), rel=1e-6)
    assert plan.instance_bound == pytest.approx(stage.instances / busy_s, rel=1e-6)
    assert plan.cpu_bound > two_steps.cpu_bound  # one step's CPU per item instead of two (this GPU bounds both)
    assert plan.throughput == min(plan.cpu_bound, plan.gpu_bound, plan.instance_bound)
    assert "its instances also tokenize, 0.050 ms of CPU per item" in format_report(report)
    with pytest.raises(ValueError, match="text_input"):
        make_plan(profile, Objective(), text_input="json")
    render(report, tmp_path)
    repo = tmp_path / "triton"
    assert sorted(p.name for p in repo.iterdir()) == ["encoder_utf8", "text_embedding_utf8"]
    assert ensemble_problems(repo, "text_embedding_utf8") == []
    config = read_config(repo / "encoder_utf8" / "config.pbtxt")
    assert config.parameters["parallel"].string_value == "false"  # tokenized on the instance's thread, as planned
    assert [(g.kind, g.count) for g in config.instance_group] == [(mc.ModelInstanceGroup.KIND_GPU, stage.instances)]
    ts = yaml.safe_load((tmp_path / "torchserve" / "text_embedding" / "model-config.yaml").read_text())
    assert ts["handler"]["encoder"]["fuse_token_embedding"] is True


def test_a_combined_stage_on_the_cpu_charges_its_host_part_to_the_cores():
    """encoder_utf8 on CPU instances: tokenizing and encoding both run on the shared cores (no GPU instance to hold it)."""
    profile = text_profile(hidden_gb_per_s=1e6)
    profile.stages = [t for t in profile.stages if t.device == "cpu"]
    plan = make_plan(profile, Objective(), text_input="utf8").chosen["text"]
    (stage,) = plan.stages
    assert stage.device == "cpu" and stage.host_cpu_per_item_ms == pytest.approx(0.05)
    assert plan.cpu_bound == pytest.approx(8 / ((stage.cost_per_item_ms + 0.05) / 1e3), rel=1e-6)
