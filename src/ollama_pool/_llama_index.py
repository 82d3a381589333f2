"""The pool as a LlamaIndex LLM and embedding model (extra `llamaindex`).

`PooledOllamaLLM` replaces `llama_index.llms.ollama.Ollama` and
`PooledOllamaEmbedding` replaces `llama_index.embeddings.ollama.OllamaEmbedding`.
Both send their requests through an `OllamaPool`, which they can share with a
`PooledChatOllama`: one class cannot be a LangChain chat model and a LlamaIndex
LLM at once, because the two pydantic bases define `metadata`, `stream`,
`astream` and `to_json` differently, so each framework gets its own face of one
pool.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.base.llms.generic_utils import (
    achat_to_completion_decorator,
    astream_chat_to_completion_decorator,
    chat_to_completion_decorator,
    stream_chat_to_completion_decorator,
)
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    ImageBlock,
    LLMMetadata,
    MessageRole,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
)
from llama_index.core.constants import (
    DEFAULT_CONTEXT_WINDOW,
    DEFAULT_EMBED_BATCH_SIZE,
    DEFAULT_NUM_OUTPUTS,
)
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection
from llama_index.core.prompts import BasePromptTemplate
from llama_index.core.types import Model, PydanticProgramMode
from pydantic import Field, PrivateAttr, model_validator
from typing_extensions import Self

from ollama_pool._embeddings import (
    EmbeddingRequests,
    EmbeddingSettings,
    InstanceClients,
    PoolSettings,
    pool_from_config,
)
from ollama_pool._errors import IncompleteResponseError
from ollama_pool._instance import Instance
from ollama_pool._pool import OllamaPool

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

    from ollama_pool._langchain import PooledChatOllama

logger = logging.getLogger(__name__)
dispatcher = get_dispatcher(__name__)

# ChatOllama fields that are Ollama model options under the same name. The
# LlamaIndex face keeps them in `additional_kwargs`, as the `Ollama` class of
# llama-index-llms-ollama does.
_CHAT_OPTIONS = (
    "mirostat",
    "mirostat_eta",
    "mirostat_tau",
    "num_gpu",
    "num_predict",
    "num_thread",
    "repeat_last_n",
    "repeat_penalty",
    "seed",
    "stop",
    "tfs_z",
    "top_k",
    "top_p",
)

Thinking = bool | Literal["low", "medium", "high"]


class PooledOllamaLLM(PoolSettings, FunctionCallingLLM):
    """A LlamaIndex LLM that spreads calls over the instances of an `OllamaPool`.

    A replacement for `llama_index.llms.ollama.Ollama` that takes its generation
    fields (`model`, `temperature`, `context_window`, `json_mode`, `thinking`,
    `keep_alive`, `additional_kwargs`, `is_function_calling_model`, `headers`);
    the pool's timeouts replace `request_timeout`. Build it from base URLs,
    instance dicts, an existing pool, a config.yaml, or a `PooledChatOllama`
    whose pool it then shares:

        llm = PooledOllamaLLM.from_config("config.yaml")
        chat = llm.as_langchain()          # same pool, same health monitor
        Settings.llm = llm

    Every request asks the server to stream its response. A failure before the
    first chunk is retried on another instance; one after chunks reached the
    caller of `stream_chat` raises `StreamInterruptedError`. The answering
    instance is in `response.additional_kwargs["instance"]` and
    `response.raw["instance"]`.
    """

    model: str | None = None
    """Model to request; None: each instance's own model."""

    temperature: float | None = None
    """Sampling temperature; None: the server's default."""

    context_window: int | None = None
    """Context length in tokens, sent as `num_ctx` to every instance.

    None sends no `num_ctx`, so each server uses its default, which depends on
    its version and memory; `metadata` then reports LlamaIndex's default."""

    json_mode: bool = False
    """Ask for JSON output (`format: "json"`)."""

    format: str | dict[str, Any] | None = None
    """"json" or a JSON schema the response must follow; wins over `json_mode`."""

    thinking: Thinking | None = None
    """Ask thinking models to think (`think`); "low"/"medium"/"high" for gpt-oss."""

    keep_alive: float | str | None = None
    """How long the server keeps the model loaded, e.g. "5m"; None: its default."""

    additional_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Further Ollama options, e.g. {"num_predict": 256, "top_k": 40, "seed": 1}."""

    is_function_calling_model: bool = True
    """Whether the model supports tool calling, as reported in `metadata`."""

    headers: dict[str, str] | None = Field(default=None, exclude=True, repr=False)
    """HTTP headers sent with every request."""

    _clients: InstanceClients = PrivateAttr()

    @model_validator(mode="after")
    def _set_clients(self) -> Self:
        pool = self._ensure_pool(self.model)
        self._clients = InstanceClients(pool, self._clients_settings())
        return self

    @classmethod
    def class_name(cls) -> str:
        return "PooledOllamaLLM"

    # -- Other faces of the pool ---------------------------------------------------

    @classmethod
    def from_config(cls, path: str | Path, **overrides: Any) -> PooledOllamaLLM:
        """Build the LLM and its pool from a config.yaml; `overrides` win."""
        pool, chat_settings = pool_from_config(path)
        llm = cls(pool=pool, **{**_from_chat_settings(chat_settings), **overrides})
        llm._owns_pool = True
        return llm

    @classmethod
    def from_langchain(
        cls, chat: PooledChatOllama, **overrides: Any
    ) -> PooledOllamaLLM:
        """Build the LlamaIndex face of `chat`'s pool with the same generation settings.

        The pool stays `chat`'s: closing this LLM closes only its own clients.
        """
        names = ("model", "temperature", "num_ctx", "reasoning", "format")
        settings = {name: getattr(chat, name) for name in (*names, *_CHAT_OPTIONS)}
        settings["keep_alive"] = chat.keep_alive
        settings = {**_from_chat_settings(settings), **overrides}
        return cls(pool=chat.pool, client_kwargs=chat.client_kwargs, **settings)

    def as_langchain(self, **overrides: Any) -> PooledChatOllama:
        """Return a `PooledChatOllama` on this LLM's pool with the same settings.

        The pool stays this LLM's: closing the chat model leaves it open.
        """
        from ollama_pool._langchain import PooledChatOllama

        options = dict(self.additional_kwargs)
        settings: dict[str, Any] = {
            "model": self.model,
            "temperature": options.pop("temperature", self.temperature),
            "num_ctx": options.pop("num_ctx", self.context_window),
            "reasoning": self.thinking,
            "format": self._format(),
            "keep_alive": self.keep_alive,
            "client_kwargs": self._clients_settings(),
        }
        for name in _CHAT_OPTIONS:
            if name in options:
                settings[name] = options.pop(name)
        if options:
            logger.warning(
                "Options %s have no ChatOllama field; the LangChain face does not "
                "send them",
                sorted(options),
            )
        settings = {k: v for k, v in settings.items() if v is not None}
        return PooledChatOllama(pool=self.pool, **{**settings, **overrides})

    def _clients_settings(self) -> dict[str, Any] | None:
        client_kwargs = dict(self.client_kwargs or {})
        if self.headers:
            client_kwargs["headers"] = {
                **client_kwargs.get("headers", {}),
                **self.headers,
            }
        return client_kwargs or None

    # -- Metadata --------------------------------------------------------------------

    @property
    def metadata(self) -> LLMMetadata:
        """Context window, output length and model name, from settings only."""
        num_ctx = self.additional_kwargs.get("num_ctx", self.context_window)
        num_predict = self.additional_kwargs.get("num_predict")
        # Ollama reads num_predict -1 as "until the model stops".
        if not isinstance(num_predict, int) or num_predict <= 0:
            num_predict = DEFAULT_NUM_OUTPUTS
        return LLMMetadata(
            context_window=num_ctx or DEFAULT_CONTEXT_WINDOW,
            num_output=num_predict,
            is_chat_model=True,
            is_function_calling_model=self.is_function_calling_model,
            model_name=self._model_name(),
        )

    def _model_name(self) -> str:
        if self.model:
            return self.model
        models = sorted({i.model for i in self._pool.instances if i.model})
        return ",".join(models) or "unknown"

    @property
    def _pool(self) -> OllamaPool:
        assert self.pool is not None  # Set by the validator.
        return self.pool

    # -- Chat ------------------------------------------------------------------------

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        call = self._chat_call(messages, kwargs)

        def send(instance: Instance) -> list[dict[str, Any]]:
            return _whole(list(self._open_stream(call, instance)), instance)

        return _Reply().fold(self._pool.call(send, model=call.model))

    @llm_chat_callback()
    async def achat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponse:
        call = self._chat_call(messages, kwargs)

        async def send(instance: Instance) -> list[dict[str, Any]]:
            chunks = [chunk async for chunk in self._aopen_stream(call, instance)]
            return _whole(chunks, instance)

        return _Reply().fold(await self._pool.acall(send, model=call.model))

    @llm_chat_callback()
    def stream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponseGen:
        call = self._chat_call(messages, kwargs)
        chunks = self._pool.stream(
            partial(self._open_stream, call), is_final=_is_final, model=call.model
        )
        return _responses(chunks)

    @llm_chat_callback()
    async def astream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponseAsyncGen:
        call = self._chat_call(messages, kwargs)
        chunks = self._pool.astream(
            partial(self._aopen_stream, call), is_final=_is_final, model=call.model
        )
        return _aresponses(chunks)

    def _open_stream(
        self, call: _ChatCall, instance: Instance
    ) -> Iterator[dict[str, Any]]:
        client = self._clients.sync_client(instance)
        for part in client.chat(**call.arguments(instance)):
            yield _chunk(part, instance)

    async def _aopen_stream(
        self, call: _ChatCall, instance: Instance
    ) -> AsyncIterator[dict[str, Any]]:
        client = self._clients.async_client(instance)
        async for part in await client.chat(**call.arguments(instance)):
            yield _chunk(part, instance)

    def _chat_call(
        self, messages: Sequence[ChatMessage], kwargs: Mapping[str, Any]
    ) -> _ChatCall:
        """Merge the per-call keyword arguments over the LLM's settings.

        Known per-call arguments: `tools`, `format`, `think`, `keep_alive`,
        `model` and `options` (merged over the LLM's options). Others are
        ignored, because LlamaIndex passes some that Ollama has no use for.
        """
        options = {
            "temperature": self.temperature,
            "num_ctx": self.context_window,
            **self.additional_kwargs,
            **(kwargs.get("options") or {}),
        }
        think = kwargs.get("think")
        return _ChatCall(
            model=kwargs.get("model") or self.model,
            messages=_to_ollama_messages(messages),
            tools=kwargs.get("tools"),
            format=kwargs.get("format") or self._format(),
            think=think if think is not None else self.thinking,
            keep_alive=kwargs.get("keep_alive", self.keep_alive),
            options={k: v for k, v in options.items() if v is not None},
        )

    def _format(self) -> str | dict[str, Any] | None:
        if self.format:
            return self.format
        return "json" if self.json_mode else None

    # -- Completion ------------------------------------------------------------------

    @llm_completion_callback()
    def complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponse:
        return chat_to_completion_decorator(self.chat)(prompt, **kwargs)

    @llm_completion_callback()
    async def acomplete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponse:
        return await achat_to_completion_decorator(self.achat)(prompt, **kwargs)

    @llm_completion_callback()
    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        return stream_chat_to_completion_decorator(self.stream_chat)(prompt, **kwargs)

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        stream = astream_chat_to_completion_decorator(self.astream_chat)
        return await stream(prompt, **kwargs)

    # -- Tools and structured output -------------------------------------------------

    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        # NOTE: Ollama's chat API has no tool_choice, so `tool_required` cannot
        # force a tool call; the model decides.
        messages = list(chat_history or [])
        if isinstance(user_msg, str):
            user_msg = ChatMessage(role=MessageRole.USER, content=user_msg)
        if user_msg is not None:
            messages.append(user_msg)
        specs = [tool.metadata.to_openai_tool(skip_length_check=True) for tool in tools]
        return {**kwargs, "messages": messages, "tools": specs or None}

    def _validate_chat_with_tools_response(
        self,
        response: ChatResponse,
        tools: Sequence[BaseTool],
        allow_parallel_tool_calls: bool = False,
        **kwargs: Any,
    ) -> ChatResponse:
        if not allow_parallel_tool_calls:
            calls = [b for b in response.message.blocks if isinstance(b, ToolCallBlock)]
            for extra in calls[1:]:
                response.message.blocks.remove(extra)
        return response

    def get_tool_calls_from_response(
        self,
        response: ChatResponse,
        error_on_no_tool_call: bool = True,
        **kwargs: Any,
    ) -> list[ToolSelection]:
        """Return the tool calls of a response, in the order the model made them.

        Ollama gives tool calls no id, so each call's id is its tool name.
        """
        calls = [b for b in response.message.blocks if isinstance(b, ToolCallBlock)]
        if not calls and error_on_no_tool_call:
            raise ValueError(
                "expected at least one tool call in the response, got none; pass "
                "error_on_no_tool_call=False to accept answers without tool calls"
            )
        return [
            ToolSelection(
                tool_id=call.tool_call_id or call.tool_name,
                tool_name=call.tool_name,
                tool_kwargs=_tool_arguments(call),
            )
            for call in calls
        ]

    @dispatcher.span
    def structured_predict(
        self,
        output_cls: type[Model],
        prompt: BasePromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Model:
        """Predict an `output_cls` object, constrained by Ollama's JSON-schema format.

        Other program modes than the default use LlamaIndex's own programs.
        """
        if self.pydantic_program_mode != PydanticProgramMode.DEFAULT:
            return super().structured_predict(
                output_cls, prompt, llm_kwargs, **prompt_args
            )
        kwargs = {**(llm_kwargs or {}), "format": output_cls.model_json_schema()}
        response = self.chat(prompt.format_messages(**prompt_args), **kwargs)
        return output_cls.model_validate_json(response.message.content or "")

    @dispatcher.span
    async def astructured_predict(
        self,
        output_cls: type[Model],
        prompt: BasePromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Model:
        """Async version of `structured_predict`."""
        if self.pydantic_program_mode != PydanticProgramMode.DEFAULT:
            return await super().astructured_predict(
                output_cls, prompt, llm_kwargs, **prompt_args
            )
        kwargs = {**(llm_kwargs or {}), "format": output_cls.model_json_schema()}
        response = await self.achat(prompt.format_messages(**prompt_args), **kwargs)
        return output_cls.model_validate_json(response.message.content or "")

    # -- Lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        """Close the HTTP clients, and the pool if this LLM built it."""
        self._clients.close()
        if self._owns_pool:
            self._pool.close()

    async def aclose(self) -> None:
        """Close this event loop's clients, then as `close`."""
        await self._clients.aclose()
        if self._owns_pool:
            await self._pool.aclose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _from_chat_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Map ChatOllama or config.yaml chat settings to `PooledOllamaLLM` fields."""
    settings = {k: v for k, v in settings.items() if v is not None}
    fields: dict[str, Any] = {}
    for name, field in (
        ("model", "model"),
        ("temperature", "temperature"),
        ("num_ctx", "context_window"),
        ("reasoning", "thinking"),
        ("keep_alive", "keep_alive"),
    ):
        if name in settings:
            fields[field] = settings[name]
    if settings.get("format"):
        fields["format"] = settings["format"]
    options = {name: settings[name] for name in _CHAT_OPTIONS if name in settings}
    if options:
        fields["additional_kwargs"] = options
    return fields


@dataclass(frozen=True)
class _ChatCall:
    """One chat request, before the pool picks the instance that gets it."""

    model: str | None
    messages: list[dict[str, Any]]
    tools: list[Any] | None
    format: str | dict[str, Any] | None
    think: Thinking | None
    keep_alive: float | str | None
    options: dict[str, Any]

    def arguments(self, instance: Instance) -> dict[str, Any]:
        """Return the keyword arguments of `ollama.Client.chat` for `instance`."""
        return {
            "model": self.model or instance.model or "",
            "messages": self.messages,
            "tools": self.tools,
            "stream": True,
            "format": self.format,
            "think": self.think,
            "options": self.options or None,
            "keep_alive": self.keep_alive,
        }


def _chunk(part: Any, instance: Instance) -> dict[str, Any]:
    """Turn one streamed ollama-python response into a dict tagged with the instance."""
    chunk: dict[str, Any] = part.model_dump(exclude_none=True)
    chunk["instance"] = instance.url
    return chunk


def _is_final(chunk: Mapping[str, Any]) -> bool:
    return chunk.get("done") is True


def _whole(chunks: list[dict[str, Any]], instance: Instance) -> list[dict[str, Any]]:
    if not chunks or not _is_final(chunks[-1]):
        raise IncompleteResponseError(
            f"{instance.url} ended the stream without its final chunk (done: true)"
        )
    return chunks


class _Reply:
    """Text, thinking and tool calls of one chat response so far."""

    def __init__(self) -> None:
        self.text = ""
        self.thinking = ""
        self.tool_calls: list[ToolCallBlock] = []

    def step(self, chunk: Mapping[str, Any]) -> ChatResponse:
        """Add a streamed chunk and return the response so far with its delta."""
        delta, thinking_delta = self._add(chunk)
        return self._response(chunk, delta, {"thinking_delta": thinking_delta or None})

    def fold(self, chunks: Sequence[Mapping[str, Any]]) -> ChatResponse:
        """Add every chunk of a whole response and return it."""
        for chunk in chunks:
            self._add(chunk)
        return self._response(chunks[-1], None, {})

    def _add(self, chunk: Mapping[str, Any]) -> tuple[str, str]:
        message = chunk.get("message") or {}
        delta = message.get("content") or ""
        thinking_delta = message.get("thinking") or ""
        self.text += delta
        self.thinking += thinking_delta
        for call in message.get("tool_calls") or []:
            function = call.get("function") or {}
            self.tool_calls.append(
                ToolCallBlock(
                    tool_name=function.get("name", ""),
                    tool_kwargs=function.get("arguments") or {},
                )
            )
        return delta, thinking_delta

    def _response(
        self, chunk: Mapping[str, Any], delta: str | None, extra: dict[str, Any]
    ) -> ChatResponse:
        blocks: list[Any] = []
        if self.thinking:
            blocks.append(ThinkingBlock(content=self.thinking))
        blocks.append(TextBlock(text=self.text))
        blocks.extend(self.tool_calls)
        raw = dict(chunk)
        usage = _usage(chunk)
        if usage:
            raw["usage"] = usage
        return ChatResponse(
            message=ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks),
            delta=delta,
            raw=raw,
            additional_kwargs={"instance": chunk["instance"], **extra},
        )


def _responses(chunks: Iterator[dict[str, Any]]) -> ChatResponseGen:
    # Closing the chunks when the caller stops early releases the pool's slot.
    # OllamaPool.stream and .astream return generators, typed as iterators.
    reply = _Reply()
    with contextlib.closing(chunks):  # type: ignore[type-var]
        for chunk in chunks:
            yield reply.step(chunk)


async def _aresponses(
    chunks: AsyncIterator[dict[str, Any]],
) -> ChatResponseAsyncGen:
    reply = _Reply()
    async with contextlib.aclosing(chunks):  # type: ignore[type-var]
        async for chunk in chunks:
            yield reply.step(chunk)


def _usage(chunk: Mapping[str, Any]) -> dict[str, int]:
    """Return token counts in LlamaIndex's `raw["usage"]` keys, from a final chunk."""
    if not _is_final(chunk):
        return {}
    # Ollama leaves out a zero prompt_eval_count, for example for a cached prompt.
    prompt = chunk.get("prompt_eval_count") or 0
    completion = chunk.get("eval_count") or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _to_ollama_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    return [_to_ollama_message(message) for message in messages]


def _to_ollama_message(message: ChatMessage) -> dict[str, Any]:
    result: dict[str, Any] = {"role": message.role.value, "content": ""}
    tool_calls = []
    for block in message.blocks:
        if isinstance(block, TextBlock):
            result["content"] += block.text
        elif isinstance(block, ImageBlock):
            image = block.resolve_image(as_base64=True).read().decode("ascii")
            result.setdefault("images", []).append(image)
        elif isinstance(block, ThinkingBlock):
            if block.content:
                result["thinking"] = block.content
        elif isinstance(block, ToolCallBlock):
            arguments = _tool_arguments(block)
            tool_calls.append(
                {"function": {"name": block.tool_name, "arguments": arguments}}
            )
        else:
            raise ValueError(
                f"cannot send a {type(block).__name__} to Ollama: chat messages "
                f"take text, image, thinking and tool call blocks"
            )
    # Older chat histories keep tool calls in additional_kwargs.
    tool_calls = tool_calls or list(message.additional_kwargs.get("tool_calls") or [])
    if tool_calls:
        result["tool_calls"] = tool_calls
    tool_name = message.additional_kwargs.get("tool_name")
    if message.role == MessageRole.TOOL and tool_name:
        result["tool_name"] = tool_name
    return result


def _tool_arguments(block: ToolCallBlock) -> dict[str, Any]:
    if isinstance(block.tool_kwargs, dict):
        return block.tool_kwargs
    try:
        arguments = json.loads(block.tool_kwargs or "{}")
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"arguments of the call to tool {block.tool_name!r} are not valid "
            f"JSON: {block.tool_kwargs!r}"
        ) from exc
    if not isinstance(arguments, dict):
        raise ValueError(
            f"arguments of the call to tool {block.tool_name!r} must be a JSON "
            f"object, got {block.tool_kwargs!r}"
        )
    return arguments


class PooledOllamaEmbedding(EmbeddingSettings, BaseEmbedding):
    """A LlamaIndex embedding model whose requests are spread over a pool.

    A replacement for `llama_index.embeddings.ollama.OllamaEmbedding`. Share the
    pool of the LLM, so that one balancer and one health monitor see all
    requests:

        Settings.llm = llm = PooledOllamaLLM.from_config("config.yaml")
        Settings.embed_model = PooledOllamaEmbedding(
            pool=llm.pool, model_name="nomic-embed-text"
        )

    Each batch of `embed_batch_size` texts is one `/api/embed` request to one
    instance. LlamaIndex sends the batches of a sync call one after another (each
    to the next instance the balancer picks) and those of an async call
    concurrently, at most `num_workers` at once when set.
    """

    model_name: str
    """Embedding model, for example "nomic-embed-text"; every instance must have it."""

    embed_batch_size: int = Field(default=DEFAULT_EMBED_BATCH_SIZE, gt=0, le=2048)
    """Texts per `/api/embed` request."""

    query_instruction: str | None = None
    """Text put before each query, e.g. "search_query: " for nomic-embed-text."""

    text_instruction: str | None = None
    """Text put before each document, e.g. "search_document: "."""

    _requests: EmbeddingRequests = PrivateAttr()

    @model_validator(mode="after")
    def _set_requests(self) -> Self:
        pool = self._ensure_pool(self.model_name)
        self._requests = EmbeddingRequests(
            pool,
            InstanceClients(pool, self.client_kwargs),
            self.model_name,
            batch_size=self.embed_batch_size,
            max_concurrency=None,
            arguments=self._embed_arguments(),
        )
        return self

    @classmethod
    def class_name(cls) -> str:
        return "PooledOllamaEmbedding"

    def _query(self, query: str) -> str:
        return f"{self.query_instruction or ''}{query}"

    def _texts(self, texts: Sequence[str]) -> list[str]:
        return [f"{self.text_instruction or ''}{text}" for text in texts]

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._requests.embed([self._query(query)])[0]

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return (await self._requests.aembed([self._query(query)]))[0]

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._requests.embed(self._texts([text]))[0]

    async def _aget_text_embedding(self, text: str) -> list[float]:
        return (await self._requests.aembed(self._texts([text])))[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self._requests.embed(self._texts(texts))

    async def _aget_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return await self._requests.aembed(self._texts(texts))

    def close(self) -> None:
        """Close the HTTP clients, and the pool if this model built it."""
        self._requests.clients.close()
        if self._owns_pool:
            self._requests.pool.close()

    async def aclose(self) -> None:
        """Close this event loop's clients, then as `close`."""
        await self._requests.clients.aclose()
        if self._owns_pool:
            await self._requests.pool.aclose()
