"""Loading the chain of a batch run and reading its answers."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage
from langchain_core.runnables import Runnable

from ollama_pool.batch._constants import DEFAULT_CHAIN
from ollama_pool.batch._errors import ChainLoadError, ChainOutputError

ChainFactory = Callable[[BaseChatModel], Runnable[Any, Any]]


def load_chain_factory(spec: str) -> ChainFactory:
    """Import the function named by `spec` ("package.module:function").

    The current directory is put on `sys.path` first, as `python -m` does, so a
    module next to the input file can be named without installing it.
    """
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ChainLoadError(
            f"invalid chain {spec!r}: expected 'module:function', for example "
            f"{DEFAULT_CHAIN!r}"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ChainLoadError(
            f"cannot import module {module_name!r} of chain {spec!r}: {exc}"
        ) from exc

    factory: object = module
    for name in attribute.split("."):
        try:
            factory = getattr(factory, name)
        except AttributeError as exc:
            raise ChainLoadError(
                f"module {module_name!r} has no attribute {attribute!r} "
                f"(chain {spec!r})"
            ) from exc
    if not callable(factory):
        raise ChainLoadError(f"chain {spec!r} is not a function: {factory!r}")
    return factory  # type: ignore[return-value]


def build_chain(factory: ChainFactory, llm: BaseChatModel) -> Runnable[Any, Any]:
    """Call the chain factory with the chat model and check that it built a Runnable."""
    chain = factory(llm)
    if not isinstance(chain, Runnable):
        raise ChainLoadError(
            f"the chain function returned {type(chain).__name__}, expected a "
            f"LangChain Runnable"
        )
    return chain


def answer_text(output: object) -> str:
    """Return the answer string of a chain output.

    Accepted outputs: a string, a message (its text), or a mapping with a
    string `answer`.
    """
    if isinstance(output, str):
        return output
    if isinstance(output, BaseMessage):
        return output.text
    if isinstance(output, Mapping) and isinstance(output.get("answer"), str):
        return output["answer"]
    raise ChainOutputError(
        f"the chain returned {type(output).__name__}, expected a string, a "
        f"message or a dict with a string 'answer'"
    )
