"""HTTP handlers of one stand-in server: the Ollama REST API on aiohttp."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections import Counter, deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from concurrent.futures import Executor
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ollama_pool.testing import _catalog as catalog
from ollama_pool.testing._behavior import Behavior, ChatRequest
from ollama_pool.testing._gate import GenerationGate, ServerBusyError
from ollama_pool.testing._generation import (
    THINKING,
    GenerationError,
    Outcome,
    Piece,
    embedding_vector,
    generate,
)

logger = logging.getLogger(__name__)

NDJSON = "application/x-ndjson"
BUSY_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"
DEFAULT_KEEP_ALIVE = 300.0
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_JSON_SEPARATORS = (",", ":")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def dumps(value: Any) -> str:
    return json.dumps(value, separators=_JSON_SEPARATORS, ensure_ascii=False)


def error_response(status: int, message: str) -> web.Response:
    return web.Response(
        status=status,
        text=dumps({"error": message}),
        content_type="application/json",
    )


def json_response(value: Any) -> web.Response:
    return web.Response(text=dumps(value), content_type="application/json")


class RequestError(Exception):
    """Raised by request parsing; the handler responds with this status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def parse_keep_alive(value: Any) -> float | None:
    """Return keep_alive in seconds, or None when the model stays loaded forever.

    Accepts what Ollama accepts: a number of seconds or a Go duration ("5m",
    "1h30m"); a negative value means forever.
    """
    if value is None or value == "":
        return DEFAULT_KEEP_ALIVE
    if isinstance(value, bool):
        raise RequestError(400, f"invalid keep_alive {value!r}")
    if isinstance(value, (int, float)):
        return None if value < 0 else float(value)
    if not isinstance(value, str):
        raise RequestError(400, f"invalid keep_alive {value!r}")
    text = value.strip()
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        return None if number < 0 else number
    negative = text.startswith("-")
    body = text.lstrip("+-")
    parts = _DURATION_PART.findall(body)
    if not parts or "".join(a + b for a, b in parts) != body:
        raise RequestError(400, f"invalid keep_alive {value!r}: time: invalid duration")
    seconds = sum(float(amount) * _DURATION_UNITS[unit] for amount, unit in parts)
    return None if negative else seconds


@dataclass
class ServerStats:
    """Counters of one server, updated while it runs; read them in tests."""

    # Requests received per path, including rejected ones.
    requests: Counter[str] = field(default_factory=Counter)
    # Chat and generate requests that got a slot and generated a response.
    chat_requests: int = 0
    # Embed requests that got a slot and returned vectors.
    embed_requests: int = 0
    # Requests generating right now, and the maximum seen at once.
    active_generations: int = 0
    max_active_generations: int = 0
    # Requests waiting for a slot right now.
    waiting_requests: int = 0
    # Requests rejected with 503 because the wait queue was full.
    rejected_busy: int = 0
    # Requests that got the scripted failure.
    scripted_failures: int = 0
    # The latest chat and generate requests, oldest first.
    recent_requests: deque[ChatRequest] = field(
        default_factory=lambda: deque(maxlen=256)
    )


@dataclass
class _Timing:
    started: int
    loaded: int = 0
    first_piece: int = 0

    def metrics(self, outcome: Outcome) -> dict[str, int]:
        """Return the final chunk's metrics in nanoseconds, omitting zeros."""
        now = time.perf_counter_ns()
        loaded = self.loaded or now
        first = self.first_piece or now
        values = {
            "total_duration": now - self.started,
            "load_duration": loaded - self.started,
            "prompt_eval_count": outcome.prompt_tokens,
            "prompt_eval_duration": max(first - loaded, 1),
            "eval_count": outcome.completion_tokens,
            "eval_duration": max(now - first, 1),
        }
        return {key: value for key, value in values.items() if value}


class _Format:
    """NDJSON lines of /api/chat or /api/generate for one request."""

    def __init__(self, api: str, model: str) -> None:
        self.chat = api == "chat"
        self.model = model
        self.created_at = catalog.rfc3339(time.time())
        self.head = f'{{"model":{dumps(model)},"created_at":"{self.created_at}",'

    def piece(self, piece: Piece) -> str:
        text = dumps(piece.text)
        if self.chat:
            if piece.kind == THINKING:
                message = f'"role":"assistant","content":"","thinking":{text}'
            else:
                message = f'"role":"assistant","content":{text}'
            return f'{self.head}"message":{{{message}}},"done":false}}\n'
        if piece.kind == THINKING:
            return f'{self.head}"response":"","thinking":{text},"done":false}}\n'
        return f'{self.head}"response":{text},"done":false}}\n'

    def tool_calls(self, calls: list[dict[str, Any]]) -> str:
        message = {"role": "assistant", "content": "", "tool_calls": calls}
        return f'{self.head}"message":{dumps(message)},"done":false}}\n'

    def final(self, outcome: Outcome, metrics: dict[str, int]) -> dict[str, Any]:
        return self.whole("", "", None, outcome, metrics)

    def whole(
        self,
        content: str,
        thinking: str,
        tool_calls: list[dict[str, Any]] | None,
        outcome: Outcome,
        metrics: dict[str, int],
    ) -> dict[str, Any]:
        """Build the object of a `stream: false` response or of the final chunk."""
        value: dict[str, Any] = {"model": self.model, "created_at": self.created_at}
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            if tool_calls:
                message["tool_calls"] = tool_calls
            value["message"] = message
        else:
            value["response"] = content
            if thinking:
                value["thinking"] = thinking
        value["done"] = True
        value["done_reason"] = outcome.done_reason
        value.update(metrics)
        return value


@dataclass
class _LoadedModel:
    expires_at: float | None  # POSIX time; None while keep_alive is negative
    context_length: int


_FOREVER = 253402300799.0  # 9999-12-31T23:59:59Z, shown for keep_alive < 0


class StandInApp:
    """State and request handlers of one stand-in server."""

    def __init__(
        self,
        behavior: Behavior,
        models_dir: catalog.ModelsDirectory | None,
        executor: Executor,
    ) -> None:
        self.behavior = behavior
        self.models_dir = models_dir
        self.executor = executor
        self.stats = ServerStats()
        self.gate = GenerationGate(
            lambda: self.behavior.parallel,
            lambda: self.behavior.max_queue,
            self._update_active,
        )
        self.started_at = time.time()
        self.stopping = asyncio.Event()
        self._pulled: dict[str, float] = {}
        self._loaded: dict[str, _LoadedModel] = {}
        self._failure_key: tuple[int, int | None, int | None] | None = None
        self._failures_left: int | None = None

    def build(self) -> web.Application:
        app = web.Application()
        routes: list[tuple[str, str, Handler]] = [
            ("GET", "/", self.root),
            ("GET", "/api/version", self.version),
            ("GET", "/api/tags", self.tags),
            ("GET", "/api/ps", self.ps),
            ("POST", "/api/show", self.show),
            ("POST", "/api/chat", self.chat),
            ("POST", "/api/generate", self.generate),
            ("POST", "/api/embed", self.embed),
            ("POST", "/api/embeddings", self.embeddings),
            ("POST", "/api/pull", self.pull),
            ("DELETE", "/api/delete", self.delete),
        ]
        for method, path, handler in routes:
            app.router.add_route(method, path, self._counted(path, handler))
        app.router.add_route("HEAD", "/", self._counted("/", self.root))
        return app

    def _counted(self, path: str, handler: Handler) -> Handler:
        async def counted(request: web.Request) -> web.StreamResponse:
            self.stats.requests[path] += 1
            try:
                return await handler(request)
            except RequestError as exc:
                logger.debug("%s %s: %s", exc.status, path, exc.message)
                return error_response(exc.status, exc.message)

        return counted

    # Models

    def _all_models(self) -> dict[str, float]:
        """Return every model the server has, with its modification time."""
        models = dict.fromkeys(catalog.normalized_set(self.behavior.models), 0.0)
        models.update(self._pulled)
        if self.models_dir is not None:
            models.update(self.models_dir.list())
        return {name: stamp or self.started_at for name, stamp in models.items()}

    def _modified(self, name: str) -> float | None:
        """Return the model's modification time, or None when the server lacks it."""
        if name in catalog.normalized_set(self.behavior.models):
            return self.started_at
        if name in self._pulled:
            return self._pulled[name]
        if self.models_dir is not None:
            return self.models_dir.modified(name)
        return None

    def _require_model(self, body: dict[str, Any]) -> str:
        """Return the normalized model name; raise RequestError 400 or 404."""
        name = body.get("model") or body.get("name")
        if not name:
            raise RequestError(400, "model is required")
        if not isinstance(name, str) or not catalog.is_safe_name(name):
            raise RequestError(400, f"invalid model name {name!r}")
        normalized = catalog.normalize_model(name)
        if self._modified(normalized) is None:
            raise RequestError(404, f"model '{name}' not found")
        return normalized

    def _load(self, name: str, keep_alive: float | None, context_length: int) -> bool:
        """Mark the model loaded; return whether it was loaded before."""
        now = time.time()
        entry = self._loaded.get(name)
        was_loaded = entry is not None and (
            entry.expires_at is None or entry.expires_at > now
        )
        expires_at = None if keep_alive is None else now + keep_alive
        self._loaded[name] = _LoadedModel(expires_at, context_length)
        return was_loaded

    async def _ensure_loaded(
        self, name: str, keep_alive: float | None, options: dict[str, Any]
    ) -> None:
        context_length = options.get("num_ctx") or self.behavior.context_length
        if not self._load(name, keep_alive, context_length):
            delay = self.behavior.load_delay
            if delay > 0:
                await asyncio.sleep(delay)

    def _after_request(self, name: str, keep_alive: float | None) -> None:
        if keep_alive == 0:
            self._loaded.pop(name, None)
        elif (entry := self._loaded.get(name)) is not None:
            expires_at = None if keep_alive is None else time.time() + keep_alive
            entry.expires_at = expires_at

    # Scripted failures and the queue

    async def _scripted_failure(
        self, path: str, chat_request: ChatRequest | None = None
    ) -> web.Response | None:
        behavior = self.behavior
        if behavior.fail_status is None or path not in behavior.fail_paths:
            return None
        predicate = behavior.fail_if
        skipped = (
            predicate is not None
            and chat_request is not None
            and not predicate(chat_request)
        )
        if skipped:
            return None
        key = (id(behavior), behavior.fail_first, behavior.fail_status)
        if key != self._failure_key:
            self._failure_key = key
            self._failures_left = behavior.fail_first
        if self._failures_left is not None:
            if self._failures_left <= 0:
                return None
            self._failures_left -= 1
        self.stats.scripted_failures += 1
        logger.debug("scripted failure %s on %s", behavior.fail_status, path)
        if behavior.fail_delay > 0:
            await asyncio.sleep(behavior.fail_delay)
        return error_response(behavior.fail_status, behavior.fail_message)

    async def _acquire_slot(self) -> web.Response | None:
        """Wait for a generation slot; return a 503 response when the queue is full."""
        try:
            await self.gate.acquire()
        except ServerBusyError:
            self.stats.rejected_busy += 1
            return error_response(503, BUSY_MESSAGE)
        return None

    def _release_slot(self) -> None:
        self.gate.release()

    def _update_active(self) -> None:
        stats = self.stats
        stats.active_generations = self.gate.active
        stats.max_active_generations = max(
            stats.max_active_generations, self.gate.active
        )
        stats.waiting_requests = self.gate.waiting

    def wake_waiters(self) -> None:
        """Let waiting requests in after the behaviour raised `parallel`."""
        self.gate.wake()

    # Connection faults

    async def stall(self, request: web.Request) -> None:
        """Send nothing until the server stops; the client leaving cancels this."""
        await self.stopping.wait()
        if request.transport is not None:
            request.transport.abort()

    @staticmethod
    def drop_connection(request: web.Request) -> None:
        """Close the TCP connection after the data already written, with no
        chunked terminator, so the client sees an incomplete body."""
        if request.transport is not None:
            request.transport.close()

    # Discovery endpoints

    async def root(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="Ollama is running")

    async def version(self, request: web.Request) -> web.StreamResponse:
        failure = await self._scripted_failure(request.path)
        return failure or json_response({"version": self.behavior.version})

    async def tags(self, request: web.Request) -> web.StreamResponse:
        failure = await self._scripted_failure(request.path)
        if failure is not None:
            return failure
        models = sorted(self._all_models().items(), key=lambda item: -item[1])
        entries = [catalog.tags_entry(name, stamp) for name, stamp in models]
        return json_response({"models": entries})

    async def ps(self, request: web.Request) -> web.StreamResponse:
        now = time.time()
        expired = [
            name
            for name, entry in self._loaded.items()
            if entry.expires_at is not None and entry.expires_at <= now
        ]
        for name in expired:
            del self._loaded[name]
        loaded = sorted(
            self._loaded.items(),
            key=lambda item: item[1].expires_at or _FOREVER,
            reverse=True,
        )
        entries = []
        for name, entry in loaded:
            size = catalog.model_size(name)
            entries.append(
                {
                    "name": name,
                    "model": name,
                    "size": size,
                    "digest": catalog.model_digest(name).removeprefix("sha256:"),
                    "details": catalog.model_details(name),
                    "expires_at": catalog.rfc3339(entry.expires_at or _FOREVER),
                    "size_vram": size,
                    "context_length": entry.context_length,
                }
            )
        return json_response({"models": entries})

    async def show(self, request: web.Request) -> web.StreamResponse:
        body = await read_body(request)
        name = self._require_model(body)
        modified = self._modified(name) or self.started_at
        return json_response(catalog.show_response(name, modified))

    async def delete(self, request: web.Request) -> web.StreamResponse:
        body = await read_body(request)
        name = self._require_model(body)
        self._pulled.pop(name, None)
        if self.models_dir is not None and self.models_dir.has(name):
            self.models_dir.manifest_path(name).unlink(missing_ok=True)
        behavior = self.behavior
        behavior.models = [
            model for model in behavior.models if catalog.normalize_model(model) != name
        ]
        self._loaded.pop(name, None)
        return web.Response()

    # Generation endpoints

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generation(request, "chat")

    async def generate(self, request: web.Request) -> web.StreamResponse:
        return await self._generation(request, "generate")

    async def _generation(self, request: web.Request, api: str) -> web.StreamResponse:
        started = time.perf_counter_ns()
        body = await read_body(request)
        name = self._require_model(body)
        chat_request = parse_chat_request(body, name, api)
        if "completion" not in catalog.capabilities(name):
            raise RequestError(
                400, f'"{body.get("model") or name}" does not support {api}'
            )
        keep_alive = parse_keep_alive(body.get("keep_alive"))
        stream = body.get("stream") is not False

        failure = await self._scripted_failure(request.path, chat_request)
        if failure is not None:
            return failure
        if not chat_request.messages:
            return await self._load_only(api, chat_request, keep_alive)

        self.stats.recent_requests.append(chat_request)
        busy = await self._acquire_slot()
        if busy is not None:
            return busy
        try:
            self.stats.chat_requests += 1
            timing = _Timing(started)
            await self._ensure_loaded(name, keep_alive, chat_request.options)
            timing.loaded = time.perf_counter_ns()
            answer = _Answer(self, request, _Format(api, name), chat_request, timing)
            if stream:
                return await answer.stream()
            return await answer.collect()
        finally:
            self._release_slot()
            self._after_request(name, keep_alive)

    async def _load_only(
        self, api: str, chat_request: ChatRequest, keep_alive: float | None
    ) -> web.StreamResponse:
        """Respond to a request without messages or prompt: load or unload the model."""
        name = chat_request.model
        started = time.perf_counter_ns()
        await self._ensure_loaded(name, keep_alive, chat_request.options)
        outcome = Outcome(done_reason="load")
        if keep_alive == 0:
            self._loaded.pop(name, None)
            outcome.done_reason = "unload"
        metrics = {"total_duration": time.perf_counter_ns() - started}
        return json_response(_Format(api, name).whole("", "", None, outcome, metrics))

    async def embed(self, request: web.Request) -> web.StreamResponse:
        body = await read_body(request)
        name = self._require_model(body)
        texts = parse_embed_input(body.get("input"))
        dim = body.get("dimensions") or self.behavior.embed_dim
        if not isinstance(dim, int) or dim <= 0:
            raise RequestError(400, f"invalid dimensions {dim!r}")
        vectors, metrics = await self._embed_texts(request.path, body, name, texts, dim)
        if isinstance(vectors, web.StreamResponse):
            return vectors
        return json_response({"model": name, "embeddings": vectors, **metrics})

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        """Respond to the legacy single-text endpoint, /api/embeddings."""
        body = await read_body(request)
        name = self._require_model(body)
        prompt = body.get("prompt") or ""
        if not isinstance(prompt, str):
            raise RequestError(400, f"invalid prompt {prompt!r}")
        texts = [prompt] if prompt else []
        dim = self.behavior.embed_dim
        vectors, _ = await self._embed_texts(request.path, body, name, texts, dim)
        if isinstance(vectors, web.StreamResponse):
            return vectors
        return json_response({"embedding": vectors[0] if vectors else []})

    async def _embed_texts(
        self,
        path: str,
        body: dict[str, Any],
        name: str,
        texts: list[str],
        dim: int,
    ) -> tuple[list[list[float]] | web.StreamResponse, dict[str, int]]:
        started = time.perf_counter_ns()
        keep_alive = parse_keep_alive(body.get("keep_alive"))
        failure = await self._scripted_failure(path)
        if failure is not None:
            return failure, {}
        busy = await self._acquire_slot()
        if busy is not None:
            return busy, {}
        try:
            await self._ensure_loaded(name, keep_alive, body.get("options") or {})
            loaded = time.perf_counter_ns()
            vectors = [embedding_vector(text, dim) for text in texts]
            self.stats.embed_requests += 1
        finally:
            self._release_slot()
            self._after_request(name, keep_alive)
        words = sum(len(text.split()) for text in texts)
        metrics = {
            "total_duration": time.perf_counter_ns() - started,
            "load_duration": loaded - started,
            "prompt_eval_count": words,
        }
        return vectors, {key: value for key, value in metrics.items() if value}

    # Pull

    async def pull(self, request: web.Request) -> web.StreamResponse:
        body = await read_body(request)
        raw_name = body.get("model") or body.get("name")
        if not raw_name or not isinstance(raw_name, str):
            raise RequestError(400, "model is required")
        if not catalog.is_safe_name(raw_name):
            raise RequestError(400, f"invalid model name {raw_name!r}")
        name = catalog.normalize_model(raw_name)
        failure = await self._scripted_failure(request.path)
        if failure is not None:
            return failure
        pullable = self.behavior.pullable
        found = pullable is None or name in catalog.normalized_set(pullable)
        if body.get("stream") is False:
            for _ in _pull_progress(name):
                await self._pull_pause()
            if not found:
                return error_response(500, _PULL_NOT_FOUND)
            self._store_pulled(name)
            return json_response({"status": "success"})
        response = web.StreamResponse(headers={"Content-Type": NDJSON})
        await response.prepare(request)
        await response.write(b'{"status":"pulling manifest"}\n')
        if not found:
            await response.write(dumps({"error": _PULL_NOT_FOUND}).encode() + b"\n")
            return response
        for line in _pull_progress(name):
            await self._pull_pause()
            await response.write(dumps(line).encode() + b"\n")
        self._store_pulled(name)
        await response.write(b'{"status":"success"}\n')
        return response

    async def _pull_pause(self) -> None:
        delay = self.behavior.pull_delay
        if delay > 0:
            await asyncio.sleep(delay)

    def _store_pulled(self, name: str) -> None:
        if self.models_dir is not None:
            self.models_dir.write(name)
        else:
            self._pulled[name] = time.time()
        logger.info("pulled model %s", name)


_PULL_NOT_FOUND = "pull model manifest: file does not exist"


def _pull_progress(name: str) -> list[dict[str, Any]]:
    """Return the progress lines of a pull between "pulling manifest" and "success"."""
    digest = catalog.model_digest(name)
    total = catalog.model_size(name)
    status = f"downloading {digest}"
    lines: list[dict[str, Any]] = [
        {
            "status": status,
            "digest": digest,
            "total": total,
            "completed": total * step // 4,
        }
        for step in range(5)
    ]
    lines.append({"status": "verifying sha256 digest"})
    lines.append({"status": "writing manifest"})
    return lines


async def read_body(request: web.Request) -> dict[str, Any]:
    """Parse the JSON object of a request body; raise RequestError 400 otherwise."""
    raw = await request.read()
    if not raw.strip():
        raise RequestError(400, "missing request body")
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise RequestError(400, f"invalid JSON in request body: {exc}") from exc
    if not isinstance(body, dict):
        raise RequestError(400, "request body must be a JSON object")
    return body


def parse_chat_request(body: dict[str, Any], model: str, api: str) -> ChatRequest:
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise RequestError(400, f"invalid options {options!r}")
    if api == "chat":
        messages = body.get("messages") or []
        if not isinstance(messages, list) or not all(
            isinstance(message, dict) for message in messages
        ):
            raise RequestError(400, "messages must be a list of objects")
        messages = [dict(message) for message in messages]
    else:
        messages = prompt_messages(body)
    tools = body.get("tools") or None
    if tools is not None and not isinstance(tools, list):
        raise RequestError(400, f"invalid tools {tools!r}")
    return ChatRequest(
        model=model,
        messages=messages,
        options=dict(options),
        format=body.get("format") or None,
        tools=tools,
        think=body.get("think"),
    )


def prompt_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Turn the `system` and `prompt` of a generate request into messages."""
    prompt = body.get("prompt") or ""
    system = body.get("system") or ""
    if not isinstance(prompt, str) or not isinstance(system, str):
        raise RequestError(400, "prompt and system must be strings")
    if not prompt:
        return []
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    return messages


def parse_embed_input(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    raise RequestError(400, f"invalid input type {type(value).__name__}")


class _Answer:
    """One chat or generate response, streamed or collected, with scripted faults."""

    def __init__(
        self,
        app: StandInApp,
        request: web.Request,
        line_format: _Format,
        chat_request: ChatRequest,
        timing: _Timing,
    ) -> None:
        self.app = app
        self.request = request
        self.format = line_format
        self.chat_request = chat_request
        self.timing = timing
        self.behavior = app.behavior
        self.outcome = Outcome()
        self.fault_after = _fault_after(self.behavior)

    def _pieces(self) -> AbstractAsyncContextManager[AsyncGenerator[Piece, None]]:
        pieces = generate(
            self.behavior, self.chat_request, self.outcome, self.app.executor
        )
        return contextlib.aclosing(pieces)

    async def stream(self) -> web.StreamResponse:
        if self.behavior.stall_after_headers:
            stalled = web.StreamResponse(headers={"Content-Type": NDJSON})
            await stalled.prepare(self.request)
            await self.app.stall(self.request)
            return stalled
        response = _CoalescedStreamResponse(headers={"Content-Type": NDJSON})
        await response.prepare(self.request)

        pending: list[str] = []
        try:
            await self._stream_pieces(response, pending)
        except GenerationError as exc:
            logger.warning("generation for %s failed: %s", self.format.model, exc)
            pending.append(dumps({"error": str(exc)}) + "\n")
            await _flush(response, pending)
            return response
        if self.fault_after is not None:
            await self._stream_fault(response, pending)
            return response

        if self.outcome.tool_calls:
            pending.append(self.format.tool_calls(self.outcome.tool_calls))
        final = self.format.final(self.outcome, self.timing.metrics(self.outcome))
        pending.append(dumps(final) + "\n")
        await response.write_eof("".join(pending).encode())
        return response

    async def _stream_pieces(
        self, response: web.StreamResponse, pending: list[str]
    ) -> None:
        """Write the pieces up to the scripted fault, if any.

        Without delays between pieces, the lines are left in `pending` and sent
        in one write, which keeps the CPU cost per request low.
        """
        flush_each = (
            self.behavior.token_delay > 0 or self.behavior.responder is not None
        )
        sent = 0
        async with self._pieces() as pieces:
            async for piece in pieces:
                if sent == 0:
                    self.timing.first_piece = time.perf_counter_ns()
                if self.fault_after is not None and sent >= self.fault_after:
                    return
                pending.append(self.format.piece(piece))
                sent += 1
                if flush_each:
                    await _flush(response, pending)

    async def _stream_fault(
        self, response: web.StreamResponse, pending: list[str]
    ) -> None:
        if self.behavior.error_after_chunks == self.fault_after:
            pending.append(dumps({"error": self.behavior.error_message}) + "\n")
            await _flush(response, pending)
            return
        await _flush(response, pending)
        self.app.drop_connection(self.request)

    async def collect(self) -> web.StreamResponse:
        if self.behavior.stall_after_headers:
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            await response.prepare(self.request)
            await self.app.stall(self.request)
            return response
        content: list[str] = []
        thinking: list[str] = []
        try:
            async with self._pieces() as pieces:
                async for piece in pieces:
                    if self.timing.first_piece == 0:
                        self.timing.first_piece = time.perf_counter_ns()
                    (thinking if piece.kind == THINKING else content).append(piece.text)
        except GenerationError as exc:
            logger.warning("generation for %s failed: %s", self.format.model, exc)
            return error_response(500, str(exc))
        if self.fault_after is not None:
            if self.behavior.error_after_chunks == self.fault_after:
                return error_response(500, self.behavior.error_message)
            self.app.drop_connection(self.request)
            return web.Response()
        metrics = self.timing.metrics(self.outcome)
        whole = self.format.whole(
            "".join(content),
            "".join(thinking),
            self.outcome.tool_calls,
            self.outcome,
            metrics,
        )
        return json_response(whole)


def _fault_after(behavior: Behavior) -> int | None:
    """Return after how many chunks the scripted stream fault happens, if any."""
    counts = [
        count
        for count in (behavior.error_after_chunks, behavior.close_after_chunks)
        if count is not None
    ]
    return min(counts) if counts else None


class _CoalescedStreamResponse(web.StreamResponse):
    """A streamed response whose headers go out with the first body chunk.

    Go's net/http, which Ollama uses, also sends the headers with the first body
    write. A response without delays then takes one socket write in place of
    three. aiohttp before 3.11 ignores this attribute and sends headers at once.
    """

    _send_headers_immediately = False


async def _flush(response: web.StreamResponse, pending: list[str]) -> None:
    if pending:
        data = "".join(pending).encode()
        pending.clear()
        await response.write(data)
