"""Caption metrics (BLEU-1..4, ROUGE-L, CIDEr-D) with pycocoevalcap's scorers and a pure-Python tokenizer.

The standard COCO caption evaluation tokenizes with Stanford's PTBTokenizer, which needs Java, then drops
its ``PUNCTUATIONS``. :func:`utils.data.vocab.tokenize` reproduces both steps (it agrees token for token with the
Java tokenizer on ordinary captions), so the scores are the official ones for such captions.

``Cider`` in pycocoevalcap is CIDEr-D: tf-idf weighted 1..4-gram vectors, the candidate's weights clipped
to the reference's, a Gaussian length penalty (sigma 6), cosine averaged over n and over the references,
times 10. Its document frequencies come from the references of the scored images only, so the figure
depends on which images are scored (a single image scores 0).

A predicted ``<unk>`` (:data:`utils.data.vocab.UNK_WORD`, which :meth:`Vocabulary.decode` writes) is kept as a
word that matches no reference word: it costs precision and length like any wrong word.
"""
from __future__ import annotations

import contextlib
import io
import math

from utils.data.vocab import UNK_WORD, tokenize

KEYS = ("bleu1", "bleu2", "bleu3", "bleu4", "rougel", "cider")


def _tok(text: str) -> str:
    """A reference, as the scorers take it: tokens joined by spaces."""
    return " ".join(tokenize(text))


def _tok_prediction(text: str) -> str:
    """Like :func:`_tok`, with every ``<unk>`` kept as the token ``<unk>``. The tokenizer splits ``<`` and
    ``>`` off, so no tokenized reference contains that token: it always counts as a wrong word."""
    parts = [tokenize(part) for part in text.split(UNK_WORD)]
    return " ".join(parts[0] + [w for part in parts[1:] for w in (UNK_WORD, *part)])


def caption_scores(predictions: dict[int, str], references: dict[int, list[str]]) -> dict[str, float]:
    """Corpus scores of ``predictions`` (image id -> caption) against ``references`` (image id -> captions).

    Only predicted images that have at least one reference are scored (as COCO's eval scores the images in
    the results). Returns ``{"bleu1".."bleu4", "rougel", "cider"}`` as floats in the scorers' native scale
    (CIDEr is ~0..10); all zeros when nothing can be scored.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    out = {k: 0.0 for k in KEYS}
    ids = [i for i in predictions if references.get(i)]
    if not ids:
        return out
    res = {i: [_tok_prediction(predictions[i])] for i in ids}
    gts = {i: [_tok(r) for r in references[i]] for i in ids}
    with contextlib.redirect_stdout(io.StringIO()):  # the BLEU scorer prints its counts
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update({f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)})
    out["rougel"] = float(Rouge().compute_score(gts, res)[0])
    if any(r for refs in gts.values() for r in refs):  # CIDEr's IDF is undefined with no reference words
        out["cider"] = float(Cider().compute_score(gts, res)[0])
    return out


class CorpusCiderD:
    """CIDEr-D of single captions against their references, with document frequencies fixed by a corpus.

    pycocoevalcap's ``Cider`` takes its document frequencies from the images it scores, so one image (or
    a batch) cannot be scored on its own. Self-critical training rewards each sampled caption by CIDEr-D
    with the frequencies of the whole training set (as in Rennie et al.'s SCST and its public code); this
    is that scorer, built on pycocoevalcap's own n-gram counting, ``tf * (log N - log df)`` weights, clipping
    and length penalty. With the corpus equal to the scored images' references it gives ``Cider``'s scores
    (tested).

    Args:
        corpus: per image, its reference captions (raw text; tokenized as the caption metrics do).
    """

    def __init__(self, corpus: list[list[str]], n: int = 4, sigma: float = 6.0):
        from pycocoevalcap.cider.cider_scorer import cook_refs

        self.n, self.sigma = n, sigma
        self.df: dict[tuple, float] = {}
        images = 0
        for refs in corpus:
            if not refs:
                continue
            images += 1
            for gram in {g for ref in cook_refs([_tok(r) for r in refs], n) for g in ref}:
                self.df[gram] = self.df.get(gram, 0.0) + 1.0
        if not images:
            raise ValueError("CorpusCiderD needs at least one image with references")
        self.log_n = math.log(float(images))
        self._refs: dict[object, list] = {}

    def _vec(self, counts: dict) -> tuple[list[dict], list[float], int]:
        vec = [{} for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            w = float(tf) * (self.log_n - math.log(max(1.0, self.df.get(gram, 0.0))))
            vec[k][gram] = w
            norm[k] += w * w
            if k == 1:  # as pycocoevalcap: the length is the bigram count
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def _sim(self, hyp, ref) -> float:
        (vh, nh, lh), (vr, nr, lr) = hyp, ref
        penalty = math.exp(-((lh - lr) ** 2) / (2 * self.sigma ** 2))
        total = 0.0
        for k in range(self.n):
            val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
            if nh[k] and nr[k]:
                val /= nh[k] * nr[k]
            total += val * penalty
        return total / self.n

    def score(self, caption: str, references: list[str], key: object = None) -> float:
        """CIDEr-D (x10, as pycocoevalcap) of one caption; ``key`` caches the references' vectors (an image id)."""
        from pycocoevalcap.cider.cider_scorer import cook_refs, cook_test

        refs = self._refs.get(key) if key is not None else None
        if refs is None:
            refs = [self._vec(r) for r in cook_refs([_tok(r) for r in references], self.n)]
            if key is not None:
                self._refs[key] = refs
        if not refs:
            return 0.0
        hyp = self._vec(cook_test(_tok_prediction(caption), self.n))
        return 10.0 * sum(self._sim(hyp, r) for r in refs) / len(refs)
