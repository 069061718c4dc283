"""Stage parameters parse once, with errors naming the parameter."""

import pytest

from tandem_serve.errors import ConfigError
from tandem_serve.stage_config import (
    EncoderConfig,
    TokenEmbeddingConfig,
    TokenizerConfig,
    Utf8EncoderConfig,
    parse_stage_config,
    with_cpu_threads,
)


def test_parses_typed_values_and_ignores_framework_keys():
    config = parse_stage_config(EncoderConfig, {
        "fuse_token_embedding": "yes", "precision": "bf16", "cpu_threads": "2", "FORCE_CPU_ONLY_INPUT_TENSORS": "no",
    })
    assert config == EncoderConfig(fuse_token_embedding=True, precision="bf16", cpu_threads=2)
    assert parse_stage_config(TokenizerConfig, {}) == TokenizerConfig()


@pytest.mark.parametrize("cls,params,message", [
    (TokenizerConfig, {"pad_multipl": "8"}, "unknown parameter 'pad_multipl'"),
    (TokenizerConfig, {"pad_multiple": "eight"}, "'pad_multiple' must be int"),
    (TokenizerConfig, {"pad_multiple": "0"}, "'pad_multiple' must be >= 1"),
    (EncoderConfig, {"fuse_token_embedding": "maybe"}, "must be true or false"),
    (EncoderConfig, {"precision": "int4"}, "'precision' must be"),
    (TokenEmbeddingConfig, {"output_dtype": "bf16"}, "'output_dtype' must be fp16 or fp32"),
    (Utf8EncoderConfig, {"pad_multipl": "8"}, r"unknown parameter 'pad_multipl'; known: \[.*'max_batch_tokens'.*'pad_multiple'"),
    (Utf8EncoderConfig, {"max_text_bytes": "0"}, "'max_text_bytes' >= 1"),
    (Utf8EncoderConfig, {"precision": "int4"}, "'precision' must be"),
    (Utf8EncoderConfig, {"fuse_token_embedding": "false"}, "'fuse_token_embedding' must be true"),
])
def test_bad_values_name_the_parameter(cls, params, message):
    with pytest.raises(ConfigError, match=message):
        parse_stage_config(cls, params)


def test_a_combined_stage_gives_each_part_its_own_parameters():
    """encoder_utf8's parameters: the tokenizer's and the encoder's, model_dir to both, threads to the encoder."""
    config = parse_stage_config(Utf8EncoderConfig, {
        "model_dir": "/m", "pad_multiple": "16", "parallel": "false", "precision": "fp16", "cpu_threads": "0",
        "max_batch_tokens": "4096", "FORCE_CPU_ONLY_INPUT_TENSORS": "yes",
    })
    assert config.tokenizer == TokenizerConfig(model_dir="/m", pad_multiple=16, parallel=False)
    assert config.encoder == EncoderConfig(model_dir="/m", fuse_token_embedding=True, precision="fp16",
                                           max_batch_tokens=4096)
    assert with_cpu_threads(config, 3).encoder.cpu_threads == 3 and with_cpu_threads(config, 3).tokenizer == config.tokenizer
    assert with_cpu_threads(EncoderConfig(), 2) == EncoderConfig(cpu_threads=2)
