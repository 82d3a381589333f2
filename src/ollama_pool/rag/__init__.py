"""The MuSiQue retrieval-augmented chain and its answer metrics (extra `rag`)."""

from ollama_pool.rag.metrics import (
    ScoreAccumulator,
    exact_match,
    f1,
    gold_answers,
    normalize_answer,
)
from ollama_pool.rag.musique import (
    build_chain,
    build_prompt,
    format_paragraphs,
    iter_records,
    rank_paragraphs,
    reduce_answer,
    tokenize,
)

__all__ = [
    "ScoreAccumulator",
    "build_chain",
    "build_prompt",
    "exact_match",
    "f1",
    "format_paragraphs",
    "gold_answers",
    "iter_records",
    "normalize_answer",
    "rank_paragraphs",
    "reduce_answer",
    "tokenize",
]
