"""Real English sentences (scikit-learn's dataset descriptions) as token ids of a small word
vocabulary, in batches padded to their own longest sentence, so batches differ in length."""

import re

import numpy as np


def sentences() -> list[list[str]]:
    from sklearn import datasets

    texts = [datasets.load_digits().DESCR, datasets.load_iris().DESCR, datasets.load_wine().DESCR,
             datasets.load_breast_cancer().DESCR, datasets.load_diabetes().DESCR, datasets.load_linnerud().DESCR]
    words = [re.findall(r"[a-z]+", s.lower()) for t in texts for s in re.split(r"[.\n]\s*\n|\.\s", t)]
    return [w for w in words if 3 <= len(w) <= 40]


def batches(batch_size: int = 16):
    sents = sentences()
    vocab = {w: i + 2 for i, w in enumerate(sorted({w for s in sents for w in s}))}  # 0 padding, 1 unknown
    for i in range(0, len(sents), batch_size):
        chunk = sents[i:i + batch_size]
        n = max(len(s) for s in chunk)
        ids = np.zeros((len(chunk), n), np.int64)
        mask = np.zeros((len(chunk), n), np.int64)
        for k, s in enumerate(chunk):
            ids[k, :len(s)] = [min(vocab.get(w, 1), 999) for w in s]
            mask[k, :len(s)] = 1
        yield {"input_ids": ids, "attention_mask": mask}
