"""Load generators: the pool, a bare ChatOllama and LiteLLM's Router.

Every client sends the same chat requests (one short user message, the model
below) and returns one result or exception per prompt, in order.
"""

from __future__ import annotations

import asyncio
import json
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
    """A plain `langchain_ollama.ChatOllama` against one server.

    With `pool_timeouts`, its HTTP client gets the timeouts that PooledChatOllama
    gives each backend by default (connect 5 s, read and write 300 s), which
    separates the cost of those timeouts from the cost of the pool.
    """

    def __init__(self, url: str, *, pool_timeouts: bool = False):
        import httpx
        from langchain_ollama import ChatOllama

        self.name = "ChatOllama"
        client_kwargs = {}
        if pool_timeouts:
            self.name += " with the pool's timeouts"
            timeout = httpx.Timeout(connect=5.0, read=300.0, write=300.0, pool=None)
            client_kwargs["timeout"] = timeout
        self.llm = ChatOllama(base_url=url, model=MODEL, client_kwargs=client_kwargs)

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


class DirectClient:
    """A reference without LangChain or the pool: raw httpx streaming requests.

    Each request goes to the instance with the fewest requests in flight (ties in
    turn), which keeps every instance busy when they are all alike. Its results
    show what the fleet and the machine allow, apart from any client library.
    """

    def __init__(self, urls: Sequence[str]):
        import httpx

        self.name = "direct httpx (reference)"
        self._clients = [httpx.AsyncClient(base_url=url, timeout=60) for url in urls]
        self._in_flight = [0] * len(urls)
        self._turn = 0

    def _pick(self) -> int:
        count = len(self._clients)
        self._turn = (self._turn + 1) % count
        order = [(self._turn + offset) % count for offset in range(count)]
        return min(order, key=lambda index: self._in_flight[index])

    async def ainvoke(self, prompt: str) -> str:
        index = self._pick()
        self._in_flight[index] += 1
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": prompt}],
            "stream": True,
        }
        try:
            request = self._clients[index].stream("POST", "/api/chat", json=body)
            async with request as response:
                response.raise_for_status()
                pieces = []
                async for line in response.aiter_lines():
                    if line:
                        pieces.append(json.loads(line)["message"]["content"])
                return "".join(pieces)
        finally:
            self._in_flight[index] -= 1

    async def run(self, prompts: Sequence[str], concurrency: int) -> list[Any]:
        semaphore = asyncio.Semaphore(concurrency)

        async def one(prompt: str) -> Any:
            async with semaphore:
                return await self.ainvoke(prompt)

        return await asyncio.gather(
            *(one(prompt) for prompt in prompts), return_exceptions=True
        )

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()


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
