"""Exact match and token F1 for short answers, as used for MuSiQue and SQuAD.

The answer normalisation follows the rules of the official SQuAD v1.1 evaluation
script: lowercase, remove ASCII punctuation, remove the articles "a", "an" and
"the", and collapse whitespace. Both scores take the maximum over all gold answers
(for MuSiQue, `answer` plus `answer_aliases`).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ScoreAccumulator",
    "exact_match",
    "f1",
    "gold_answers",
    "normalize_answer",
]

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Normalise an answer for comparison, in the SQuAD v1.1 order of steps."""
    text = text.lower()
    text = "".join(char for char in text if char not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _as_gold_list(golds: str | Iterable[str]) -> list[str]:
    gold_list = [golds] if isinstance(golds, str) else list(golds)
    if not gold_list:
        raise ValueError("golds is empty: pass at least one gold answer")
    return gold_list


def exact_match(prediction: str, golds: str | Iterable[str]) -> float:
    """Return 1.0 if the normalised prediction equals any normalised gold, else 0.0."""
    normalized = normalize_answer(prediction)
    matches = (normalized == normalize_answer(gold) for gold in _as_gold_list(golds))
    return 1.0 if any(matches) else 0.0


def _token_f1(prediction_tokens: list[str], gold_tokens: list[str]) -> float:
    # As in SQuAD v1.1, no common token gives 0.0, even when both sides are empty.
    common = Counter(prediction_tokens) & Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(prediction_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, golds: str | Iterable[str]) -> float:
    """Return the maximum token-level F1 of the prediction over the golds."""
    prediction_tokens = normalize_answer(prediction).split()
    return max(
        _token_f1(prediction_tokens, normalize_answer(gold).split())
        for gold in _as_gold_list(golds)
    )


def gold_answers(record: Mapping[str, Any]) -> list[str]:
    """Return a MuSiQue record's `answer` followed by its `answer_aliases`."""
    answers = [record["answer"], *record.get("answer_aliases", ())]
    return [answer for answer in answers if isinstance(answer, str)]


@dataclass
class ScoreAccumulator:
    """Running totals of exact match and F1 over scored answers."""

    count: int = 0
    exact_match_total: float = 0.0
    f1_total: float = 0.0

    def add(self, prediction: str, golds: str | Iterable[str]) -> tuple[float, float]:
        """Score one prediction, add it to the totals and return (EM, F1)."""
        gold_list = _as_gold_list(golds)
        em_score = exact_match(prediction, gold_list)
        f1_score = f1(prediction, gold_list)
        self.count += 1
        self.exact_match_total += em_score
        self.f1_total += f1_score
        return em_score, f1_score

    @property
    def exact_match_mean(self) -> float:
        """Mean exact match, 0.0 before the first answer."""
        return self.exact_match_total / self.count if self.count else 0.0

    @property
    def f1_mean(self) -> float:
        """Mean F1, 0.0 before the first answer."""
        return self.f1_total / self.count if self.count else 0.0

    def summary(self) -> dict[str, float | int]:
        """Return count, mean exact match and mean F1 as a JSON-ready dict."""
        return {
            "count": self.count,
            "exact_match": self.exact_match_mean,
            "f1": self.f1_mean,
        }
