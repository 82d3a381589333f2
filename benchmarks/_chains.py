"""Chains for the batch command in benchmarks (`--chain benchmarks._chains:NAME`)."""

from __future__ import annotations

from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.runnables import Runnable, RunnableLambda


def _question(record: dict[str, Any]) -> str:
    return str(record["question"])


def question_chain(llm: BaseChatModel) -> Runnable[Any, Any]:
    """Send the record's question as the only message and return the answer text.

    No retrieval happens, so the batch runner and the pool dominate the cost.
    """
    return RunnableLambda(_question) | llm | StrOutputParser()
