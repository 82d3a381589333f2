"""Scripted behaviour of a stand-in server and the responder interface."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

DEFAULT_MODEL = "llama3.2:latest"
DEFAULT_VERSION = "0.12.3"
RUNNER_EOF_ERROR = "an error was encountered while running the model: unexpected EOF"
GENERATION_PATHS = ("/api/chat", "/api/generate", "/api/embed", "/api/embeddings")


@dataclass(frozen=True)
class ChatRequest:
    """A chat or generate request as the stand-in received it.

    A generate request is turned into messages: its `system` text (if any) becomes
    a system message and its `prompt` a user message.
    """

    model: str
    messages: list[dict[str, Any]]
    options: dict[str, Any] = field(default_factory=dict)
    format: str | dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    think: bool | str | None = None


class TokenCounts(NamedTuple):
    """Token counts a responder returns as its generator's return value.

    The stand-in reports them as `prompt_eval_count` and `eval_count`.
    `done_reason` is "length" when the responder stopped at `num_predict`.
    """

    prompt_tokens: int
    completion_tokens: int
    done_reason: str = "stop"


class Responder(Protocol):
    """A blocking text generator that replaces the default reply.

    The stand-in calls it in a worker thread and streams each yielded piece as one
    chunk. A generator may return `TokenCounts`; otherwise the stand-in counts
    words.
    """

    def __call__(self, request: ChatRequest) -> Iterator[str]: ...


ReplyFunction = Callable[[list[dict[str, Any]]], str]


def _default_models() -> list[str]:
    return [DEFAULT_MODEL]


@dataclass
class Behavior:
    """Script of how a stand-in server responds; fields can change while it runs.

    Handlers read the fields once per request, so a change applies to the
    requests that arrive after it.
    """

    # Models the server has; "llama3.2" means "llama3.2:latest". Models pulled
    # into the models directory are added to these.
    models: list[str] = field(default_factory=_default_models)
    # None: "echo: " plus the last user message; a str; or a function of the
    # messages that returns the reply.
    reply: str | ReplyFunction | None = None
    # Text streamed as `thinking` before the reply when the request sets `think`;
    # with None, such requests get no thinking (a real server rejects them).
    thinking: str | None = None
    # Tool calls ({"name", "arguments"}) returned when the request has tools and
    # its last message is not a tool result.
    tool_calls: Sequence[Mapping[str, Any]] | None = None
    # Blocking generator run in a worker thread in place of `reply`.
    responder: Responder | None = None
    # Seconds before the first chunk.
    first_token_delay: float = 0.0
    # Seconds between two chunks.
    token_delay: float = 0.0
    # Seconds to load a model that is not loaded yet (reported as load_duration).
    load_delay: float = 0.0
    # Requests that generate at once, like OLLAMA_NUM_PARALLEL; None is unlimited
    # and 0 keeps every request in the queue until the value is raised.
    parallel: int | None = None
    # Requests that may wait for a free slot before new ones get 503; None is
    # unlimited, like a very large OLLAMA_MAX_QUEUE.
    max_queue: int | None = None
    # HTTP status of the scripted failure; None turns scripted failures off.
    fail_status: int | None = None
    # Error text of the scripted failure, sent as {"error": fail_message}.
    fail_message: str = "timed out waiting for llama runner to start"
    # Only the first N requests on `fail_paths` fail; None fails all of them.
    fail_first: int | None = None
    # Seconds before the scripted failure is sent.
    fail_delay: float = 0.0
    # Paths the scripted failure applies to.
    fail_paths: Collection[str] = GENERATION_PATHS
    # Chat and generate requests get the scripted failure only when this returns
    # True for them (it may look at the prompt or draw a random number); None
    # applies it to all of them. Requests on other paths fail without calling it.
    fail_if: Callable[[ChatRequest], bool] | None = None
    # Status 200, this many content chunks, then an {"error": ...} line.
    error_after_chunks: int | None = None
    # Text of the error line sent by `error_after_chunks`.
    error_message: str = RUNNER_EOF_ERROR
    # This many chunks, then the TCP connection closes without `done: true`.
    close_after_chunks: int | None = None
    # Send 200 headers, then nothing until the client leaves or the server stops.
    stall_after_headers: bool = False
    # Length of the vectors returned by /api/embed.
    embed_dim: int = 64
    # Version reported by /api/version.
    version: str = DEFAULT_VERSION
    # Models /api/pull can fetch; None lets any name be pulled.
    pullable: Collection[str] | None = None
    # Seconds between two /api/pull progress lines.
    pull_delay: float = 0.0
    # Context length reported by /api/ps when the request sets no num_ctx.
    context_length: int = 4096
