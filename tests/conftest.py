"""Shared fixtures: stand-in Ollama servers on 127.0.0.1 started per test."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest

from ollama_pool.testing import Behavior, StandInServer

StartServers = Callable[..., list[StandInServer]]


@pytest.fixture
def start_servers() -> Iterator[StartServers]:
    """Start stand-in servers on free ports; all stop when the test ends.

    `start_servers(4)` starts four with the default behaviour; keyword arguments
    become `Behavior` fields of every server started by that call.
    """
    started: list[StandInServer] = []

    def start(count: int = 1, **behavior_fields: object) -> list[StandInServer]:
        servers = []
        for _ in range(count):
            server = StandInServer(port=0, behavior=Behavior(**behavior_fields))
            server.start()
            started.append(server)
            servers.append(server)
        return servers

    try:
        yield start
    finally:
        for server in started:
            server.stop()


@pytest.fixture(autouse=True)
def no_leaked_monitor_threads() -> Iterator[None]:
    """Fail a test that leaves a health monitor thread running."""
    yield
    leaked = [
        thread
        for thread in threading.enumerate()
        if thread.name == "ollama-pool-health" and thread.is_alive()
    ]
    assert not leaked, f"health monitor threads left running: {leaked}"
