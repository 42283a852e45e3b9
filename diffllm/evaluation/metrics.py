"""Generation and data metrics: exact match, ROUGE-L / BLEU (torchmetrics), unigram cross-entropy."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence

from torchmetrics.text import BLEUScore, ROUGEScore

_WS = re.compile(r"\s+")


def normalise(text: str) -> str:
    """Whitespace-insensitive comparison form of an answer."""
    return _WS.sub(" ", text).strip()


def exact_match(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after whitespace normalisation."""
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions vs {len(refs)} references")
    if not preds:
        return float("nan")
    return sum(normalise(p) == normalise(r) for p, r in zip(preds, refs)) / len(preds)


def rouge_l(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (torchmetrics, no stemming)."""
    if not preds:
        return float("nan")
    return float(ROUGEScore(rouge_keys="rougeL")(list(preds), list(refs))["rougeL_fmeasure"])


def bleu(preds: Sequence[str], refs: Sequence[str], n_gram: int = 4) -> float:
    """Corpus BLEU with smoothing (short answers would otherwise score 0)."""
    if not preds:
        return float("nan")
    return float(BLEUScore(n_gram=n_gram, smooth=True)(list(preds), [[r] for r in refs]))


def unigram_cross_entropy(train_tokens: Iterable[int], eval_tokens: Iterable[int], vocab_size: int) -> float:
    """Cross-entropy (nats/token) of ``eval_tokens`` under the add-one unigram fit on ``train_tokens``.

    The floor a model that ignores context would reach: an NLL near it means nothing was learnt.
    """
    counts = Counter(train_tokens)
    total = sum(counts.values()) + vocab_size
    ev = list(eval_tokens)
    if not ev:
        return float("nan")
    return -sum(math.log((counts.get(t, 0) + 1) / total) for t in ev) / len(ev)
