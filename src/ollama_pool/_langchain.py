"""`PooledChatOllama`: the pool as a LangChain chat model."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import httpx
from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_ollama import ChatOllama
from pydantic import (
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

# ChatOllama fields that configure generation and are copied to every backend.
# The address, the model and the HTTP clients are set per instance instead.
_PER_INSTANCE_FIELDS = {
    "base_url",
    "model",
    "client_kwargs",
    "async_client_kwargs",
    "sync_client_kwargs",
    "validate_model_on_init",
}
_BACKEND_FIELDS = tuple(
    sorted(
        set(ChatOllama.model_fields)
        - set(BaseChatModel.model_fields)
        - _PER_INSTANCE_FIELDS
    )
)
# Arguments of PooledChatOllama that configure the pool it builds.
_POOL_FIELDS = (
    "strategy",
    "health_check_interval",
    "max_retries",
    "connect_timeout",
    "read_timeout",
    "max_in_flight_per_instance",
)


def _is_final(chunk: ChatGenerationChunk) -> bool:
    return bool(chunk.generation_info and chunk.generation_info.get("done") is True)


class PooledChatOllama(ChatOllama):
    """A drop-in replacement for `ChatOllama` that spreads calls over instances.

    It takes every ChatOllama parameter and applies it to one ChatOllama backend
    per instance. Build it from base URLs, from instance dicts, around an existing
    `OllamaPool`, or with `PooledChatOllama.from_config("config.yaml")`:

        llm = PooledChatOllama(
            base_urls=["http://127.0.0.1:11434", "http://127.0.0.1:11435"],
            model="llama3.2",
        )
        answers = llm.batch(questions, config={"max_concurrency": 4})

    With no `model`, each request uses the chosen instance's own model. The
    answering instance is in `response_metadata["instance"]`.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    model: str | None = None  # type: ignore[assignment]
    """Model to request; None lets each instance use its own model."""

    base_urls: list[str] | None = None
    """Instance addresses, each serving `model`."""

    instances: list[dict[str, Any]] | None = None
    """Instance dicts with `base_url` and `model` (and optionally `max_in_flight`)."""

    pool: OllamaPool | None = Field(default=None, exclude=True)
    """An existing pool to share; its settings win over the pool arguments below."""

    strategy: str = "round_robin"
    """Load-balancing strategy of the pool built here (see `OllamaPool`)."""

    health_check_interval: float = 30.0
    """Seconds between health probes of each instance."""

    max_retries: int = 3
    """Retry rounds after the first attempt (see `OllamaPool`)."""

    connect_timeout: float = 5.0
    """Seconds to open a connection to an instance."""

    read_timeout: float = 300.0
    """Maximum seconds between two chunks of an answer."""

    max_in_flight_per_instance: int | None = None
    """Requests sent to one instance at once; None for no limit."""

    pool_options: dict[str, Any] = Field(default_factory=dict)
    """Other `OllamaPool` arguments, for example `{"eject_after_failures": 2}`."""

    _owns_pool: bool = PrivateAttr(default=False)
    _sync_backends: dict[int, ChatOllama] = PrivateAttr(default_factory=dict)
    _async_backends: weakref.WeakKeyDictionary[
        asyncio.AbstractEventLoop, dict[int, ChatOllama]
    ] = PrivateAttr(default_factory=weakref.WeakKeyDictionary)

    @field_serializer("base_url", "base_urls", "instances")
    def _redact_secrets(self, value: Any) -> Any:
        return _redacted(value)

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            if name in ("base_url", "base_urls", "instances"):
                value = _redacted(value)
            yield name, value

    @model_validator(mode="after")
    def _set_clients(self) -> Self:
        """Build the pool; the backends are built on first use."""
        if self.pool is None:
            self.pool = OllamaPool(
                self._instance_specs(),
                model=self.model,
                **{name: getattr(self, name) for name in _POOL_FIELDS},
                **self.pool_options,
            )
            self._owns_pool = True
        if self.validate_model_on_init:
            self._validate_model()
        return self

    def _validate_model(self) -> None:
        """Raise ValueError unless some instance lists the model in /api/tags.

        Like ChatOllama's option of the same name, this sends requests at
        construction; instances that do not answer are skipped.
        """
        wanted = normalize_model(self.model) if self.model else None
        found: list[str] = []
        for instance in self._pool.instances:
            model = wanted or instance.model
            try:
                response = httpx.get(
                    f"{instance.plain_url}/api/tags",
                    auth=instance.auth,
                    timeout=self._pool.connect_timeout,
                )
                names = {
                    normalize_model(entry["model"])
                    for entry in response.json().get("models", [])
                    if isinstance(entry.get("model"), str)
                }
            except (httpx.HTTPError, ValueError, AttributeError) as exc:
                found.append(f"{instance.url}: not checked ({type(exc).__name__})")
                continue
            if model in names:
                return
            found.append(f"{instance.url}: lacks {model}")
        msg = (
            f"model {self.model!r} not found on any instance ({'; '.join(found)}); "
            f"pull it, for example with `ollama-pool pull {self.model}`"
        )
        raise ValueError(msg)

    def _instance_specs(self) -> list[Any]:
        if self.instances is not None:
            return list(self.instances)
        if self.base_urls is not None:
            return list(self.base_urls)
        if self.base_url is not None:
            return [self.base_url]
        msg = (
            "PooledChatOllama needs instances: pass base_urls=[...], "
            "instances=[{'base_url': ..., 'model': ...}], pool=OllamaPool(...) "
            "or use PooledChatOllama.from_config('config.yaml')"
        )
        raise ValueError(msg)

    @classmethod
    def from_config(cls, path: str | Path, **overrides: Any) -> PooledChatOllama:
        """Build the model and its pool from a config.yaml; `overrides` win."""
        config = load_config(path)
        pool = OllamaPool(**config.pool_kwargs())
        llm = cls(pool=pool, **{**config.chat_kwargs(), **overrides})
        llm._owns_pool = True
        return llm

    @property
    def _pool(self) -> OllamaPool:
        return cast(OllamaPool, self.pool)

    @property
    def _llm_type(self) -> str:
        return "pooled-chat-ollama"

    def _get_ls_params(
        self, stop: list[str] | None = None, **kwargs: Any
    ) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        # A per-call model wins. Without any model, each instance serves its own,
        # so the trace names the models of the pool.
        models = sorted({i.model for i in self._pool.instances if i.model})
        params["ls_model_name"] = (
            self._request_model(kwargs) or ",".join(models) or "unknown"
        )
        return params

    # -- Backends --------------------------------------------------------------

    def _backend_settings(self, instance: Instance) -> dict[str, Any]:
        settings = {name: getattr(self, name) for name in _BACKEND_FIELDS}
        timeout = httpx.Timeout(
            connect=self._pool.connect_timeout,
            read=self._pool.read_timeout,
            write=self._pool.read_timeout,
            pool=None,
        )
        client_kwargs = {"timeout": timeout, **(self.client_kwargs or {})}
        if "headers" in client_kwargs:
            # ChatOllama adds the Authorization header of its base_url to this
            # dict in place: a shared one would carry one instance's credentials
            # to the others and into this model's repr.
            client_kwargs["headers"] = dict(client_kwargs["headers"] or {})
        settings["client_kwargs"] = client_kwargs
        settings["sync_client_kwargs"] = self.sync_client_kwargs
        settings["async_client_kwargs"] = self.async_client_kwargs
        settings["base_url"] = instance.base_url
        settings["model"] = self.model or instance.model
        return settings

    def _sync_backend(self, instance: Instance) -> ChatOllama:
        backend = self._sync_backends.get(instance.index)
        if backend is None:
            backend = ChatOllama(**self._backend_settings(instance))
            self._sync_backends[instance.index] = backend
        return backend

    def _async_backend(self, instance: Instance) -> ChatOllama:
        # ChatOllama's AsyncClient keeps connections bound to the event loop that
        # opened them, so each loop gets its own backends. Reusing them from a later
        # asyncio.run() would fail with "Event loop is closed".
        loop = asyncio.get_running_loop()
        backends = self._async_backends.setdefault(loop, {})
        backend = backends.get(instance.index)
        if backend is None:
            backend = ChatOllama(**self._backend_settings(instance))
            backends[instance.index] = backend
        return backend

    def _request_model(self, kwargs: Mapping[str, Any]) -> str | None:
        return kwargs.get("model") or self.model

    # -- Generation ------------------------------------------------------------

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        def send(instance: Instance) -> list[ChatGenerationChunk]:
            backend = self._sync_backend(instance)
            chunks = list(backend._iterate_over_stream(messages, stop, **kwargs))
            return _checked(chunks, instance)

        chunks = self._pool.call(send, model=self._request_model(kwargs))
        if run_manager:
            for chunk in chunks:
                run_manager.on_llm_new_token(
                    chunk.text, chunk=chunk, verbose=self.verbose
                )
        return _to_result(chunks)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        async def send(instance: Instance) -> list[ChatGenerationChunk]:
            backend = self._async_backend(instance)
            stream = backend._aiterate_over_stream(messages, stop, **kwargs)
            chunks = [chunk async for chunk in stream]
            return _checked(chunks, instance)

        chunks = await self._pool.acall(send, model=self._request_model(kwargs))
        if run_manager:
            for chunk in chunks:
                await run_manager.on_llm_new_token(
                    chunk.text, chunk=chunk, verbose=self.verbose
                )
        return _to_result(chunks)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        def open_stream(instance: Instance) -> Iterator[ChatGenerationChunk]:
            backend = self._sync_backend(instance)
            for chunk in backend._iterate_over_stream(messages, stop, **kwargs):
                yield _tagged(chunk, instance)

        # BaseChatModel reports each chunk to the callbacks itself, so this method
        # does not, unlike ChatOllama._stream, which reports every token twice.
        yield from self._pool.stream(
            open_stream, is_final=_is_final, model=self._request_model(kwargs)
        )

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        async def open_stream(instance: Instance) -> AsyncIterator[ChatGenerationChunk]:
            backend = self._async_backend(instance)
            async for chunk in backend._aiterate_over_stream(messages, stop, **kwargs):
                yield _tagged(chunk, instance)

        chunks = self._pool.astream(
            open_stream, is_final=_is_final, model=self._request_model(kwargs)
        )
        async for chunk in chunks:
            yield chunk

    def as_llama_index(self, **kwargs: Any) -> Any:
        """Return a LlamaIndex `PooledOllamaLLM` that shares this model's pool."""
        from ollama_pool._llama_index import PooledOllamaLLM

        return PooledOllamaLLM.from_langchain(self, **kwargs)

    # -- Lifecycle -------------------------------------------------------------

    def close(self) -> None:
        """Close the backends' HTTP clients, and the pool if this model built it.

        Call it once no other thread or task uses the model any more: a request
        still running on a closed client fails.
        """
        for backend in self._sync_backends.values():
            _close_sync_client(backend)
        self._sync_backends.clear()
        if self._owns_pool:
            self._pool.close()

    async def aclose(self) -> None:
        """Close this event loop's clients, then as `close`."""
        loop = asyncio.get_running_loop()
        for backend in self._async_backends.pop(loop, {}).values():
            await _close_async_client(backend)
        await asyncio.to_thread(self.close)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _redacted(value: Any) -> Any:
    """Return a URL, a list of URLs or of instance dicts with passwords masked."""
    if isinstance(value, str):
        return redact_url(value)
    if isinstance(value, list):
        return [_redacted(item) for item in value]
    if isinstance(value, dict):
        return {
            key: redact_url(item)
            if key == "base_url" and isinstance(item, str)
            else item
            for key, item in value.items()
        }
    return value


def _tagged(chunk: ChatGenerationChunk, instance: Instance) -> ChatGenerationChunk:
    if _is_final(chunk):
        chunk.generation_info = {
            **(chunk.generation_info or {}),
            "instance": instance.url,
        }
    return chunk


def _checked(
    chunks: Sequence[ChatGenerationChunk], instance: Instance
) -> list[ChatGenerationChunk]:
    if not chunks or not _is_final(chunks[-1]):
        msg = f"{instance.url} ended the stream without its final chunk (done: true)"
        raise IncompleteResponseError(msg)
    return [_tagged(chunk, instance) for chunk in chunks]


def _to_result(chunks: Sequence[ChatGenerationChunk]) -> ChatResult:
    # One merge of the whole list: adding chunks one by one, as ChatOllama does,
    # copies the growing text each time and costs quadratic time in the chunks.
    final = chunks[0] + list(chunks[1:]) if len(chunks) > 1 else chunks[0]
    message = cast(AIMessageChunk, final.message)
    generation = ChatGeneration(
        message=AIMessage(
            content=final.text,
            usage_metadata=message.usage_metadata,
            tool_calls=message.tool_calls,
            additional_kwargs=message.additional_kwargs,
        ),
        generation_info=final.generation_info,
    )
    return ChatResult(generations=[generation])


def _close_sync_client(backend: ChatOllama) -> None:
    client = getattr(backend, "_client", None)
    http = getattr(client, "_client", None)
    if isinstance(http, httpx.Client):
        http.close()


async def _close_async_client(backend: ChatOllama) -> None:
    client = getattr(backend, "_async_client", None)
    http = getattr(client, "_client", None)
    if isinstance(http, httpx.AsyncClient):
        await http.aclose()
