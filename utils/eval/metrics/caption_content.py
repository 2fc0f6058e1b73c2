"""What a caption says about the objects in the picture: does it name one with its colour, is its count right.

CIDEr-D rewards n-grams the references share, so a template every image's references contain ("two shapes on
water") can score well while saying nothing about the picture. This measure reads a caption the way its
references are written (``[count] [colour] noun``, e.g. "two red circles", "a blue star", "three shapes") and
checks it against the image's ground truth, made from the image's annotations (one ``(colour, name)`` per
instance; see :func:`utils.data.synthetic.scene_truths`), never from its references:

* **named**: the caption names at least one object of the image together with its colour ("a red circle" where a
  red circle is); a wrong colour or a shape that is not there does not count;
* **count**: the number of objects the caption states equals the image's. The stated number is the count of a
  generic noun ("three shapes", "there is one shape") when the caption has one, else the sum of the counts of
  the named objects ("two red circles and a star": 3); a caption that states none ("red and blue shapes") is
  wrong;
* **wrong**: the caption names a coloured object the image does not have (a hallucination; reported beside the
  two shares, lower is better);
* **exact**: the caption's coloured objects, each counted ("two red circles": two), are the image's objects, no
  more and no fewer: every kind bound to its colour (the strictest share; "a red square" for a red circle fails it).

Words are the caption metrics' tokens (:func:`utils.data.vocab.tokenize`); counts are spelled out, as in the
references, or digits.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from utils.data.vocab import tokenize

NUMBER_WORDS = {"a": 1, "an": 1, "one": 1, "single": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6,
                "seven": 7, "eight": 8, "nine": 9, "ten": 10}
GENERIC_NOUNS = ("shape", "object", "thing", "item")  # a count of these is a total ("three shapes")
COLOUR_SYNONYMS = {"grey": "gray"}


Objects = Sequence[tuple[str, str]]  # one image's objects, each ``(colour, category name)``, from its annotations


@dataclass(frozen=True)
class Phrase:
    """A noun phrase of a caption: ``count`` (None: not stated), ``colour`` (None: none), ``noun`` (a category
    name, or ``"*"`` for a generic noun such as "shapes")."""

    count: int | None
    colour: str | None
    noun: str


class ContentReader:
    """Finds the ``[count] [colour] noun`` phrases of captions, for the categories ``names`` and the colour words
    ``colours``; scores captions against an image's objects with :meth:`named`, :meth:`stated_count`, :meth:`wrong`.

    Args:
        names: category names ("circle", "traffic light"); a plural adds "s" or "es" to the last word.
        colours: colour words ("red", ...); "grey" is read as "gray".
    """

    def __init__(self, names: Sequence[str], colours: Sequence[str]):
        self.colours = {COLOUR_SYNONYMS.get(c, c) for c in colours}
        # longest names first, so "traffic light" wins over a category "light"
        self.nouns: list[tuple[tuple[str, ...], str]] = []
        for name in sorted(names, key=lambda n: -len(tokenize(n))):
            words = tuple(tokenize(name))
            for plural in ("", "s", "es"):
                self.nouns.append((words[:-1] + (words[-1] + plural,), name))
        for g in GENERIC_NOUNS:
            self.nouns += [((g,), "*"), ((g + "s",), "*")]

    def _colour(self, word: str) -> str | None:
        word = COLOUR_SYNONYMS.get(word, word)
        return word if word in self.colours else None

    def phrases(self, caption: str) -> list[Phrase]:
        """The caption's noun phrases, left to right."""
        words = tokenize(caption)
        out, i = [], 0
        while i < len(words):
            match = next(((n, name) for n, name in self.nouns if tuple(words[i:i + len(n)]) == n), None)
            if match is None:
                i += 1
                continue
            j = i - 1
            colour = self._colour(words[j]) if j >= 0 else None
            j -= colour is not None
            count = None
            if j >= 0 and (words[j] in NUMBER_WORDS or words[j].isdigit()):
                count = NUMBER_WORDS.get(words[j]) or int(words[j])
            out.append(Phrase(count, colour, match[1]))
            i += len(match[0])
        return out

    def named(self, caption: str, truth: Objects) -> bool:
        """Whether ``caption`` names an object of ``truth`` (an image's ``(colour, name)`` objects) with its colour."""
        present = set(truth)
        return any(p.noun != "*" and p.colour is not None and (p.colour, p.noun) in present
                   for p in self.phrases(caption))

    def wrong(self, caption: str, truth: Objects) -> bool:
        """Whether ``caption`` names a coloured object that ``truth`` does not have."""
        present = set(truth)
        return any(p.noun != "*" and p.colour is not None and (p.colour, p.noun) not in present
                   for p in self.phrases(caption))

    def exact(self, caption: str, truth: Objects) -> bool:
        """Whether ``caption``'s coloured objects, counted, are ``truth``'s objects exactly (a multiset)."""
        said: Counter[tuple[str, str]] = Counter()
        for p in self.phrases(caption):
            if p.noun != "*" and p.colour is not None:
                said[(p.colour, p.noun)] += p.count or 1
        return said == Counter(truth)

    def stated_count(self, caption: str) -> int | None:
        """The number of objects ``caption`` states (see the module docstring); None when it states none."""
        phrases = self.phrases(caption)
        totals = [p.count for p in phrases if p.noun == "*" and p.count is not None]
        if totals:
            return totals[0]
        named = [p for p in phrases if p.noun != "*"]
        if not named or any(p.count is None for p in named):
            return None
        return sum(p.count for p in named)

    def shares(self, captions: Mapping[int, str], truths: Mapping[int, Objects]) -> dict[str, float]:
        """Over the images of ``truths`` that have a caption: the share whose caption is :meth:`named`, whose
        :meth:`stated_count` is right, both, :meth:`wrong` and :meth:`exact` (``named``, ``count``, ``both``,
        ``wrong``, ``exact``, in 0..1) and ``images``, how many were read."""
        ids = [i for i in truths if i in captions]
        named = [self.named(captions[i], truths[i]) for i in ids]
        count = [self.stated_count(captions[i]) == len(truths[i]) for i in ids]
        wrong = [self.wrong(captions[i], truths[i]) for i in ids]
        exact = [self.exact(captions[i], truths[i]) for i in ids]
        n = max(len(ids), 1)
        return {"named": sum(named) / n, "count": sum(count) / n,
                "both": sum(a and b for a, b in zip(named, count)) / n, "wrong": sum(wrong) / n,
                "exact": sum(exact) / n, "images": float(len(ids))}
