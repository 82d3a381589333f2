"""Spread the LLM calls of a RAG or batch pipeline over several Ollama servers.

`OllamaPool` is the framework-free pool; `PooledChatOllama` is the same pool as a
LangChain chat model and a drop-in replacement for `langchain_ollama.ChatOllama`.
`PooledOllamaEmbeddings` sends LangChain embedding requests through a pool, and
`PooledOllamaLLM` / `PooledOllamaEmbedding` are the LlamaIndex LLM and embedding
model on a pool (extra `llamaindex`).
"""

import importlib
from typing import TYPE_CHECKING, Any

from ollama_pool._config import InstanceConfig, PoolConfig, load_config, parse_config
from ollama_pool._errors import (
    AllAttemptsFailedError,
    ConfigError,
    IncompleteResponseError,
    NoInstanceError,
    OllamaPoolError,
    PoolClosedError,
    StreamInterruptedError,
)
from ollama_pool._instance import Instance
from ollama_pool._pool import OllamaPool
from ollama_pool._urls import normalize_model, redact_url

if TYPE_CHECKING:
    from ollama_pool._embeddings import PooledOllamaEmbeddings
    from ollama_pool._langchain import PooledChatOllama
    from ollama_pool._llama_index import PooledOllamaEmbedding, PooledOllamaLLM

# Names whose modules import LangChain or LlamaIndex, which take seconds to load.
# They load on first access, so that the stand-in server and the command line
# start fast.
_LAZY_NAMES = {
    "PooledChatOllama": "ollama_pool._langchain",
    "PooledOllamaEmbedding": "ollama_pool._llama_index",
    "PooledOllamaEmbeddings": "ollama_pool._embeddings",
    "PooledOllamaLLM": "ollama_pool._llama_index",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY_NAMES.get(name)
    if module_name is None:
        raise AttributeError(f"module 'ollama_pool' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


__all__ = [
    "AllAttemptsFailedError",
    "ConfigError",
    "IncompleteResponseError",
    "Instance",
    "InstanceConfig",
    "NoInstanceError",
    "OllamaPool",
    "OllamaPoolError",
    "PoolClosedError",
    "PoolConfig",
    "PooledChatOllama",
    "PooledOllamaEmbedding",
    "PooledOllamaEmbeddings",
    "PooledOllamaLLM",
    "StreamInterruptedError",
    "load_config",
    "normalize_model",
    "parse_config",
    "redact_url",
]
