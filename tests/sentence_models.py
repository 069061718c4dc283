"""Sentence-transformers directories built as a user would: a random encoder of each supported architecture saved by
transformers, and the modules (Pooling, Dense, Normalize) saved by sentence-transformers itself."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

ARCHITECTURES = ("bert", "roberta", "xlm-roberta", "distilbert", "mpnet")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def architecture_dir(kind: str, target: Path, tokenizer_source: Path, roberta_positions: int = 258) -> Path:
    """A random 2-layer encoder of `kind` (H=128) saved by transformers into `target`, with the WordPiece tokenizer
    files of `tokenizer_source` beside it (the encoder's arithmetic is what is tested). RoBERTa / XLM-R / MPNet: positions
    offset past padding_idx 1 (`roberta_positions` of them: 514 as the published models, where sentence-transformers
    embeds 512 tokens), one token type; DistilBERT: its own names, no token types."""
    import transformers

    target.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_source / name).is_file():
            shutil.copy(tokenizer_source / name, target / name)
    common = dict(vocab_size=30522, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256)
    if kind == "distilbert":
        config = transformers.DistilBertConfig(vocab_size=30522, dim=128, n_layers=2, n_heads=2, hidden_dim=256,
                                               max_position_embeddings=512)
    elif kind == "bert":
        config = transformers.BertConfig(**common, max_position_embeddings=512)
    elif kind == "mpnet":  # positions as RoBERTa's, relative position buckets in every layer's attention
        config = transformers.MPNetConfig(**common, max_position_embeddings=roberta_positions, pad_token_id=1)
    else:
        config_cls = transformers.RobertaConfig if kind == "roberta" else transformers.XLMRobertaConfig
        config = config_cls(**common, max_position_embeddings=roberta_positions, type_vocab_size=1, pad_token_id=1)
    torch.manual_seed(11)
    model = transformers.AutoModel.from_config(config)
    if kind == "mpnet":  # a bias large enough to move the attention (initialised at std 0.02 it hardly would)
        with torch.no_grad():
            model.encoder.relative_attention_bias.weight.normal_(0.0, 1.0)
    model.save_pretrained(target)
    return target


def saved_model(encoder_dir: Path, target: Path, modes, dense=(), normalize=False) -> Path:
    """A sentence-transformers directory written by sentence-transformers: the encoder, Pooling(modes), Dense layers
    (out_features, activation) with seeded weights, Normalize when asked."""
    import sentence_transformers as st
    from sentence_transformers.models import Dense, Normalize, Pooling, Transformer

    torch.manual_seed(7)
    transformer = Transformer(str(encoder_dir))
    hidden = transformer.get_embedding_dimension()
    modules = [transformer, Pooling(hidden, pooling_mode=modes)]
    size = hidden * (1 if isinstance(modes, str) else len(modes))
    for out_features, activation in dense:
        modules.append(Dense(size, out_features, activation_function=activation))
        size = out_features
    if normalize:
        modules.append(Normalize())
    st.SentenceTransformer(modules=modules, device="cpu").save(str(target))
    return target
