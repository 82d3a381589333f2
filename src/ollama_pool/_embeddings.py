"""Pooled embeddings: `/api/embed` requests spread over the instances of a pool.

`PooledOllamaEmbeddings` is the LangChain face. The LlamaIndex face,
`PooledOllamaEmbedding`, lives in `_llama_index` and shares `EmbeddingRequests`
with it, so both send the same batches through the same balancer, health monitor
and retries. This module also contains the parts that every pooled face outside
`PooledChatOllama` needs: the pool arguments (`PoolSettings`) and the ollama-python
clients per instance (`InstanceClients`).
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import ollama
from langchain_core.embeddings import Embeddings
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    field_serializer,
    model_validator,
)
from typing_extensions import Self

from ollama_pool._config import load_config
from ollama_pool._errors import IncompleteResponseError
from ollama_pool._instance import Instance
from ollama_pool._pool import OllamaPool
from ollama_pool._urls import normalize_model, redact_url

# Arguments of OllamaPool that every pooled face accepts and passes on.
POOL_OPTIONS = (
    "strategy",
    "health_check_interval",
    "max_retries",
    "connect_timeout",
    "read_timeout",
    "max_in_flight_per_instance",
)


class InstanceClients:
    """ollama-python clients for the instances of one pool.

    Sync clients are shared by all threads, one per instance. Async clients are
    built per instance and per event loop, because an `AsyncClient` keeps its
    connections bound to the loop that opened them and fails with "Event loop is
    closed" when a later `asyncio.run()` reuses it.
    """

    def __init__(self, pool: OllamaPool, client_kwargs: Mapping[str, Any] | None):
        self._pool = pool
        self._client_kwargs = dict(client_kwargs or {})
        self._lock = threading.Lock()
        self._sync: dict[int, ollama.Client] = {}
        self._async: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, dict[int, ollama.AsyncClient]
        ] = weakref.WeakKeyDictionary()

    def _settings(self, instance: Instance) -> dict[str, Any]:
        # The read timeout bounds the gap between two chunks, as in the pool.
        timeout = httpx.Timeout(
            connect=self._pool.connect_timeout,
            read=self._pool.read_timeout,
            write=self._pool.read_timeout,
            pool=None,
        )
        # The address goes without user info and the credentials as an auth
        # object, so that httpx never logs the password with the request URL.
        return {
            "host": instance.plain_url,
            "auth": instance.auth,
            "timeout": timeout,
            **self._client_kwargs,
        }

    def sync_client(self, instance: Instance) -> ollama.Client:
        with self._lock:
            client = self._sync.get(instance.index)
            if client is None:
                client = ollama.Client(**self._settings(instance))
                self._sync[instance.index] = client
        return client

    def async_client(self, instance: Instance) -> ollama.AsyncClient:
        loop = asyncio.get_running_loop()
        with self._lock:
            clients = self._async.setdefault(loop, {})
            client = clients.get(instance.index)
            if client is None:
                client = ollama.AsyncClient(**self._settings(instance))
                clients[instance.index] = client
        return client

    def close(self) -> None:
        """Close the sync clients; async clients close with `aclose` on their loop."""
        with self._lock:
            clients, self._sync = list(self._sync.values()), {}
        for client in clients:
            client._client.close()

    async def aclose(self) -> None:
        """Close this event loop's async clients and the sync clients."""
        loop = asyncio.get_running_loop()
        with self._lock:
            clients = list(self._async.pop(loop, {}).values())
        for client in clients:
            await client._client.aclose()
        self.close()


class PoolSettings(BaseModel):
    """Pydantic fields that select the pool a face uses, or configure a new one.

    `pool` wins over `instances`, which wins over `base_urls`. The pool options
    apply only to a pool built here, because a shared pool keeps its own.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    pool: OllamaPool | None = Field(default=None, exclude=True)
    """An existing pool to share, with its balancer, health monitor and retries."""

    instances: list[dict[str, Any]] | None = Field(default=None, repr=False)
    """Instance dicts with `base_url` and `model` (and optionally `max_in_flight`)."""

    base_urls: list[str] | None = Field(default=None, repr=False)
    """Instance addresses."""

    strategy: str = "round_robin"
    """Load-balancing strategy of the pool built here (see `OllamaPool`)."""

    health_check_interval: float = 30.0
    """Seconds between health probes of each instance."""

    max_retries: int = 3
    """Retry rounds after the first attempt (see `OllamaPool`)."""

    connect_timeout: float = 5.0
    """Seconds to open a connection to an instance."""

    read_timeout: float = 300.0
    """Maximum seconds between two chunks of a response."""

    max_in_flight_per_instance: int | None = None
    """Requests sent to one instance at once; None for no limit."""

    client_kwargs: dict[str, Any] | None = Field(default=None, exclude=True, repr=False)
    """Extra arguments of every `httpx.Client` / `httpx.AsyncClient`, e.g. headers."""

    _owns_pool: bool = PrivateAttr(default=False)

    # Serialized settings (to_json, LlamaIndex event payloads) show addresses
    # with the password redacted; repr leaves them out.
    @field_serializer("base_urls")
    def _redact_base_urls(self, urls: list[str] | None) -> list[str] | None:
        return None if urls is None else [redact_url(url) for url in urls]

    @field_serializer("instances")
    def _redact_instances(
        self, instances: list[dict[str, Any]] | None
    ) -> list[dict[str, Any]] | None:
        if instances is None:
            return None
        return [
            {**item, "base_url": redact_url(str(item.get("base_url", "")))}
            for item in instances
        ]

    def _ensure_pool(self, model: str | None) -> OllamaPool:
        """Build the pool unless one was given; returns the pool in use."""
        if self.pool is not None:
            return self.pool
        if self.instances is not None:
            specs: list[Any] = list(self.instances)
        elif self.base_urls is not None:
            specs = list(self.base_urls)
        else:
            raise ValueError(
                f"{type(self).__name__}: missing instances; pass base_urls=[...], "
                f"instances=[{{'base_url': ..., 'model': ...}}] or pool=OllamaPool(...)"
            )
        options = {name: getattr(self, name) for name in POOL_OPTIONS}
        self.pool = OllamaPool(specs, model=model, **options)
        self._owns_pool = True
        return self.pool


def pool_from_config(path: str | Path) -> tuple[OllamaPool, dict[str, Any]]:
    """Build the pool of a config.yaml; returns it with the chat settings."""
    config = load_config(path)
    return OllamaPool(**config.pool_kwargs()), config.chat_kwargs()


class EmbeddingSettings(PoolSettings):
    """Pydantic fields of an /api/embed request, shared by both embedding faces."""

    truncate: bool | None = None
    """Whether the server cuts texts longer than the context; None: its default."""

    dimensions: int | None = None
    """Length of the returned vectors, for models that support it."""

    keep_alive: int | float | str | None = None
    """How long the server keeps the model loaded, e.g. "5m"; None: its default."""

    options: dict[str, Any] | None = None
    """Model options sent with each request, e.g. {"num_ctx": 2048}."""

    def _embed_arguments(self) -> dict[str, Any]:
        return {
            "truncate": self.truncate,
            "dimensions": self.dimensions,
            "keep_alive": self.keep_alive,
            "options": self.options,
        }


class EmbeddingRequests:
    """Sends texts to `/api/embed` in batches, one pool request per batch.

    Batches of one call run concurrently, up to `max_concurrency` at once: in
    threads for `embed`, as tasks for `aembed`. Each batch is retried on another
    instance like any pool request, and a reply with the wrong number of vectors
    counts as a failure of the instance.
    """

    def __init__(
        self,
        pool: OllamaPool,
        clients: InstanceClients,
        model: str,
        *,
        batch_size: int,
        max_concurrency: int | None,
        arguments: Mapping[str, Any],
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size!r}")
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError(
                f"max_concurrency must be at least 1 or None, got {max_concurrency!r}"
            )
        self.pool = pool
        self.clients = clients
        self.model = normalize_model(model)
        self.batch_size = batch_size
        # None: one batch in flight per instance of the pool.
        self.max_concurrency = max_concurrency or len(pool.instances)
        self.arguments = {k: v for k, v in arguments.items() if v is not None}

    def batches(self, texts: Sequence[str]) -> list[list[str]]:
        size = self.batch_size
        return [
            list(texts[start : start + size]) for start in range(0, len(texts), size)
        ]

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        batches = self.batches(texts)
        workers = min(self.max_concurrency, len(batches))
        if workers <= 1:
            results = [self._embed_batch(batch) for batch in batches]
        else:
            with ThreadPoolExecutor(workers, "ollama-pool-embed") as executor:
                results = list(executor.map(self._embed_batch, batches))
        return [vector for result in results for vector in result]

    async def aembed(self, texts: Sequence[str]) -> list[list[float]]:
        limit = asyncio.Semaphore(self.max_concurrency)

        async def embed_limited(batch: list[str]) -> list[list[float]]:
            async with limit:
                return await self._aembed_batch(batch)

        batches = self.batches(texts)
        results = await asyncio.gather(*(embed_limited(b) for b in batches))
        return [vector for result in results for vector in result]

    def _embed_batch(self, batch: list[str]) -> list[list[float]]:
        def send(instance: Instance) -> list[list[float]]:
            client = self.clients.sync_client(instance)
            response = client.embed(self.model, batch, **self.arguments)
            return _checked(response, len(batch), instance)

        return self.pool.call(send, model=self.model)

    async def _aembed_batch(self, batch: list[str]) -> list[list[float]]:
        async def send(instance: Instance) -> list[list[float]]:
            client = self.clients.async_client(instance)
            response = await client.embed(self.model, batch, **self.arguments)
            return _checked(response, len(batch), instance)

        return await self.pool.acall(send, model=self.model)


def _checked(
    response: ollama.EmbedResponse, expected: int, instance: Instance
) -> list[list[float]]:
    vectors = [list(vector) for vector in response.embeddings]
    if len(vectors) != expected:
        raise IncompleteResponseError(
            f"{instance.url} returned {len(vectors)} embeddings for {expected} texts"
        )
    return vectors


class PooledOllamaEmbeddings(EmbeddingSettings, Embeddings):
    """LangChain embeddings whose requests are spread over the instances of a pool.

    A replacement for `langchain_ollama.OllamaEmbeddings`. Share the pool of the
    chat model so that chat and embedding requests see one balancer and one
    health monitor:

        llm = PooledChatOllama.from_config("config.yaml")
        embeddings = PooledOllamaEmbeddings(pool=llm.pool, model="nomic-embed-text")

    Texts go out in batches of `batch_size`, one `/api/embed` request each, with
    up to `max_concurrency` batches of one call in flight.
    """

    model: str
    """Embedding model, for example "nomic-embed-text"; every instance must have it."""

    batch_size: int = Field(default=32, ge=1)
    """Texts per `/api/embed` request."""

    max_concurrency: int | None = Field(default=None, ge=1)
    """Batches of one call in flight at once; None for one per instance."""

    _requests: EmbeddingRequests = PrivateAttr()

    @model_validator(mode="after")
    def _set_requests(self) -> Self:
        pool = self._ensure_pool(self.model)
        self._requests = EmbeddingRequests(
            pool,
            InstanceClients(pool, self.client_kwargs),
            self.model,
            batch_size=self.batch_size,
            max_concurrency=self.max_concurrency,
            arguments=self._embed_arguments(),
        )
        return self

    @classmethod
    def from_config(
        cls, path: str | Path, *, model: str, **overrides: Any
    ) -> PooledOllamaEmbeddings:
        """Build the embeddings and a pool of their own from a config.yaml."""
        pool, _ = pool_from_config(path)
        embeddings = cls(pool=pool, model=model, **overrides)
        embeddings._owns_pool = True
        return embeddings

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self._requests.embed(texts)

    def embed_query(self, text: str) -> list[float]:
        return self._requests.embed([text])[0]

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        return await self._requests.aembed(texts)

    async def aembed_query(self, text: str) -> list[float]:
        return (await self._requests.aembed([text]))[0]

    def close(self) -> None:
        """Close the HTTP clients, and the pool if these embeddings built it."""
        self._requests.clients.close()
        if self._owns_pool:
            self._requests.pool.close()

    async def aclose(self) -> None:
        """Close this event loop's clients, then as `close`."""
        await self._requests.clients.aclose()
        if self._owns_pool:
            await self._requests.pool.aclose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
