"""A sentence-embedding transformer a user might bring: a small BERT (transformers, seeded
random weights) with mean pooling; two int64 inputs with a dynamic sequence axis; a dict of
two outputs."""

import torch
from torch import nn
from transformers import BertConfig, BertModel

HIDDEN = 64


class SentenceEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        cfg = BertConfig(vocab_size=1000, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=128)
        self.bert = BertModel(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        emb = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-6)
        return {"embedding": emb, "tokens": hidden}


def make() -> nn.Module:
    return SentenceEncoder()
