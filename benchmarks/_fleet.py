"""A stand-in fleet in a process of its own, driven over stdin and stdout.

The benchmark client starts `python -m benchmarks._fleet SPEC_JSON`, where the
spec lists one server a entry (`first_token_delay`, `parallel`, `responder`).
The child prints one JSON line per command it handles; the first line lists
the URLs once every server listens. Commands, one JSON object a line:

- `{"op": "stats"}`: per-server counters and the child's CPU seconds.
- `{"op": "reset"}`: zero the counters.
- `{"op": "stop", "index": I}` / `{"op": "start", "index": I}`.
- `{"op": "schedule", "index": I, "stop_at": A, "start_at": B}`: stop server I
  once the fleet has admitted A chat requests and start it again at B; the
  `stats` reply then carries the seconds it was down.

End of input stops every server and ends the child. Running the fleet in its own
process keeps its CPU time out of the client's measurements.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

_REPO_ROOT = Path(__file__).resolve().parent.parent
# Seconds between two checks of a schedule's trigger counts.
_SCHEDULE_POLL = 0.002


class FleetError(RuntimeError):
    """Raised when the fleet process fails to start or to answer a command."""


class FleetProcess:
    """Client side: start the child, send commands, stop it on exit."""

    def __init__(self, servers: list[dict[str, Any]], *, start_timeout: float = 60.0):
        self.servers = servers
        self.start_timeout = start_timeout
        self.urls: list[str] = []
        self._process: subprocess.Popen[str] | None = None

    def __enter__(self) -> FleetProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def pid(self) -> int:
        if self._process is None:
            raise FleetError("the fleet process is not running")
        return self._process.pid

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks._fleet", json.dumps(self.servers)],
            cwd=_REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        reply = self._read_reply()
        self.urls = reply["urls"]

    def command(self, op: str, **fields: Any) -> dict[str, Any]:
        process = self._running()
        assert process.stdin is not None
        process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        process.stdin.flush()
        return self._read_reply()

    def stats(self) -> dict[str, Any]:
        return self.command("stats")

    def cpu_seconds(self) -> float:
        """Return the user plus system CPU seconds the fleet process used so far."""
        times = psutil.Process(self.pid).cpu_times()
        return times.user + times.system

    def close(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        try:
            if process.stdin is not None:
                process.stdin.close()
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _running(self) -> subprocess.Popen[str]:
        if self._process is None or self._process.poll() is not None:
            raise FleetError("the fleet process is not running")
        return self._process

    def _read_reply(self) -> dict[str, Any]:
        process = self._running()
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            code = process.wait(timeout=self.start_timeout)
            raise FleetError(f"the fleet process exited with code {code}")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise FleetError(f"the fleet process failed: {reply['error']}")
        return reply


# -- Child side ------------------------------------------------------------------


class _Schedule:
    """Stop one server after `stop_at` admitted requests, start it at `start_at`."""

    def __init__(self, fleet: Any, index: int, stop_at: int, start_at: int):
        self.fleet = fleet
        self.index = index
        self.stop_at = stop_at
        self.start_at = start_at
        self.stopped_at: float | None = None
        self.started_at: float | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _admitted(self) -> int:
        return sum(server.stats.chat_requests for server in self.fleet.servers)

    def _wait_for(self, count: int) -> None:
        while self._admitted() < count:
            time.sleep(_SCHEDULE_POLL)

    def _run(self) -> None:
        server = self.fleet.servers[self.index]
        self._wait_for(self.stop_at)
        server.stop()
        self.stopped_at = time.monotonic()
        self._wait_for(self.start_at)
        server.start()
        self.started_at = time.monotonic()

    def report(self) -> dict[str, Any]:
        down = None
        if self.stopped_at is not None:
            end = self.started_at if self.started_at is not None else time.monotonic()
            down = end - self.stopped_at
        return {
            "index": self.index,
            "stopped": self.stopped_at is not None,
            "restarted": self.started_at is not None,
            "down_seconds": down,
        }


def _server_stats(server: Any) -> dict[str, Any]:
    stats = server.stats
    return {
        "url": server.url,
        "host": server.host,
        "requests": dict(stats.requests),
        "chat_requests": stats.chat_requests,
        "max_active_generations": stats.max_active_generations,
        "rejected_busy": stats.rejected_busy,
    }


def _build_fleet(specs: list[dict[str, Any]]) -> Any:
    from ollama_pool.testing import Behavior, StandInFleet
    from ollama_pool.testing.__main__ import load_responder

    behaviors = []
    for spec in specs:
        responder = spec.get("responder")
        behaviors.append(
            Behavior(
                first_token_delay=float(spec.get("first_token_delay", 0.0)),
                parallel=spec.get("parallel"),
                responder=load_responder(responder) if responder else None,
            )
        )
    return StandInFleet(behaviors, host="127.0.0.1")


def _handle(fleet: Any, schedules: list[_Schedule], request: dict[str, Any]) -> Any:
    op = request.get("op")
    if op == "stats":
        times = os.times()
        return {
            "servers": [_server_stats(server) for server in fleet.servers],
            "cpu_seconds": times.user + times.system,
            "schedules": [schedule.report() for schedule in schedules],
        }
    if op == "reset":
        for server in fleet.servers:
            server.reset_stats()
        return {"ok": True}
    if op == "stop":
        fleet.servers[request["index"]].stop()
        return {"ok": True}
    if op == "start":
        fleet.servers[request["index"]].start()
        return {"ok": True}
    if op == "schedule":
        schedules.append(
            _Schedule(fleet, request["index"], request["stop_at"], request["start_at"])
        )
        return {"ok": True}
    return {"error": f"unknown op {op!r}"}


def _reply(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    specs = json.loads(argv[0])
    fleet = _build_fleet(specs)
    schedules: list[_Schedule] = []
    fleet.start()
    try:
        _reply({"urls": fleet.urls})
        for line in sys.stdin:
            if line.strip():
                _reply(_handle(fleet, schedules, json.loads(line)))
    finally:
        fleet.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
