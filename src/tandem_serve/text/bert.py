"""BERT token embedding and transformer encoder with mean pooling, loaded from safetensors.

Split at the seam the pipeline cares about: `TokenEmbedding` (word + position + token-type
embeddings and their LayerNorm) can run on the CPU, `SentenceEncoder` (transformer layers, masked
mean pooling, L2 normalisation) on the GPU; `SentenceEncoder(embedding=...)` fuses both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from tandem_serve.errors import InvalidInputError, ModelFilesError
from tandem_serve.model_files import BertConfig, SentenceModelFiles

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    """Map 'fp32' / 'fp16' / 'bf16' to a torch dtype."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"precision {name!r} is not one of {sorted(_DTYPES)}") from None


class TokenEmbedding(nn.Module):
    """Word + absolute position + token-type (segment 0) embeddings, then LayerNorm."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[batch, length] int64 ids -> [batch, length, hidden]."""
        length = input_ids.shape[1]
        positions = torch.arange(length, device=input_ids.device)
        hidden = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)[None]
            + self.token_type_embeddings.weight[0]
        )
        return self.LayerNorm(hidden)


class _Layer(nn.Module):
    """One post-LayerNorm BERT block (self-attention, then GELU feed-forward)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        h = config.hidden_size
        self.heads = config.num_attention_heads
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(h, h)
        self.value = nn.Linear(h, h)
        self.attention_out = nn.Linear(h, h)
        self.attention_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.intermediate = nn.Linear(h, config.intermediate_size)
        self.output = nn.Linear(config.intermediate_size, h)
        self.output_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        b, n, h = x.shape
        d = h // self.heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, d).transpose(1, 2)

        context = F.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(x)), heads(self.value(x)), attn_mask=attend)
        context = context.transpose(1, 2).reshape(b, n, h)
        x = self.attention_norm(x + self.attention_out(context))
        return self.output_norm(x + self.output(F.gelu(self.intermediate(x))))


class SentenceEncoder(nn.Module):
    """Transformer layers + attention-masked mean pooling + L2 normalisation.

    With `embedding` given the encoder takes token ids (fused placement); otherwise it takes the
    hidden states produced by a separate `TokenEmbedding` stage.
    """

    def __init__(self, config: BertConfig, embedding: TokenEmbedding | None = None):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ModelFilesError("hidden_size is not a multiple of num_attention_heads")
        self.config = config
        self.embedding = embedding
        self.layers = nn.ModuleList(_Layer(config) for _ in range(config.num_hidden_layers))

    def forward(self, inputs: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """ids [b, n] (fused) or hidden [b, n, h], mask [b, n] -> unit-norm embeddings [b, h] fp32."""
        x = self.embedding(inputs) if self.embedding is not None else inputs
        dtype = next(self.layers.parameters()).dtype
        x = x.to(dtype)
        keep = attention_mask.to(torch.bool)
        attend = keep[:, None, None, :]
        for layer in self.layers:
            x = layer(x, attend)
        return mean_pool_normalize(x, keep)


def mean_pool_normalize(hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where `keep` is true, then L2-normalise; computed in fp32."""
    weights = keep.to(torch.float32).unsqueeze(-1)
    summed = (hidden.to(torch.float32) * weights).sum(dim=1)
    counts = weights.sum(dim=1).clamp(min=1e-9)
    return F.normalize(summed / counts, p=2, dim=1)


def _hf_key(name: str) -> str:
    """Map a parameter name of these modules to its HuggingFace BERT checkpoint key."""
    if name.startswith("embedding."):
        return "embeddings." + name[len("embedding."):]
    if not name.startswith("layers."):
        return "embeddings." + name
    _, index, module, param = name.split(".")
    prefix = f"encoder.layer.{index}."
    return prefix + {
        "query": "attention.self.query",
        "key": "attention.self.key",
        "value": "attention.self.value",
        "attention_out": "attention.output.dense",
        "attention_norm": "attention.output.LayerNorm",
        "intermediate": "intermediate.dense",
        "output": "output.dense",
        "output_norm": "output.LayerNorm",
    }[module] + "." + param


def hf_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """`module`'s weights under HuggingFace BERT checkpoint keys (what `_load_weights` reads back)."""
    return {_hf_key(name): tensor.detach().contiguous() for name, tensor in module.state_dict().items()}


def _load_weights(module: nn.Module, weights_path: Path) -> None:
    """Copy checkpoint tensors into `module`, naming the file and key of any mismatch."""
    try:
        raw = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises its own error types
        raise ModelFilesError(f"cannot read weights {weights_path}: {exc}") from exc
    checkpoint = {k.removeprefix("bert."): v for k, v in raw.items()}
    state = {}
    for name, param in module.state_dict().items():
        key = _hf_key(name)
        if key not in checkpoint:
            raise ModelFilesError(f"{weights_path} lacks tensor {key!r}")
        if tuple(checkpoint[key].shape) != tuple(param.shape):
            raise ModelFilesError(f"{weights_path}: {key} has shape {tuple(checkpoint[key].shape)}, expected {tuple(param.shape)}")
        state[name] = checkpoint[key].to(torch.float32)
    module.load_state_dict(state)


def load_token_embedding(files: SentenceModelFiles, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> TokenEmbedding:
    """The token-embedding stage with the model's weights, in eval mode."""
    module = TokenEmbedding(files.bert)
    _load_weights(module, files.weights)
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_sentence_encoder(
    files: SentenceModelFiles, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, fused: bool = False
) -> SentenceEncoder:
    """The encoder stage (optionally with the token embedding fused in), in eval mode."""
    module = SentenceEncoder(files.bert, TokenEmbedding(files.bert) if fused else None)
    _load_weights(module, files.weights)
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _values(tensor: torch.Tensor) -> torch.Tensor | np.ndarray:
    """A host tensor as a numpy view (its reductions cost about a microsecond, torch's several), else itself."""
    return tensor.numpy() if tensor.device.type == "cpu" else tensor


def check_token_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, config: BertConfig, max_length: int) -> None:
    """Raise InvalidInputError unless ids/mask are a well-formed [batch, length] pair for the model."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise InvalidInputError(f"INPUT_IDS must be [batch, length>0], got {list(input_ids.shape)}")
    if input_ids.shape[1] > max_length:
        raise InvalidInputError(f"INPUT_IDS length {input_ids.shape[1]} exceeds max_seq_length {max_length}")
    ids = _values(input_ids)
    if input_ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= config.vocab_size):
        raise InvalidInputError(f"INPUT_IDS values must lie in [0, {config.vocab_size})")
    if attention_mask is not None:
        check_attention_mask(attention_mask, input_ids.shape)


def check_attention_mask(attention_mask: torch.Tensor, expected_shape: torch.Size | tuple[int, ...]) -> None:
    """Raise InvalidInputError unless the mask matches `expected_shape`, holds only 0 and 1 and keeps >= 1 token per row."""
    if tuple(attention_mask.shape) != tuple(expected_shape):
        raise InvalidInputError(f"ATTENTION_MASK shape {list(attention_mask.shape)} does not match {list(expected_shape)}")
    if not attention_mask.numel():
        return
    mask = _values(attention_mask)
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise InvalidInputError("ATTENTION_MASK values must be 0 or 1")
    if not bool((mask != 0).any(1).all()):
        raise InvalidInputError("ATTENTION_MASK has a row with no token to attend to")
