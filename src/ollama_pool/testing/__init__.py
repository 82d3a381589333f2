"""An Ollama stand-in server for tests, benchmarks and local runs.

`StandInServer` serves the Ollama REST API (chat, generate, embed, pull, tags,
ps, show, version) on 127.0.0.1 with deterministic text, and can script the
failures a real server shows: error statuses, a full queue, errors mid-stream,
dropped connections and stalls. `Behavior` is that script; a `Responder`
replaces the generated text, for example with a real model.
"""

from ollama_pool.testing._app import ServerStats
from ollama_pool.testing._behavior import (
    Behavior,
    ChatRequest,
    Responder,
    TokenCounts,
)
from ollama_pool.testing._server import StandInFleet, StandInServer

__all__ = [
    "Behavior",
    "ChatRequest",
    "Responder",
    "ServerStats",
    "StandInFleet",
    "StandInServer",
    "TokenCounts",
]
