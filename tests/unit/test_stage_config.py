"""Stage parameters parse once, with errors naming the parameter."""

import pytest

from tandem_serve.errors import ConfigError
from tandem_serve.stage_config import EncoderConfig, TokenEmbeddingConfig, TokenizerConfig, parse_stage_config


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
])
def test_bad_values_name_the_parameter(cls, params, message):
    with pytest.raises(ConfigError, match=message):
        parse_stage_config(cls, params)
