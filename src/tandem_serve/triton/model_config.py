"""Triton model configs as tritonclient's protobuf `ModelConfig`: read, written, sent as a load override, and an
ensemble checked against its composing models."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2 as mc


def read_config(path: Path) -> mc.ModelConfig:
    """A config.pbtxt parsed into ModelConfig."""
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def write_config(config: mc.ModelConfig, path: Path) -> None:
    path.write_text("# Rendered by `tandem plan` / `tandem tune`.\n" + text_format.MessageToString(config))


def config_json(config: mc.ModelConfig) -> str:
    """The JSON form Triton's load API takes as a config override."""
    return json_format.MessageToJson(config, preserving_proto_field_name=True)


def ensemble_problems(repository: Path, ensemble: str) -> list[str]:
    """Mismatches between an ensemble's steps and its composing models' configs in `repository`: unknown
    tensor names, and an internal tensor whose producer and consumer disagree on its type."""
    config = read_config(repository / ensemble / "config.pbtxt")
    types = {t.name: t.data_type for t in config.input}
    problems = []
    for step in config.ensemble_scheduling.step:
        model = read_config(repository / step.model_name / "config.pbtxt")
        inputs = {t.name: t.data_type for t in model.input}
        outputs = {t.name: t.data_type for t in model.output}
        for key, tensor in step.input_map.items():
            if key not in inputs:
                problems.append(f"{step.model_name} has no input {key}")
            elif tensor in types and types[tensor] != inputs[key]:
                problems.append(f"{tensor}: {mc.DataType.Name(types[tensor])} into {step.model_name}.{key} "
                                f"({mc.DataType.Name(inputs[key])})")
        for key, tensor in step.output_map.items():
            if key not in outputs:
                problems.append(f"{step.model_name} has no output {key}")
            else:
                types[tensor] = outputs[key]
        if model.max_batch_size and config.max_batch_size > model.max_batch_size:  # 0: takes whole requests
            problems.append(f"{step.model_name}: max_batch_size {model.max_batch_size} < the ensemble's {config.max_batch_size}")
    for t in config.output:
        if types.get(t.name) not in (None, t.data_type):
            problems.append(f"ensemble output {t.name} is {mc.DataType.Name(t.data_type)}, produced as "
                            f"{mc.DataType.Name(types[t.name])}")
    return problems
