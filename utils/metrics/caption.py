"""Caption metrics (BLEU-1..4, ROUGE-L, CIDEr) with pycocoevalcap's scorers and a pure-Python tokenizer.

The standard COCO caption evaluation tokenizes with Stanford's PTBTokenizer, which needs Java. Here
:func:`utils.vocab.tokenize` (lower-case, punctuation removed, clitics split as PTB does) stands in, so
scores are close to, not bit-identical with, the official ones. CIDEr is the COCO ``Cider`` scorer; it is
corpus-relative (its IDF comes from the references of all scored images), so a single image scores 0.
"""
from __future__ import annotations

import contextlib
import io

from utils.vocab import tokenize

KEYS = ("bleu1", "bleu2", "bleu3", "bleu4", "rougel", "cider")


def _tok(text: str) -> str:
    return " ".join(tokenize(text))


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
    res = {i: [_tok(predictions[i])] for i in ids}
    gts = {i: [_tok(r) for r in references[i]] for i in ids}
    with contextlib.redirect_stdout(io.StringIO()):  # the BLEU scorer prints its counts
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update({f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)})
    out["rougel"] = float(Rouge().compute_score(gts, res)[0])
    if any(r for refs in gts.values() for r in refs):  # CIDEr's IDF is undefined with no reference words
        out["cider"] = float(Cider().compute_score(gts, res)[0])
    return out
