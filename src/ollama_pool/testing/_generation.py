"""Text the stand-in generates: default replies, responders, delays and limits."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import threading
from array import array
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ollama_pool.testing._behavior import Behavior, ChatRequest, Responder, TokenCounts

_WORD = re.compile(r"\s*\S+")
CONTENT = "content"
THINKING = "thinking"


class Piece(NamedTuple):
    """One streamed chunk of text: `kind` is "content" or "thinking"."""

    kind: str
    text: str


class GenerationError(Exception):
    """Raised when a responder fails; the message is sent to the client."""


@dataclass
class Outcome:
    """Results of a finished generation, sent in its final chunk."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    done_reason: str = "stop"
    tool_calls: list[dict[str, Any]] | None = None
    pieces: int = field(default=0, repr=False)


def split_words(text: str) -> list[str]:
    """Split text into word chunks whose concatenation is the text."""
    words = _WORD.findall(text)
    covered = sum(map(len, words))
    if covered < len(text):
        if words:
            words[-1] += text[covered:]
        else:
            words.append(text)
    return words


def count_words(messages: list[dict[str, Any]]) -> int:
    total = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            total += len(content.split())
    return max(total, 1)


def last_user_content(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            return content if isinstance(content, str) else ""
    return ""


def default_reply(messages: list[dict[str, Any]]) -> str:
    return "echo: " + last_user_content(messages)


def sample_json(schema: Any, text: str, defs: dict[str, Any] | None = None) -> Any:
    """Build a small value that matches a JSON schema, using `text` for strings."""
    if not isinstance(schema, dict):
        return text
    defs = defs if defs is not None else schema.get("$defs", {})
    if "$ref" in schema:
        target = defs.get(schema["$ref"].rsplit("/", 1)[-1], {})
        return sample_json(target, text, defs)
    if "enum" in schema:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    for combiner in ("anyOf", "oneOf", "allOf"):
        if schema.get(combiner):
            return sample_json(schema[combiner][0], text, defs)
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):
        kind = next((item for item in kind if item != "null"), "null")
    if kind == "object":
        properties = schema.get("properties", {})
        return {
            key: sample_json(value, text, defs) for key, value in properties.items()
        }
    if kind == "array":
        return [sample_json(schema.get("items", {}), text, defs)]
    scalars: dict[str, Any] = {"integer": 0, "number": 0.0, "boolean": False}
    if kind == "null":
        return None
    return scalars.get(kind, text)


def reply_text(behavior: Behavior, request: ChatRequest) -> str:
    """Return the scripted reply, cut before the first options.stop sequence."""
    reply = behavior.reply
    if isinstance(reply, str):
        text = reply
    elif reply is not None:
        text = reply(request.messages)
    else:
        text = _default_formatted_reply(request)
    return cut_at_stop(text, request.options.get("stop"))


def _default_formatted_reply(request: ChatRequest) -> str:
    text = default_reply(request.messages)
    if request.format == "json":
        return json.dumps({"reply": text})
    if isinstance(request.format, dict):
        return json.dumps(sample_json(request.format, text))
    return text


def cut_at_stop(text: str, stop: Any) -> str:
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list):
        return text
    positions = [text.find(item) for item in stop if isinstance(item, str) and item]
    found = [position for position in positions if position >= 0]
    return text[: min(found)] if found else text


def wants_tool_calls(behavior: Behavior, request: ChatRequest) -> bool:
    if not behavior.tool_calls or not request.tools:
        return False
    return not request.messages or request.messages[-1].get("role") != "tool"


def scripted_tool_calls(behavior: Behavior) -> list[dict[str, Any]]:
    calls = behavior.tool_calls or ()
    return [
        {
            "function": {
                "name": call["name"],
                "arguments": dict(call.get("arguments", {})),
            }
        }
        for call in calls
    ]


def token_limit(request: ChatRequest) -> int | None:
    """Return options.num_predict when it limits the output; -1 and -2 do not."""
    limit = request.options.get("num_predict")
    if isinstance(limit, int) and limit > 0:
        return limit
    return None


def embedding_vector(text: str, dim: int) -> list[float]:
    """Return a unit vector derived from a hash of the text."""
    raw = array("H", hashlib.shake_256(text.encode()).digest(dim * 2))
    values = [value - 32767.5 for value in raw]
    norm = sum(value * value for value in values) ** 0.5 or 1.0
    return [value / norm for value in values]


async def generate(
    behavior: Behavior,
    request: ChatRequest,
    outcome: Outcome,
    executor: Executor,
) -> AsyncGenerator[Piece, None]:
    """Yield the pieces of the response with the scripted delays; fill `outcome`.

    The output stops at options.num_predict pieces with done_reason "length".
    """
    outcome.prompt_tokens = count_words(request.messages)
    if wants_tool_calls(behavior, request):
        outcome.tool_calls = scripted_tool_calls(behavior)
        outcome.completion_tokens = len(outcome.tool_calls)
        if behavior.first_token_delay > 0:
            await asyncio.sleep(behavior.first_token_delay)
        return
    if behavior.responder is not None:
        source = _responder_pieces(behavior.responder, request, outcome, executor)
    else:
        source = _scripted_pieces(behavior, request, outcome)
    limit = token_limit(request)
    delay = behavior.first_token_delay
    async for piece in source:
        if limit is not None and outcome.pieces >= limit:
            outcome.done_reason = "length"
            break
        if delay > 0:
            await asyncio.sleep(delay)
        delay = behavior.token_delay
        outcome.pieces += 1
        yield piece
    if outcome.pieces == 0 and behavior.first_token_delay > 0:
        await asyncio.sleep(behavior.first_token_delay)
    if outcome.completion_tokens == 0:
        outcome.completion_tokens = outcome.pieces


async def _scripted_pieces(
    behavior: Behavior, request: ChatRequest, outcome: Outcome
) -> AsyncIterator[Piece]:
    if request.think and behavior.thinking:
        for word in split_words(behavior.thinking):
            yield Piece(THINKING, word)
    for word in split_words(reply_text(behavior, request)):
        yield Piece(CONTENT, word)


async def _responder_pieces(
    responder: Responder,
    request: ChatRequest,
    outcome: Outcome,
    executor: Executor,
) -> AsyncIterator[Piece]:
    """Run the responder in a worker thread and yield its pieces as they come."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    cancelled = threading.Event()

    def send(kind: str, value: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
        except RuntimeError:
            cancelled.set()  # The event loop is closed: the server stopped.

    def drive() -> None:
        iterator: Iterator[str] | None = None
        try:
            iterator = iter(responder(request))
            while not cancelled.is_set():
                try:
                    piece = next(iterator)
                except StopIteration as stop:
                    send("end", stop.value)
                    return
                send("piece", piece)
        except Exception as exc:
            send("error", exc)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    loop.run_in_executor(executor, drive)
    try:
        while True:
            kind, value = await queue.get()
            if kind == "piece":
                yield Piece(CONTENT, value)
            elif kind == "end":
                if isinstance(value, TokenCounts):
                    outcome.prompt_tokens = value.prompt_tokens
                    outcome.completion_tokens = value.completion_tokens
                    outcome.done_reason = value.done_reason
                return
            else:
                raise GenerationError(f"responder failed: {value}") from value
    finally:
        # NOTE: the worker thread checks this flag only between two pieces, so a
        # cancelled request keeps its thread until the current piece is done.
        cancelled.set()
