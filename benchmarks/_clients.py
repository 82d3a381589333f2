"""Load generators: the pool, a bare ChatOllama and LiteLLM's Router.

Every client sends the same chat requests (one short user message, the model
below) and returns one result or exception per prompt, in order.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import Any

MODEL = "llama3.2"
# The model group name LiteLLM's Router routes on.
_LITELLM_GROUP = "bench"


class PoolClient:
    """`PooledChatOllama.abatch` with `max_concurrency`."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        strategy: str = "round_robin",
        max_in_flight_per_instance: int | None = None,
        health_check_interval: float = 30.0,
    ):
        from ollama_pool import PooledChatOllama

        self.name = f"ollama-pool {strategy}"
        if max_in_flight_per_instance is not None:
            self.name += f" max_in_flight={max_in_flight_per_instance}"
        self.llm = PooledChatOllama(
            base_urls=list(urls),
            model=MODEL,
            strategy=strategy,
            max_in_flight_per_instance=max_in_flight_per_instance,
            health_check_interval=health_check_interval,
        )

    async def run(self, prompts: Sequence[str], concurrency: int) -> list[Any]:
        return await self.llm.abatch(
            list(prompts),
            config={"max_concurrency": concurrency},
            return_exceptions=True,
        )

    def invoke(self, prompt: str) -> Any:
        return self.llm.invoke(prompt)

    async def ainvoke(self, prompt: str) -> Any:
        return await self.llm.ainvoke(prompt)

    async def aclose(self) -> None:
        await self.llm.aclose()


class BareClient:
    """A plain `langchain_ollama.ChatOllama` against one server."""

    def __init__(self, url: str):
        from langchain_ollama import ChatOllama

        self.name = "ChatOllama"
        self.llm = ChatOllama(base_url=url, model=MODEL)

    async def run(self, prompts: Sequence[str], concurrency: int) -> list[Any]:
        return await self.llm.abatch(
            list(prompts),
            config={"max_concurrency": concurrency},
            return_exceptions=True,
        )

    def invoke(self, prompt: str) -> Any:
        return self.llm.invoke(prompt)

    async def ainvoke(self, prompt: str) -> Any:
        return await self.llm.ainvoke(prompt)

    async def aclose(self) -> None:
        return None


def prepare_litellm() -> Any:
    """Import LiteLLM with its cost map read locally and its telemetry off."""
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    os.environ.setdefault("LITELLM_TELEMETRY", "False")
    os.environ.setdefault("LITELLM_LOG", "ERROR")
    import litellm

    litellm.telemetry = False
    litellm.suppress_debug_info = True
    litellm.success_callback = []
    litellm.failure_callback = []
    litellm.callbacks = []
    return litellm


class LiteLLMClient:
    """LiteLLM's `Router` with one `ollama_chat/` deployment per server.

    Concurrency is bounded by a semaphore, as `abatch` bounds it for the others.
    """

    def __init__(self, urls: Sequence[str], *, routing_strategy: str):
        prepare_litellm()
        from litellm import Router

        self.name = f"LiteLLM Router {routing_strategy}"
        model_list = [
            {
                "model_name": _LITELLM_GROUP,
                "litellm_params": {"model": f"ollama_chat/{MODEL}", "api_base": url},
            }
            for url in urls
        ]
        self.router = Router(model_list=model_list, routing_strategy=routing_strategy)

    async def run(self, prompts: Sequence[str], concurrency: int) -> list[Any]:
        semaphore = asyncio.Semaphore(concurrency)

        async def one(prompt: str) -> Any:
            async with semaphore:
                return await self.ainvoke(prompt)

        return await asyncio.gather(
            *(one(prompt) for prompt in prompts), return_exceptions=True
        )

    def invoke(self, prompt: str) -> Any:
        return self.router.completion(
            model=_LITELLM_GROUP, messages=[{"role": "user", "content": prompt}]
        )

    async def ainvoke(self, prompt: str) -> Any:
        return await self.router.acompletion(
            model=_LITELLM_GROUP, messages=[{"role": "user", "content": prompt}]
        )

    async def aclose(self) -> None:
        return None
