"""Sorting of exceptions from one attempt into what the pool does next.

This is the one place that maps low-level errors (httpx, ollama-python) onto the
pool's decisions, so that every entry point retries the same failures.
"""

from __future__ import annotations

import enum

import httpx
import ollama

from ollama_pool._errors import IncompleteResponseError


class Failure(enum.Enum):
    """Outcome of one failed attempt, for the request and for the instance."""

    # The instance answered with an error (5xx, broken stream): retry elsewhere
    # and count the failure towards its ejection.
    INSTANCE = "instance"
    # The instance refused the connection or did not answer in time: retry
    # elsewhere and eject it at once, because each such attempt costs a caller a
    # whole timeout or shows that no server is listening.
    UNRESPONSIVE = "unresponsive"
    # The instance is overloaded (503 "server busy", 429): retry elsewhere and
    # send it fewer requests at once, without counting it as a failure.
    BUSY = "busy"
    # The instance lacks the model (404 "not found"): retry elsewhere and stop
    # sending that model to it.
    MODEL_MISSING = "model_missing"
    # The request itself is wrong (400 and other 4xx): raise it unchanged.
    CLIENT = "client"
    # Cancellation, interrupts and errors of the caller's own code: raise them
    # unchanged without blaming the instance.
    NOT_OURS = "not_ours"


# Transport errors that mean no answer came: nothing listens on the port, the
# connection could not be opened in time, or the server went silent for longer
# than the read timeout. ollama-python turns connect failures of non-streaming
# calls into the built-in ConnectionError.
_UNRESPONSIVE_ERRORS = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.ReadTimeout,
    httpx.WriteTimeout,
    ConnectionRefusedError,
    TimeoutError,
)


def classify(exc: BaseException) -> Failure:
    """Return how the pool treats `exc` raised by one attempt."""
    if isinstance(exc, ollama.ResponseError):
        return _classify_status(exc.status_code, str(exc.error))
    if isinstance(exc, IncompleteResponseError):
        return Failure.INSTANCE
    if isinstance(exc, httpx.HTTPStatusError):
        return _classify_status(exc.response.status_code, exc.response.text)
    if isinstance(exc, _UNRESPONSIVE_ERRORS):
        return Failure.UNRESPONSIVE
    if isinstance(exc, ConnectionError) and not isinstance(
        exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)
    ):
        # ollama-python raises a plain ConnectionError when it cannot connect.
        return Failure.UNRESPONSIVE
    if isinstance(exc, (httpx.TransportError, ConnectionError)):
        # The rest of httpx.TransportError: protocol errors such as a connection
        # closed mid-body, and read or write errors on an open connection.
        return Failure.INSTANCE
    return Failure.NOT_OURS


def _classify_status(status: int, message: str) -> Failure:
    # Case 1: the queue of the server is full. Ollama answers 503 "server busy,
    # please try again.  maximum pending requests exceeded"; proxies use 429.
    if status in (429, 503):
        return Failure.BUSY
    # Case 2: ollama-python reports an error line inside a 200 stream as -1.
    if status == -1 or status >= 500:
        return Failure.INSTANCE
    # Case 3: the model is not pulled on this instance (wording differs by version).
    if status == 404 and "not found" in message.lower():
        return Failure.MODEL_MISSING
    # Case 4: other statuses that say nothing about the request itself.
    if status in (404, 408, 499):
        return Failure.INSTANCE
    # Case 5: 400 and the rest of 4xx: invalid request, unsupported tools or thinking.
    return Failure.CLIENT


def describe(exc: BaseException) -> str:
    """Return a one-line reason for logs, without the request body."""
    if isinstance(exc, ollama.ResponseError):
        return f"HTTP {exc.status_code}: {exc.error}"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"
