"""Caption vocabulary: a word-level tokenizer and the word <-> id table the caption head is trained on.

The same :func:`tokenize` feeds the vocabulary and the caption metrics (``utils/metrics/caption.py``), so
what the model learns to emit and what it is scored on are split into words the same way.

The table is stored in checkpoints as a plain ``list[str]`` (:meth:`Vocabulary.to_list`), because
checkpoints must load with ``torch.load(weights_only=True)``, which refuses arbitrary Python objects.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Iterable, Sequence

import torch

PAD, BOS, EOS, UNK = 0, 1, 2, 3  # fixed ids: the head and the loss rely on them without a Vocabulary at hand
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")

# PTB-style: English clitics become their own token ("dog's" -> "dog 's", "don't" -> "do n't"), everything
# else is a run of letters/digits; punctuation is dropped, as pycocoevalcap's PTBTokenizer output is.
_TOKEN = re.compile(r"[a-z0-9]+(?=n't\b)|n't\b|'(?:s|re|ve|ll|d|m)\b|[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Lower-cased words of ``text`` with punctuation removed (a Java-free stand-in for PTBTokenizer)."""
    return _TOKEN.findall(text.lower().replace("\u2019", "'"))


class Vocabulary:
    """Word <-> id table with ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, ``<unk>`` = 3.

    Build it from the training captions with :meth:`build`; store it with :meth:`to_list` and restore it
    with :meth:`from_list`.
    """

    pad_id, bos_id, eos_id, unk_id = PAD, BOS, EOS, UNK

    def __init__(self, words: Sequence[str] = ()):
        """``words``: the non-special words, in id order (ids start after the specials)."""
        self.itos: list[str] = list(SPECIALS)
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(SPECIALS)}
        for w in words:
            if w in self.stoi:
                raise ValueError(f"duplicate vocabulary word {w!r}")
            self.stoi[w] = len(self.itos)
            self.itos.append(w)

    @staticmethod
    def tokenize(text: str) -> list[str]:
        """See the module-level :func:`tokenize`."""
        return tokenize(text)

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 2) -> "Vocabulary":
        """A vocabulary of every word seen at least ``min_count`` times; rarer words map to ``<unk>``.

        Words are ordered by descending count, then alphabetically, so the same captions always give
        the same ids (whatever order they come in).
        """
        counts = Counter(w for c in captions for w in tokenize(c))
        words = sorted((w for w, n in counts.items() if n >= min_count and w not in SPECIALS),
                       key=lambda w: (-counts[w], w))
        return cls(words)

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos

    __hash__ = None  # mutable-by-design table; equality is by content

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} words)"

    def __contains__(self, word: str) -> bool:
        return word in self.stoi

    def encode(self, text: str, max_len: int) -> list[int]:
        """``[<bos>, words..., <eos>]``, at most ``max_len`` ids; long captions lose trailing words, not
        ``<eos>``, so the model still learns where a caption ends."""
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 (room for <bos> and <eos>), got {max_len}")
        ids = [self.stoi.get(w, UNK) for w in tokenize(text)][: max_len - 2]
        return [BOS, *ids, EOS]

    def encode_batch(self, captions: list[str], max_len: int) -> torch.Tensor:
        """``(B, T)`` int64 ids of :meth:`encode`, right-padded with ``<pad>``; ``T`` is the longest, <= max_len."""
        rows = [self.encode(c, max_len) for c in captions]
        t = max((len(r) for r in rows), default=2)
        out = torch.full((len(rows), t), PAD, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return out

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Words of ``ids`` joined by spaces: stops at the first ``<eos>``, skips the other specials."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        words = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i >= len(SPECIALS) and i < len(self.itos):
                words.append(self.itos[i])
        return " ".join(words)

    def decode_batch(self, ids: torch.Tensor) -> list[str]:
        """:meth:`decode` of every row of a ``(B, L)`` tensor."""
        return [self.decode(row) for row in ids.tolist()]

    def to_list(self) -> list[str]:
        """Every entry in id order, specials included: a plain list a ``weights_only`` checkpoint can hold."""
        return list(self.itos)

    @classmethod
    def from_list(cls, words: Sequence[str]) -> "Vocabulary":
        """Inverse of :meth:`to_list`."""
        words = list(words)
        if tuple(words[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"not a stored vocabulary: it must start with {SPECIALS}, got {words[:len(SPECIALS)]}")
        return cls(words[len(SPECIALS):])
