"""Word-level tokenizer over the shapes grammar's closed vocabulary.

Ids: ``0`` = ``<pad>``, ``1`` = ``<unk>``, then the sorted words.  Text is lower-cased and split into ``[a-z]+`` runs
(punctuation and digits are dropped).  Words outside the vocabulary encode to ``UNK`` (and decode as ``"<unk>"``);
captions longer than ``max_len`` words are truncated to their first ``max_len`` tokens (no end token is added).
"""
from __future__ import annotations

import json
import re

import numpy as np

from pqjax.demo.data import vocab_words

PAD, UNK = 0, 1
PAD_TOKEN, UNK_TOKEN = "<pad>", "<unk>"


def split_words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


class Tokenizer:
    def __init__(self, words=None):
        words = sorted(set(vocab_words() if words is None else words))
        self.vocab: dict[str, int] = {PAD_TOKEN: PAD, UNK_TOKEN: UNK, **{w: i + 2 for i, w in enumerate(words)}}
        self.inverse = {i: w for w, i in self.vocab.items()}

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, texts, max_len: int):
        """``(ids int32 [B, max_len], mask bool [B, max_len])``; mask is True on real (non-pad) tokens."""
        if isinstance(texts, str):
            texts = [texts]
        ids = np.full((len(texts), max_len), PAD, np.int32)
        for b, text in enumerate(texts):
            toks = [self.vocab.get(w, UNK) for w in split_words(text)][:max_len]
            ids[b, :len(toks)] = toks
        return ids, ids != PAD

    def decode(self, ids) -> list[str]:
        """Join the non-pad tokens of each row of ``ids`` [B, L] (or a single [L] row) with spaces."""
        ids = np.asarray(ids)
        rows = ids[None] if ids.ndim == 1 else ids
        return [" ".join(self.inverse.get(int(i), UNK_TOKEN) for i in row if i != PAD) for row in rows]

    def save(self, path) -> None:
        with open(path, "w") as f:
            json.dump({"vocab": self.vocab}, f, indent=1)

    @classmethod
    def load(cls, path) -> "Tokenizer":
        with open(path) as f:
            vocab = json.load(f)["vocab"]
        if vocab.get(PAD_TOKEN) != PAD or vocab.get(UNK_TOKEN) != UNK:
            raise ValueError(f"{path}: vocab must map {PAD_TOKEN}->0 and {UNK_TOKEN}->1")
        words = sorted(w for w in vocab if w not in (PAD_TOKEN, UNK_TOKEN))
        tok = cls(words)
        if tok.vocab != vocab:
            raise ValueError(f"{path}: vocab ids are not pad, unk, then sorted words")
        return tok
