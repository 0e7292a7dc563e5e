"""CLIP's text side: a byte-level tokenizer and a small causal text transformer.

Bytes instead of CLIP's 49,152-entry BPE: no vocabulary file to ship or download, every string
encodes (any language, any symbol), at the price of longer sequences, which the short captions
of image–text pretraining can afford.
"""

from __future__ import annotations

import torch
from torch import nn

PAD, START, END = 0, 257, 258  # bytes are 1..256
VOCAB_SIZE = 259


class ByteTokenizer:
    """Text → `[B, context_length]` token ids: START, the UTF-8 bytes (+1), END, then PAD.
    Longer texts are cut so that END always fits: the text transformer reads its features
    at the END position."""

    def __init__(self, context_length: int = 77) -> None:
        if context_length < 3:
            raise ValueError("context_length must leave room for START, one byte and END")
        self.context_length = context_length

    def __call__(self, texts: list[str]) -> torch.Tensor:
        tokens = torch.full((len(texts), self.context_length), PAD, dtype=torch.long)
        for row, text in enumerate(texts):
            body = [b + 1 for b in text.encode("utf-8")[: self.context_length - 2]]
            ids = [START, *body, END]
            tokens[row, : len(ids)] = torch.tensor(ids)
        return tokens

    @staticmethod
    def decode(tokens: torch.Tensor) -> str:
        body = [int(t) - 1 for t in tokens.tolist() if 1 <= int(t) <= 256]
        return bytes(body).decode("utf-8", errors="replace")


class TextTransformer(nn.Module):
    """Token + learned position embeddings, pre-LN causal transformer blocks, a final LayerNorm;
    the features of a text are the activations at its END token (CLIP §2.4). Causal attention
    means the padding after END never reaches them."""

    def __init__(self, width: int, layers: int, heads: int, context_length: int) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(VOCAB_SIZE, width)
        self.position_embedding = nn.Parameter(torch.empty(context_length, width))
        block = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.01)
        self.register_buffer("causal_mask", nn.Transformer.generate_square_subsequent_mask(context_length),
                             persistent=False)
        self.num_features = width

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        x = self.token_embedding(tokens) + self.position_embedding[:length]
        x = self.blocks(x, mask=self.causal_mask[:length, :length], is_causal=True)
        x = self.final_norm(x)
        end = (tokens == END).int().argmax(dim=1)
        return x[torch.arange(len(x), device=x.device), end]
