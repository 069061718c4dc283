"""BERT token embedding and transformer encoder with the model's sentence head, loaded from safetensors.

Split at the seam the pipeline cares about: `TokenEmbedding` (word + position + token-type
embeddings and their LayerNorm) can run on the CPU, `SentenceEncoder` (transformer layers, then the
pooling, Dense layers and normalisation its sentence-transformers modules list) on the GPU;
`SentenceEncoder(embedding=...)` fuses both.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from tandem_serve.errors import InvalidInputError, ModelFilesError
from tandem_serve.model_files import BertConfig, HeadConfig, SentenceModelFiles

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
        # DistilBERT has none (type_vocab_size 0)
        self.token_type_embeddings = (nn.Embedding(config.type_vocab_size, config.hidden_size)
                                      if config.type_vocab_size else None)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[batch, length] int64 ids -> [batch, length, hidden]."""
        length = input_ids.shape[1]
        # right padding: the real tokens' positions are offset + 0, 1, ...; padded positions are masked out
        positions = torch.arange(length, device=input_ids.device) + self.config.position_offset
        hidden = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        if self.token_type_embeddings is not None:
            hidden = hidden + self.token_type_embeddings.weight[0]
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


def relative_position_buckets(length: int, buckets: int, device: torch.device, max_distance: int = 128) -> torch.Tensor:
    """[length, length] bucket of each (query i, key j) offset, bidirectional as T5 and MPNet define them: half the
    buckets per direction (keys after the query in the upper half); offsets below a quarter of the buckets
    exactly, larger ones on a log scale up to `max_distance`, beyond it the last bucket."""
    positions = torch.arange(length, device=device)
    back = positions[:, None] - positions[None, :]  # query - key: > 0 where the key comes first
    half = buckets // 2
    exact = half // 2
    distance = back.abs()
    logarithmic = exact + (torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
                           * (half - exact)).to(torch.long)
    bucket = torch.where(distance < exact, distance, logarithmic.clamp(max=half - 1))
    return bucket + (back < 0).to(torch.long) * half


class SentenceHead(nn.Module):
    """What sentence-transformers computes from the last hidden states: the pooling modes (concatenated in their
    order), its Dense layers, then L2 normalisation where the model lists Normalize. Computed in fp32.

    Padding is on the right (the tokenizer's), so the first position is the CLS token and position i of a row
    has weight i + 1 in weighted-mean pooling."""

    def __init__(self, config: HeadConfig):
        super().__init__()
        self.modes = config.pooling
        self.normalize = config.normalize
        self.dense = nn.ModuleList(nn.Linear(d.in_features, d.out_features, bias=d.bias) for d in config.dense)
        self.activations = nn.ModuleList(getattr(nn, d.activation)() for d in config.dense)  # DENSE_ACTIVATIONS

    def forward(self, hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """hidden [b, n, h], keep [b, n] bool -> [b, embedding] fp32; pooled in fp32, the Dense layers fed in the
        dtype the hidden states arrive in (the module's: fp32 too where they are int8-quantised Linear layers,
        whose weight is a method, not a tensor)."""
        dense_dtype = hidden.dtype
        hidden = hidden.to(torch.float32)
        weights = keep.to(torch.float32).unsqueeze(-1)
        counts = weights.sum(dim=1).clamp(min=1e-9)
        pooled = []
        for mode in self.modes:
            if mode == "cls":
                pooled.append(hidden[:, 0])
            elif mode == "max":
                pooled.append(hidden.masked_fill(~keep.unsqueeze(-1), float("-inf")).max(dim=1).values)
            elif mode == "mean":
                pooled.append((hidden * weights).sum(dim=1) / counts)
            elif mode == "mean_sqrt_len_tokens":
                pooled.append((hidden * weights).sum(dim=1) / counts.sqrt())
            elif mode == "weightedmean":
                position = weights * torch.arange(1, hidden.shape[1] + 1, device=hidden.device,
                                                  dtype=torch.float32).view(1, -1, 1)
                pooled.append((hidden * position).sum(dim=1) / position.sum(dim=1).clamp(min=1e-9))
            else:  # lasttoken: the last kept position of each row
                last = (keep.sum(dim=1) - 1).clamp(min=0)
                pooled.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])
        x = pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=1)
        for linear, activation in zip(self.dense, self.activations):
            x = activation(linear(x.to(dense_dtype)).to(torch.float32))
        return F.normalize(x, p=2, dim=1) if self.normalize else x


class SentenceEncoder(nn.Module):
    """Transformer layers + the model's sentence head (pooling, Dense, optional normalisation).

    With `embedding` given the encoder takes token ids (fused placement); otherwise it takes the
    hidden states produced by a separate `TokenEmbedding` stage. Without `head`: mean pooling and L2
    normalisation (all-MiniLM-L6-v2's).
    """

    def __init__(self, config: BertConfig, embedding: TokenEmbedding | None = None, head: HeadConfig | None = None):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ModelFilesError("hidden_size is not a multiple of num_attention_heads")
        self.config = config
        self.embedding = embedding
        self.layers = nn.ModuleList(_Layer(config) for _ in range(config.num_hidden_layers))
        # MPNet: a learned bias per head and relative-position bucket, added to every layer's attention scores
        self.relative_attention_bias = (nn.Embedding(config.relative_buckets, config.num_attention_heads)
                                        if config.relative_buckets else None)
        self.head = SentenceHead(head or HeadConfig(normalize=True))

    def forward(self, inputs: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """ids [b, n] (fused) or hidden [b, n, h], mask [b, n] -> embeddings [b, embedding size] fp32."""
        x = self.embedding(inputs) if self.embedding is not None else inputs
        dtype = next(self.layers.parameters()).dtype
        x = x.to(dtype)
        keep = attention_mask.to(torch.bool)
        attend = keep[:, None, None, :]
        if self.relative_attention_bias is not None:  # [b, heads, n, n]: the bias, -inf on padded keys
            buckets = relative_position_buckets(x.shape[1], self.config.relative_buckets, x.device)
            bias = self.relative_attention_bias(buckets).permute(2, 0, 1)[None].to(dtype)
            attend = bias.masked_fill(~attend, float("-inf"))
        for layer in self.layers:
            x = layer(x, attend)
        return self.head(x, keep)


_BERT_NAMES = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
               "attention_out": "attention.output.dense", "attention_norm": "attention.output.LayerNorm",
               "intermediate": "intermediate.dense", "output": "output.dense", "output_norm": "output.LayerNorm"}
_MPNET_NAMES = {"query": "attention.attn.q", "key": "attention.attn.k", "value": "attention.attn.v",
                "attention_out": "attention.attn.o", "attention_norm": "attention.LayerNorm",
                "intermediate": "intermediate.dense", "output": "output.dense", "output_norm": "output.LayerNorm"}
_DISTILBERT_NAMES = {"query": "attention.q_lin", "key": "attention.k_lin", "value": "attention.v_lin",
                     "attention_out": "attention.out_lin", "attention_norm": "sa_layer_norm",
                     "intermediate": "ffn.lin1", "output": "ffn.lin2", "output_norm": "output_layer_norm"}


def _hf_key(name: str, model_type: str = "bert") -> str:
    """Map a parameter name of these modules to its HuggingFace checkpoint key (BERT / RoBERTa, DistilBERT, MPNet)."""
    if name.startswith("embedding."):
        return "embeddings." + name[len("embedding."):]
    if name.startswith("relative_attention_bias."):
        return "encoder." + name
    if not name.startswith("layers."):
        return "embeddings." + name
    _, index, module, param = name.split(".")
    if model_type == "distilbert":
        return f"transformer.layer.{index}.{_DISTILBERT_NAMES[module]}.{param}"
    names = _MPNET_NAMES if model_type == "mpnet" else _BERT_NAMES
    return f"encoder.layer.{index}.{names[module]}.{param}"


def hf_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """`module`'s weights under HuggingFace BERT checkpoint keys (what `_load_weights` reads back)."""
    return {_hf_key(name): tensor.detach().contiguous() for name, tensor in module.state_dict().items()
            if not name.startswith("head.")}


def _load_weights(module: nn.Module, weights_path: Path) -> None:
    """Copy checkpoint tensors into `module`, naming the file and key of any mismatch."""
    try:
        raw = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises its own error types
        raise ModelFilesError(f"cannot read weights {weights_path}: {exc}") from exc
    checkpoint = {k.removeprefix("bert.").removeprefix("roberta.").removeprefix("distilbert.").removeprefix("mpnet."): v
                  for k, v in raw.items()}
    model_type = module.config.model_type
    state = {}
    for name, param in module.state_dict().items():
        if name.startswith("head."):
            continue  # the sentence head's Dense layers have files of their own (_load_head)
        key = _hf_key(name, model_type)
        if key not in checkpoint:
            raise ModelFilesError(f"{weights_path} lacks tensor {key!r}")
        if tuple(checkpoint[key].shape) != tuple(param.shape):
            raise ModelFilesError(f"{weights_path}: {key} has shape {tuple(checkpoint[key].shape)}, expected {tuple(param.shape)}")
        state[name] = checkpoint[key].to(torch.float32)
    module.load_state_dict(state, strict=False)  # every tensor but the head's is in `state` (checked above)


def _load_head(head: SentenceHead, config: HeadConfig) -> None:
    """Each Dense layer's weights from its module's model.safetensors (linear.weight, linear.bias)."""
    for linear, dense in zip(head.dense, config.dense):
        try:
            raw = load_file(str(dense.weights))
        except Exception as exc:  # safetensors raises its own error types
            raise ModelFilesError(f"cannot read Dense weights {dense.weights}: {exc}") from exc
        for name, param in linear.named_parameters():
            key = f"linear.{name}"
            if key not in raw or tuple(raw[key].shape) != tuple(param.shape):
                found = tuple(raw[key].shape) if key in raw else "nothing"
                raise ModelFilesError(f"{dense.weights}: {key} should have shape {tuple(param.shape)}, found {found}")
            param.data.copy_(raw[key].to(torch.float32))


def load_token_embedding(files: SentenceModelFiles, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> TokenEmbedding:
    """The token-embedding stage with the model's weights, in eval mode."""
    module = TokenEmbedding(files.bert)
    _load_weights(module, files.weights)
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_sentence_encoder(
    files: SentenceModelFiles, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, fused: bool = False
) -> SentenceEncoder:
    """The encoder stage (optionally with the token embedding fused in), in eval mode."""
    module = SentenceEncoder(files.bert, TokenEmbedding(files.bert) if fused else None, files.head)
    _load_weights(module, files.weights)
    _load_head(module.head, files.head)
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
