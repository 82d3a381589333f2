"""A retrieval-augmented chain that answers MuSiQue questions in a few words.

Each MuSiQue record brings its own 20 candidate paragraphs, so retrieval is a BM25
ranking of those paragraphs against the question. The chain then sends the top
paragraphs and the question to the chat model and reduces the reply to a short
answer that exact match and F1 can score.

Any function with the signature of `build_chain`, taking a LangChain chat model and
returning a `Runnable` from a record dict to an answer string, can replace this
chain in `ollama-pool batch --chain module:function`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable, RunnableLambda

__all__ = [
    "DEFAULT_MAX_ANSWER_CHARS",
    "DEFAULT_MAX_CONTEXT_CHARS",
    "DEFAULT_TOP_K",
    "build_chain",
    "build_prompt",
    "format_paragraphs",
    "iter_records",
    "rank_paragraphs",
    "reduce_answer",
    "tokenize",
]

DEFAULT_TOP_K = 4
# About 500 tokens of paragraphs for a 4-characters-per-token tokenizer (an
# estimate), which leaves most of a 2048-token context for the rest of the prompt
# and the reply, and keeps prompt evaluation short on small CPU models.
DEFAULT_MAX_CONTEXT_CHARS = 2000
# The longest gold answer in the bundled 200-question sample has 73 characters.
DEFAULT_MAX_ANSWER_CHARS = 100

SYSTEM_PROMPT = (
    "Answer the question using the numbered paragraphs. Reply with the answer "
    "only: a name, place, date, number or short phrase. Do not explain."
)
USER_PROMPT = "{context}\n\nQuestion: {question}\nAnswer:"

_WORD = re.compile(r"\w+")


def tokenize(text: str) -> list[str]:
    """Split text into lowercase word tokens (Unicode letters, digits and "_")."""
    return _WORD.findall(text.lower())


def _paragraph_document(paragraph: Mapping[str, Any]) -> list[str]:
    title = str(paragraph.get("title") or "")
    return tokenize(f"{title} {paragraph['paragraph_text']}")


def rank_paragraphs(
    question: str,
    paragraphs: Sequence[Mapping[str, Any]],
    top_k: int = DEFAULT_TOP_K,
) -> list[Mapping[str, Any]]:
    """Return the `top_k` paragraphs that best match the question, best first.

    The BM25 (Okapi) score of rank-bm25 is computed over the title and text of each
    paragraph. Ties keep the original order, so a question without scoring words
    gets the first `top_k` paragraphs.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k!r}")
    documents = [_paragraph_document(paragraph) for paragraph in paragraphs]
    if not any(documents):
        # rank-bm25 divides by the mean document length and by the vocabulary size.
        return list(paragraphs[:top_k])

    from rank_bm25 import BM25Okapi

    scores = BM25Okapi(documents).get_scores(tokenize(question))
    order = sorted(range(len(paragraphs)), key=lambda index: -float(scores[index]))
    return [paragraphs[index] for index in order[:top_k]]


def _truncate(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars].rsplit(" ", 1)[0] if " " in text[:max_chars] else ""
    return (cut or text[:max_chars]).rstrip() + " ..."


def format_paragraphs(
    paragraphs: Sequence[Mapping[str, Any]],
    max_chars: int = DEFAULT_MAX_CONTEXT_CHARS,
) -> str:
    """Number the paragraphs with their titles, sharing `max_chars` between texts.

    Each paragraph text gets an equal share of `max_chars` and is cut at a word
    boundary when it is longer. Titles are not counted in the budget.
    """
    if not paragraphs:
        return "(no paragraphs)"
    share = max(1, max_chars // len(paragraphs))
    blocks = []
    for number, paragraph in enumerate(paragraphs, start=1):
        title = str(paragraph.get("title") or "").strip()
        text = _truncate(str(paragraph["paragraph_text"]).strip(), share)
        heading = f"[{number}] {title}" if title else f"[{number}]"
        blocks.append(f"{heading}\n{text}")
    return "\n\n".join(blocks)


def build_prompt() -> ChatPromptTemplate:
    """Return the chat prompt with the `context` and `question` variables."""
    return ChatPromptTemplate.from_messages(
        [("system", SYSTEM_PROMPT), ("human", USER_PROMPT)]
    )


_THINK_BLOCK = re.compile(r"<think(?:ing)?>.*?</think(?:ing)?>", re.DOTALL | re.I)
_THINK_OPEN = re.compile(r"<think(?:ing)?>", re.I)
_THINK_CLOSE = re.compile(r"</think(?:ing)?>", re.I)
_ANSWER_PREFIX = re.compile(
    r"^(?:(?:final|short)\s+)?answer\s*(?:is\s*)?[:\-]\s*|^the\s+answer\s+is\s*:?\s*",
    re.I,
)
_SENTENCE_END = re.compile(r"[.!?](?=\s)")
# Words before a full stop that do not end a sentence ("St. Louis").
_ABBREVIATIONS = frozenset(
    {"st", "mt", "ft", "mr", "mrs", "ms", "dr", "jr", "sr", "no", "vs", "inc", "co"}
)
_QUOTES = "\"'`*_“”‘’«»"


def _remove_thinking(text: str) -> str:
    text = _THINK_BLOCK.sub(" ", text)
    closing = list(_THINK_CLOSE.finditer(text))
    if closing:
        # Templates that open the thinking block in the prompt leave only the close.
        text = text[closing[-1].end() :]
    opening = _THINK_OPEN.search(text)
    if opening:
        # An unclosed block means the reply stopped while thinking.
        text = text[: opening.start()]
    return text


def _first_sentence(line: str) -> str:
    for match in _SENTENCE_END.finditer(line):
        words = line[: match.start()].split()
        last_word = words[-1].lower() if words else ""
        is_initial = len(last_word) == 1 and last_word.isalpha()
        if last_word in _ABBREVIATIONS or is_initial or "." in last_word:
            continue
        return line[: match.start() + 1]
    return line


def _strip_answer_prefix(line: str) -> str:
    previous = None
    while previous != line:
        previous = line
        line = _ANSWER_PREFIX.sub("", line.strip(_QUOTES + " \t")).strip()
    return line


def _reduce_line(line: str, max_chars: int) -> str:
    answer = _first_sentence(_strip_answer_prefix(line))
    answer = answer.strip(_QUOTES + " \t").rstrip(".,;:").strip(_QUOTES + " \t")
    if len(answer) > max_chars:
        answer = _truncate(answer, max_chars).removesuffix(" ...")
    return answer


def reduce_answer(text: str, max_chars: int = DEFAULT_MAX_ANSWER_CHARS) -> str:
    """Reduce a model reply to a short answer, or "" when nothing is left.

    The steps: drop thinking blocks, then take the first line that still has
    text after dropping "Answer:" style prefixes, Markdown emphasis, every
    sentence after the first, quotes and a trailing full stop. The answer is
    cut to `max_chars` at a word boundary.
    """
    for line in _remove_thinking(text).splitlines():
        answer = _reduce_line(line, max_chars)
        if answer:
            return answer
    return ""


def _prompt_inputs(
    record: Mapping[str, Any], *, top_k: int, max_context_chars: int
) -> dict[str, str]:
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        record_id = record.get("id", "<no id>")
        raise ValueError(
            f"record {record_id!r} has no question: expected a non-empty string "
            f"in the 'question' field, got {question!r}"
        )
    paragraphs = record.get("paragraphs") or []
    selected = rank_paragraphs(question, paragraphs, top_k)
    return {
        "question": question.strip(),
        "context": format_paragraphs(selected, max_context_chars),
    }


def build_chain(
    llm: BaseChatModel,
    top_k: int = DEFAULT_TOP_K,
    max_context_chars: int = DEFAULT_MAX_CONTEXT_CHARS,
) -> Runnable[dict[str, Any], str]:
    """Build the MuSiQue chain: rank paragraphs, prompt `llm`, reduce the reply.

    The chain takes a record with `question` and `paragraphs` (each with `title`
    and `paragraph_text`; other fields are ignored) and returns the short answer.
    A record without paragraphs is answered from the question alone.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k!r}")
    prepare = RunnableLambda(
        partial(_prompt_inputs, top_k=top_k, max_context_chars=max_context_chars),
        name="rank_paragraphs",
    )
    reduce = RunnableLambda(reduce_answer, name="reduce_answer")
    chain = prepare | build_prompt() | llm | StrOutputParser() | reduce
    return chain.with_config(run_name="musique_rag")


def iter_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield the records of a MuSiQue JSON Lines file, skipping blank lines."""
    with Path(path).open(encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{path}:{line_number}: invalid JSON in a MuSiQue record: {exc}"
                ) from exc
