"""Overhead: client CPU and wall time per request on one stand-in with no delay.

Requests are sent one after another, so each one's time is the client's own
work plus one loopback round trip. The clients take turns in rounds (A, B, C,
then B, C, A, ...), so a change of machine load during the run hits them alike.
Each round yields one sample per client; the ratios are the medians of the
per-round ratios to the bare ChatOllama of the same round.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

from benchmarks import _machine, _netguard
from benchmarks._clients import BareClient, LiteLLMClient, PoolClient
from benchmarks._fleet import FleetProcess
from benchmarks._measure import prompts, served_by_fleet
from benchmarks._report import fmt, table

NAME = "overhead"
BARE = "ChatOllama"
POOL = "ollama-pool round_robin"


def _rotated(names: list[str], shift: int) -> list[str]:
    shift %= len(names)
    return names[shift:] + names[:shift]


def _sample(cpu: float, wall: float, count: int) -> dict[str, float]:
    return {"cpu_ms": 1000 * cpu / count, "wall_ms": 1000 * wall / count}


def _sync_rounds(
    clients: dict[str, Any], rounds: int, count: int
) -> dict[str, list[dict[str, float]]]:
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in clients}
    for round_index in range(-1, rounds):  # Round -1 warms up and is not kept.
        _machine.settle()
        for name in _rotated(list(clients), round_index):
            client = clients[name]
            batch = prompts(count, f"sync {round_index}")
            cpu_before = time.process_time()
            started = time.perf_counter()
            for prompt in batch:
                client.invoke(prompt)
            wall = time.perf_counter() - started
            cpu = time.process_time() - cpu_before
            if round_index >= 0:
                samples[name].append(_sample(cpu, wall, count))
    return samples


async def _async_rounds(
    clients: dict[str, Any], rounds: int, count: int
) -> dict[str, list[dict[str, float]]]:
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in clients}
    try:
        for round_index in range(-1, rounds):
            _machine.settle()
            for name in _rotated(list(clients), round_index):
                client = clients[name]
                batch = prompts(count, f"async {round_index}")
                cpu_before = time.process_time()
                started = time.perf_counter()
                for prompt in batch:
                    await client.ainvoke(prompt)
                wall = time.perf_counter() - started
                cpu = time.process_time() - cpu_before
                if round_index >= 0:
                    samples[name].append(_sample(cpu, wall, count))
    finally:
        for client in clients.values():
            await client.aclose()
    return samples


def _summarize(samples: dict[str, list[dict[str, float]]]) -> list[dict[str, Any]]:
    rows = []
    bare = samples.get(BARE)
    for name, values in samples.items():
        row: dict[str, Any] = {"client": name, "rounds": len(values)}
        for key in ("cpu_ms", "wall_ms"):
            row[f"{key}_median"] = statistics.median(v[key] for v in values)
            row[f"{key}_min"] = min(v[key] for v in values)
            if bare is not None:
                ratios = [
                    mine[key] / base[key]
                    for mine, base in zip(values, bare, strict=True)
                ]
                row[f"{key}_ratio_to_bare"] = statistics.median(ratios)
        rows.append(row)
    return rows


def run(requests_per_round: int = 200, rounds: int = 8, peers: bool = True) -> dict:
    makers: dict[str, Callable[[str], Any]] = {
        BARE: BareClient,
        POOL: lambda url: PoolClient([url]),
    }
    if peers:
        makers["LiteLLM Router simple-shuffle"] = lambda url: LiteLLMClient(
            [url], routing_strategy="simple-shuffle"
        )
    modes: dict[str, list[dict[str, Any]]] = {}
    with FleetProcess([{"first_token_delay": 0.0}]) as fleet:
        clients = {name: make(fleet.urls[0]) for name, make in makers.items()}
        fleet_cpu_before = fleet.cpu_seconds()
        modes["sync invoke"] = _summarize(
            _sync_rounds(clients, rounds, requests_per_round)
        )
        modes["async ainvoke"] = _summarize(
            asyncio.run(_async_rounds(clients, rounds, requests_per_round))
        )
        fleet_cpu = fleet.cpu_seconds() - fleet_cpu_before
        served = served_by_fleet(fleet.stats())
    _netguard.check(NAME)
    expected = 2 * (rounds + 1) * requests_per_round * len(makers)
    sent = served["paths"].get("/api/chat", 0)
    return {
        "name": NAME,
        "params": {
            "requests_per_round": requests_per_round,
            "rounds": rounds,
            "target": "PooledChatOllama CPU per request <= 1.05 x bare ChatOllama",
        },
        "modes": modes,
        "fleet_cpu_ms_per_request": 1000 * fleet_cpu / max(sent, 1),
        "served": served,
        "chat_requests_expected": expected,
    }


def markdown(result: dict[str, Any]) -> str:
    headers = [
        "mode",
        "client",
        "CPU ms/req (median)",
        "CPU ratio to ChatOllama",
        "wall ms/req (median)",
        "wall ratio to ChatOllama",
    ]
    body = []
    for mode, rows in result["modes"].items():
        for row in rows:
            body.append(
                [
                    mode,
                    row["client"],
                    fmt(row["cpu_ms_median"], 3),
                    fmt(row.get("cpu_ms_ratio_to_bare"), 3),
                    fmt(row["wall_ms_median"], 3),
                    fmt(row.get("wall_ms_ratio_to_bare"), 3),
                ]
            )
    served = result["served"]["paths"].get("/api/chat", 0)
    note = (
        f"The stand-in served {served} chat requests "
        f"({result['chat_requests_expected']} sent, warm-up rounds included), "
        f"using {result['fleet_cpu_ms_per_request']:.3f} ms of its own CPU per "
        f"request, not counted above.\n\n"
    )
    return note + table(headers, body)


def main(**options: Any) -> dict[str, Any]:
    return run(**options)
