"""One Ollama server of a pool and its live state."""

from __future__ import annotations

import math
import time

from ollama_pool._urls import normalize_model, redact_url, split_credentials


class Instance:
    """One Ollama server: its address, its model and its live counters.

    The pool mutates the counters under its own lock; readers outside the pool get
    a snapshot that may be a moment old.
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        *,
        max_in_flight: int | None = None,
        index: int = 0,
    ):
        self.base_url = base_url.rstrip("/")
        self.url = redact_url(self.base_url)
        # The address without user info, and the credentials as an auth object,
        # because httpx logs request URLs and the password must not appear there.
        self.plain_url, self.auth = split_credentials(self.base_url)
        self.model = normalize_model(model) if model else None
        self.max_in_flight = max_in_flight
        self.index = index

        self.in_flight = 0
        self.requests = 0
        self.successes = 0
        self.failures = 0

        self.healthy = True
        # A returned instance takes one request at a time until one succeeds,
        # because a probe cannot show that it generates again.
        self.on_probation = False
        self.consecutive_failures = 0
        self.ejections = 0
        self.ejected_at = 0.0
        self.ejected_until = 0.0
        self.healthy_since = time.monotonic()
        self.last_failure_at = 0.0
        self.last_failure_reason = ""
        self.next_probe_at = 0.0
        # Models that answered 404, each with the monotonic time its mark expires.
        self.missing_models: dict[str, float] = {}
        # Requests in flight that the server accepted before it answered "busy";
        # grows again while requests succeed (see `OllamaPool`).
        self.busy_limit: float | None = None
        # Exponentially weighted moving average of attempt latency, in seconds.
        self.latency_ewma: float | None = None

    def lacks(self, model: str, now: float) -> bool:
        """Tell whether `model` answered 404 here and the mark has not expired."""
        expires = self.missing_models.get(model)
        return expires is not None and now < expires

    def serves(self, model: str | None, now: float | None = None) -> bool:
        """Tell whether a request for `model` (normalized, or None) may go here."""
        if model is None:
            return self.model is not None
        if self.lacks(model, time.monotonic() if now is None else now):
            return False
        return self.model is None or self.model == model

    @property
    def limit(self) -> int | None:
        """Requests this instance may have in flight now; None for no limit."""
        limits = [self.max_in_flight]
        if self.busy_limit is not None:
            limits.append(max(1, math.floor(self.busy_limit)))
        if self.on_probation:
            limits.append(1)
        present = [limit for limit in limits if limit is not None]
        return min(present) if present else None

    def has_capacity(self) -> bool:
        limit = self.limit
        return limit is None or self.in_flight < limit

    def snapshot(self) -> dict[str, object]:
        """Return the public counters as a plain dict."""
        now = time.monotonic()
        return {
            "url": self.url,
            "model": self.model,
            "healthy": self.healthy,
            "in_flight": self.in_flight,
            "requests": self.requests,
            "successes": self.successes,
            "failures": self.failures,
            "consecutive_failures": self.consecutive_failures,
            "ejections": self.ejections,
            "on_probation": self.on_probation,
            "limit": self.limit,
            "missing_models": sorted(
                m for m in self.missing_models if self.lacks(m, now)
            ),
            "latency_ewma": self.latency_ewma,
        }

    def __repr__(self) -> str:
        state = "healthy" if self.healthy else "ejected"
        if self.healthy and self.on_probation:
            state = "on probation"
        return (
            f"<Instance {self.url} model={self.model!r} {state} "
            f"in_flight={self.in_flight} requests={self.requests} "
            f"failures={self.failures}>"
        )
