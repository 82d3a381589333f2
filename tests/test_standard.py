"""LangChain's shared unit-test suite for chat models, run on PooledChatOllama."""

from __future__ import annotations

from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_tests.unit_tests import ChatModelUnitTests

from ollama_pool import PooledChatOllama


class TestPooledChatOllamaStandard(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return PooledChatOllama

    @property
    def chat_model_params(self) -> dict[str, Any]:
        # The suite builds models without sending requests, so the port is never
        # contacted.
        return {"model": "llama3.2", "base_urls": ["http://127.0.0.1:9"]}

    @property
    def has_tool_choice(self) -> bool:
        return False

    @property
    def supports_image_inputs(self) -> bool:
        return True
