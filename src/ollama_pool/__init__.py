"""Spread the LLM calls of a RAG or batch pipeline over several Ollama servers.

`OllamaPool` is the framework-free pool; `PooledChatOllama` is the same pool as a
LangChain chat model and a drop-in replacement for `langchain_ollama.ChatOllama`.
"""

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
from ollama_pool._langchain import PooledChatOllama
from ollama_pool._pool import OllamaPool
from ollama_pool._urls import normalize_model, redact_url

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
    "StreamInterruptedError",
    "load_config",
    "normalize_model",
    "parse_config",
    "redact_url",
]
