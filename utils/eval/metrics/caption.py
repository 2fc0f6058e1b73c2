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
