"""One Ollama server of a pool and its live state."""

from __future__ import annotations

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
        self.consecutive_failures = 0
        self.ejections = 0
        self.ejected_until = 0.0
        self.healthy_since = time.monotonic()
        self.last_failure_at = 0.0
        self.last_failure_reason = ""
        self.next_probe_at = 0.0
        self.missing_models: set[str] = set()
        # Exponentially weighted moving average of attempt latency, in seconds.
        self.latency_ewma: float | None = None

    def serves(self, model: str | None) -> bool:
        """Tell whether a request for `model` (normalized, or None) may go here."""
        if model is None:
            return self.model is not None
        if model in self.missing_models:
            return False
        return self.model is None or self.model == model

    def has_capacity(self) -> bool:
        return self.max_in_flight is None or self.in_flight < self.max_in_flight

    def snapshot(self) -> dict[str, object]:
        """Return the public counters as a plain dict."""
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
            "missing_models": sorted(self.missing_models),
            "latency_ewma": self.latency_ewma,
        }

    def __repr__(self) -> str:
        state = "healthy" if self.healthy else "ejected"
        return (
            f"<Instance {self.url} model={self.model!r} {state} "
            f"in_flight={self.in_flight} requests={self.requests} "
            f"failures={self.failures}>"
        )
