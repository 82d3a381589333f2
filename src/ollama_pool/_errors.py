"""Errors raised by ollama-pool.

Every error the library raises on its own account subclasses `OllamaPoolError`:

- `ConfigError`: a configuration file or argument is invalid; names the file and key.
- `NoInstanceError`: no instance serves the requested model.
- `AllAttemptsFailedError`: every attempt of one request failed; lists each attempt.
- `StreamInterruptedError`: a stream failed after chunks reached the caller, so it
  could not be retried.
- `IncompleteResponseError`: a server ended a response without its final chunk.
- `PoolClosedError`: the pool was used after `close()`.

Client errors from a server (HTTP 400 and other 4xx) are not wrapped: they reach
the caller unchanged as `ollama.ResponseError`, because retrying elsewhere cannot
fix them.
"""

from __future__ import annotations

from collections.abc import Sequence


class OllamaPoolError(Exception):
    """Base class of every error raised by ollama-pool."""


class ConfigError(OllamaPoolError, ValueError):
    """An invalid configuration value, with the file and key it came from."""

    def __init__(
        self, message: str, *, path: str | None = None, key: str | None = None
    ):
        self.path = path
        self.key = key
        where = ", ".join(
            part
            for part in (
                f"file {path!r}" if path else "",
                f"key {key!r}" if key else "",
            )
            if part
        )
        super().__init__(f"{where}: {message}" if where else message)


class NoInstanceError(OllamaPoolError):
    """No instance of the pool serves the requested model."""

    def __init__(self, model: str | None, instances: Sequence[str]):
        self.model = model
        self.instances = list(instances)
        listed = ", ".join(self.instances) or "none"
        if model is None:
            message = (
                f"no model was requested and no instance has a model configured "
                f"(instances: {listed}); set a model on the instances or the request"
            )
        else:
            message = (
                f"no instance serves model {model!r} (instances: {listed}); pull "
                f"the model on an instance or change the model name"
            )
        super().__init__(message)


class AllAttemptsFailedError(OllamaPoolError):
    """Every attempt of a request failed.

    `attempts` lists `(instance_url, exception)` in the order the attempts ran.
    """

    def __init__(
        self,
        attempts: Sequence[tuple[str, BaseException]],
        reason: str = "",
        descriptions: Sequence[str] | None = None,
    ):
        self.attempts = list(attempts)
        self.reason = reason
        if descriptions is None:
            descriptions = [f"{type(exc).__name__}: {exc}" for _, exc in self.attempts]
        lines = [
            f"  {url}: {text}"
            for (url, _), text in zip(self.attempts, descriptions, strict=True)
        ]
        summary = f"all {len(self.attempts)} attempts failed"
        if reason:
            summary += f" ({reason})"
        super().__init__("\n".join([summary + ":", *lines]))


class StreamInterruptedError(OllamaPoolError):
    """A stream failed after some chunks were already delivered to the caller."""

    def __init__(self, instance_url: str, cause: BaseException, chunks: int):
        self.instance_url = instance_url
        self.chunks = chunks
        super().__init__(
            f"stream from {instance_url} failed after {chunks} chunks: "
            f"{type(cause).__name__}: {cause}; the partial answer is incomplete"
        )


class IncompleteResponseError(OllamaPoolError):
    """A server ended a response stream without the final `done: true` chunk."""


class PoolClosedError(OllamaPoolError, RuntimeError):
    """The pool was used after it was closed."""
