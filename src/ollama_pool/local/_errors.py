"""Errors of the local llama.cpp model and fleet."""

from __future__ import annotations

from ollama_pool._errors import OllamaPoolError

__all__ = ["LocalModelError"]


class LocalModelError(OllamaPoolError):
    """The local model could not be found, assembled, loaded or served."""
