"""Word error rate: how far one text is from another, in words.

The hub compares what a shadow provider said with what the primary said (the agreement of
two model versions), the benchmarks and tests compare a transcript with its reference. One
definition serves both: Levenshtein distance over lower-cased words without punctuation,
divided by the number of reference words (so it can exceed 1 when the hypothesis is longer).
"""

from __future__ import annotations

import re

_PUNCTUATION = re.compile(r"[^\w\s']")


def words(text: str) -> list[str]:
    """The words WER counts: lower case, punctuation dropped (apostrophes kept: "don't" is one word)."""
    return _PUNCTUATION.sub(" ", text.lower()).split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Edits (substitutions, insertions, deletions) to turn ``reference`` into ``hypothesis``, per reference
    word; an empty reference counts as one word, so two empty texts agree (0.0) and text against none is 1.0+."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / max(1, len(ref))
