"""Caption vocabulary: a word-level tokenizer and the word <-> id table the caption head is trained on.

The same :func:`tokenize` feeds the vocabulary and the caption metrics (``utils/eval/metrics/caption.py``), so
what the model learns to emit and what it is scored on are split into words the same way.

The table is stored in checkpoints as a plain ``list[str]`` (:meth:`Vocabulary.to_list`), because
checkpoints must load with ``torch.load(weights_only=True)``, which refuses arbitrary Python objects.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence

import torch

from utils.tasks import BOS, EOS, PAD, UNK

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
UNK_WORD = SPECIALS[UNK]  # what decode writes for a predicted <unk>: a word the scorers count as wrong

# A pure-Python reproduction of what the COCO caption evaluation does to a sentence: Stanford's PTBTokenizer
# (3.4.1, ``-lowerCase -preserveLines``, which needs Java) followed by pycocoevalcap's removal of the tokens
# in PUNCTUATIONS. Checked token for token against the Java tokenizer on ordinary captions (see
# tests/test_caption.py): clitics split ("man's" -> "man 's", "don't" -> "do n't", "cannot" -> "can not"),
# hyphenated words, numbers ("1,000", "4.5", "2:30"), acronyms ("u.s.") and common abbreviations ("mr.")
# kept whole, brackets escaped to -lrb- etc. (which survive: the list holds them upper-case, the tokens are
# lower-case), "!!" kept, other symbols ("$", "%", "&", "+") their own tokens. One deliberate difference:
# "<" and ">" are always split off, so the token "<unk>" can never come out of a reference (see UNK_WORD).
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                          ".", "?", "!", ",", ":", "-", "--", "...", ";"])  # pycocoevalcap's list, verbatim
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_ABBREVIATIONS = "mr|mrs|ms|dr|st|jr|sr|vs|etc|prof|mt|ave|inc|ltd|co"  # kept with their period, as PTB does
_PTB_TOKEN = re.compile(
    r"\.\.\.+|--+|[!?]+"                      # runs PTB keeps as one token ("...", "--", "!!", "?!")
    rf"|\b(?:{_ABBREVIATIONS})\.|(?:[^\W\d_]\.){{2,}}"  # "mr.", "u.s.", "a.m.", "e.g."
    r"|'\d+s?\b"                              # "'90s"
    r"|\w+(?:[-/.,:']\w+)*"                   # words, inner hyphens/slashes/periods/apostrophes, "1,000", "2:30"
    r"|``|''|\S")                             # quotes, then any other symbol alone
_CLITIC = re.compile(r"(?<=\w)('(?:s|re|ve|ll|d|m)|n't)$")
_SPLIT_WORDS = {"cannot": ["can", "not"], "gonna": ["gon", "na"], "gotta": ["got", "ta"],
                "wanna": ["wan", "na"], "gimme": ["gim", "me"], "lemme": ["lem", "me"]}
_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"'})


def _ptb_tokens(text: str) -> list[str]:
    """PTBTokenizer's tokens of ``text`` (lower-cased), punctuation still included."""
    out: list[str] = []
    for tok in _PTB_TOKEN.findall(text.lower().translate(_QUOTES)):
        if tok in _BRACKETS:
            out.append(_BRACKETS[tok])
        elif tok == '"':  # PTB turns a double quote into `` or '': removed either way
            out.append("''")
        elif tok in _SPLIT_WORDS:
            out += _SPLIT_WORDS[tok]
        else:
            m = _CLITIC.search(tok)
            out += [tok[: m.start()], m.group(1)] if m else [tok]
    return out


def tokenize(text: str) -> list[str]:
    """The words of ``text`` as the COCO caption evaluation sees them: PTB tokens, lower-cased, with
    pycocoevalcap's ``PUNCTUATIONS`` removed (a Java-free reproduction of its PTBTokenizer step)."""
    return [t for t in _ptb_tokens(text) if t not in PUNCTUATIONS]


MAX_LEN_QUANTILE = 0.99  # the share of training captions a fitted maximum length keeps whole


def fitted_max_len(captions: Iterable[str], quantile: float = MAX_LEN_QUANTILE) -> int:
    """The longest id sequence (``<bos>`` and ``<eos>`` included) that keeps ``quantile`` of ``captions`` whole:
    their ``quantile`` length in words (:func:`tokenize`, nearest-rank: the smallest length at least that share is
    within) plus 2. 2 when there are none."""
    lengths = sorted(len(tokenize(c)) for c in captions)
    if not lengths:
        return 2
    rank = max(math.ceil(quantile * len(lengths)), 1)
    return lengths[rank - 1] + 2


def resolve_max_len(value: int | str | None, captions: Iterable[str]) -> int:
    """hyp ``cap_max_len``: an int as it is; ``auto`` (or absent / 0) fitted to the training ``captions`` by
    :func:`fitted_max_len` (read only in that case)."""
    if value in (None, "auto", 0):
        return fitted_max_len(captions)
    if isinstance(value, str) and not value.isdigit():
        raise ValueError(f"cap_max_len must be an int or 'auto', got {value!r}")
    return int(value)


def hyp_max_len(hyp: dict, default: int = 24) -> int:
    """hyp ``cap_max_len`` once resolved (an int; ``default`` when absent). ``auto`` needs the training captions:
    resolve it with :func:`resolve_max_len` first (the trainer does, before building the head and the losses)."""
    value = hyp.get("cap_max_len", default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"cap_max_len {value!r} is not resolved: set hyp['cap_max_len'] = "
                         "resolve_max_len(hyp.get('cap_max_len'), training_captions) first")
    return value


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
    def build(cls, captions: Iterable[str], min_count: int = 2, max_unk: float = 1.0) -> Vocabulary:
        """A vocabulary of every word seen at least ``m`` times; rarer words map to ``<unk>``. ``m`` is the
        largest count ``<= min_count`` at which ``<unk>`` stands for at most ``max_unk`` of the captions' words
        (1 when none does). So COCO's 400k captions keep the usual threshold 5 (about 10k words, a fraction of
        a percent ``<unk>``), while a few hundred captions keep every word instead of training the decoder to
        say ``<unk>`` for one word in ten.

        Words are ordered by descending count, then alphabetically, so the same captions always give
        the same ids (whatever order they come in).
        """
        counts = Counter(w for c in captions for w in tokenize(c))
        total, m = sum(counts.values()), max(int(min_count), 1)
        while m > 1 and sum(n for n in counts.values() if n < m) > max_unk * total:
            m -= 1
        words = sorted((w for w, n in counts.items() if n >= m and w not in SPECIALS),
                       key=lambda w: (-counts[w], w))
        vocab = cls(words)
        # how it was built, for the training log (not part of the saved word list)
        vocab.min_count, vocab.unk_share = m, sum(n for n in counts.values() if n < m) / max(total, 1)
        return vocab

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
        """Words of ``ids`` joined by spaces: stops at the first ``<eos>``, skips ``<pad>``/``<bos>``.

        A predicted ``<unk>`` is written as :data:`UNK_WORD`, not dropped: dropping it would hide a word the
        model failed to produce and inflate BLEU precision (the caption metrics score it as a wrong word).
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        words = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i == UNK or len(SPECIALS) <= i < len(self.itos):
                words.append(self.itos[i])
        return " ".join(words)

    def decode_batch(self, ids: torch.Tensor) -> list[str]:
        """:meth:`decode` of every row of a ``(B, L)`` tensor."""
        return [self.decode(row) for row in ids.tolist()]

    def to_list(self) -> list[str]:
        """Every entry in id order, specials included: a plain list a ``weights_only`` checkpoint can hold."""
        return list(self.itos)

    @classmethod
    def from_list(cls, words: Sequence[str]) -> Vocabulary:
        """Inverse of :meth:`to_list`."""
        words = list(words)
        if tuple(words[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"not a stored vocabulary: it must start with {SPECIALS}, got {words[:len(SPECIALS)]}")
        return cls(words[len(SPECIALS):])
