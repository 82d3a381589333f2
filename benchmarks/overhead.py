"""Overhead: client CPU and wall time per request on one stand-in with no delay.

Requests are sent one after another, so each one's time is the client's own
work plus one loopback round trip. The clients take turns in rounds (A, B, C,
then B, C, A, ...), so a change of machine load during the run hits them alike.
Each round yields one sample per client; the ratios are the medians of the
per-round ratios to the bare ChatOllama of the same round.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from benchmarks import _machine, _netguard
from benchmarks._clients import BareClient, LiteLLMClient, PoolClient
from benchmarks._fleet import FleetProcess
from benchmarks._measure import prompts, served_by_fleet
from benchmarks._report import fmt, table

NAME = "overhead"
# Seconds of idle time before each client's turn, and a garbage collection, so
# that no client is charged for the work another one left behind.
_PAUSE = 0.5
BARE = "ChatOllama"
BARE_AGAIN = "ChatOllama, second instance (A/A control)"
BARE_WITH_TIMEOUTS = "ChatOllama with the pool's timeouts"
POOL = "ollama-pool round_robin"
PEER = "LiteLLM Router simple-shuffle"


def balanced_orders(count: int) -> list[list[int]]:
    """Return client orders in which each client runs once at each position and,
    for an even `count`, right after each other client once (a Williams design).

    Running clients in these orders, so that none always follows the same one,
    spreads the cost that one client leaves behind (garbage, background work)
    over all of them.
    """
    first = [0]
    for step in range(1, count):
        first.append((step + 1) // 2 if step % 2 else count - step // 2)
    orders = [[(index + shift) % count for index in first] for shift in range(count)]
    if count % 2:
        orders += [list(reversed(order)) for order in orders]
    return orders


def _sample(cpu: float, wall: float, count: int) -> dict[str, float]:
    return {"cpu_ms": 1000 * cpu / count, "wall_ms": 1000 * wall / count}


def _schedule(names: list[str], rounds: int) -> list[list[str]]:
    """Return the client order of each round; the first round warms up."""
    orders = balanced_orders(len(names))
    return [[names[i] for i in orders[r % len(orders)]] for r in range(rounds + 1)]


def _sync_rounds(
    clients: dict[str, Any], rounds: int, count: int
) -> dict[str, list[dict[str, float]]]:
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in clients}
    for round_index, order in enumerate(_schedule(list(clients), rounds), -1):
        _machine.settle()
        for name in order:
            client = clients[name]
            batch = prompts(count, f"sync {round_index}")
            time.sleep(_PAUSE)
            gc.collect()
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
        for round_index, order in enumerate(_schedule(list(clients), rounds), -1):
            _machine.settle()
            for name in order:
                client = clients[name]
                batch = prompts(count, f"async {round_index}")
                # Lets background work of the previous client (LiteLLM's logging
                # tasks and threads) finish before this client's CPU is counted.
                await asyncio.sleep(_PAUSE)
                gc.collect()
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


def _measure_group(
    clients: dict[str, Any], rounds: int, count: int
) -> dict[str, dict[str, list[dict[str, float]]]]:
    """Run the sync rounds, then the async rounds, of one group of clients."""
    return {
        "sync invoke": _sync_rounds(clients, rounds, count),
        "async ainvoke": asyncio.run(_async_rounds(clients, rounds, count)),
    }


def _ratios(
    values: list[dict[str, float]], baseline: list[dict[str, float]], key: str
) -> list[float]:
    """Return the per-round ratios `values / baseline` for `key`, sorted."""
    return sorted(
        mine[key] / base[key] for mine, base in zip(values, baseline, strict=True)
    )


def _summarize(
    samples: dict[str, list[dict[str, float]]],
    baselines: dict[str, list[dict[str, float]]],
) -> list[dict[str, Any]]:
    rows = []
    for name, values in samples.items():
        row: dict[str, Any] = {"client": name, "rounds": len(values)}
        for key in ("cpu_ms", "wall_ms"):
            row[f"{key}_median"] = statistics.median(v[key] for v in values)
            row[f"{key}_min"] = min(v[key] for v in values)
            for label, baseline in baselines.items():
                ratios = _ratios(values, baseline, key)
                row[f"{key}_ratio_to_{label}"] = statistics.median(ratios)
                if len(ratios) > 1:
                    quartiles = statistics.quantiles(ratios, n=4)
                    spread = [quartiles[0], quartiles[2]]
                else:
                    spread = [ratios[0], ratios[0]]
                row[f"{key}_ratio_to_{label}_quartiles"] = spread
        rows.append(row)
    return rows


def pool_machinery(iterations: int = 20000) -> dict[str, float]:
    """Measure the CPU microseconds of `OllamaPool.call` and `acall` alone.

    The send function does nothing and the health monitor is off, so no request
    leaves the process: this is the cost of choosing an instance, reserving and
    releasing its slot and recording the outcome.
    """
    from ollama_pool import OllamaPool

    def send(instance: Any) -> None:
        return None

    async def asend(instance: Any) -> None:
        return None

    # Port 9 (discard) is never contacted: `send` ignores the instance.
    pool = OllamaPool(["http://127.0.0.1:9"], model="m", health_check_interval=0)

    def sync_loop() -> float:
        started = time.process_time()
        for _ in range(iterations):
            pool.call(send)
        return time.process_time() - started

    async def async_loop() -> float:
        started = time.process_time()
        for _ in range(iterations):
            await pool.acall(asend)
        return time.process_time() - started

    try:
        sync_seconds = min(sync_loop() for _ in range(3))
        async_seconds = min(asyncio.run(async_loop()) for _ in range(3))
    finally:
        pool.close()
    return {
        "call_us": 1e6 * sync_seconds / iterations,
        "acall_us": 1e6 * async_seconds / iterations,
    }


def run(
    requests_per_round: int = 200,
    rounds: int = 12,
    peer_rounds: int = 4,
    peers: bool = True,
) -> dict[str, Any]:
    """Measure the ChatOllama family and the pool, then LiteLLM against ChatOllama.

    LiteLLM runs in a group of its own, because the background work it leaves
    after its turn would otherwise be charged to the next client of the round.
    """
    group: dict[str, Callable[[str], Any]] = {
        BARE: BareClient,
        # The same client twice: the spread of its ratio is the noise floor.
        BARE_AGAIN: BareClient,
        BARE_WITH_TIMEOUTS: partial(BareClient, pool_timeouts=True),
        POOL: lambda url: PoolClient([url]),
    }
    peer_group: dict[str, Callable[[str], Any]] = {
        BARE: BareClient,
        PEER: lambda url: LiteLLMClient([url], routing_strategy="simple-shuffle"),
    }
    modes: dict[str, list[dict[str, Any]]] = {}
    with FleetProcess([{"first_token_delay": 0.0}]) as fleet:
        url = fleet.urls[0]
        fleet_cpu_before = fleet.cpu_seconds()
        clients = {name: make(url) for name, make in group.items()}
        for mode, samples in _measure_group(
            clients, rounds, requests_per_round
        ).items():
            baselines = {"bare": samples[BARE], "timeouts": samples[BARE_WITH_TIMEOUTS]}
            modes[mode] = _summarize(samples, baselines)
        expected = 2 * (rounds + 1) * requests_per_round * len(group)
        if peers:
            clients = {name: make(url) for name, make in peer_group.items()}
            grouped = _measure_group(clients, peer_rounds, requests_per_round)
            for mode, samples in grouped.items():
                baselines = {"bare": samples[BARE]}
                modes[mode] += _summarize({PEER: samples[PEER]}, baselines)
            expected += 2 * (peer_rounds + 1) * requests_per_round * len(peer_group)
        fleet_cpu = fleet.cpu_seconds() - fleet_cpu_before
        served = served_by_fleet(fleet.stats())
    _netguard.check(NAME)
    sent = served["paths"].get("/api/chat", 0)
    return {
        "name": NAME,
        "params": {
            "requests_per_round": requests_per_round,
            "rounds": rounds,
            "peer_rounds": peer_rounds if peers else 0,
            "target": "PooledChatOllama CPU per request <= 1.05 x bare ChatOllama",
        },
        "modes": modes,
        "fleet_cpu_ms_per_request": 1000 * fleet_cpu / max(sent, 1),
        "served": served,
        "chat_requests_expected": expected,
        "pool_machinery": pool_machinery(),
    }


def markdown(result: dict[str, Any]) -> str:
    headers = [
        "mode",
        "client",
        "CPU ms/req (median)",
        "CPU ratio to ChatOllama",
        "its quartiles",
        "CPU ratio to ChatOllama with timeouts",
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
                    fmt(row["cpu_ms_ratio_to_bare"], 3),
                    " - ".join(
                        fmt(value, 3) for value in row["cpu_ms_ratio_to_bare_quartiles"]
                    ),
                    fmt(row.get("cpu_ms_ratio_to_timeouts"), 3),
                    fmt(row["wall_ms_median"], 3),
                    fmt(row["wall_ms_ratio_to_bare"], 3),
                ]
            )
    served = result["served"]["paths"].get("/api/chat", 0)
    note = (
        f"The stand-in served {served} chat requests "
        f"({result['chat_requests_expected']} sent, warm-up rounds included), "
        f"using {result['fleet_cpu_ms_per_request']:.3f} ms of its own CPU per "
        f"request, not counted above. The pool's own machinery (choose, "
        f"reserve, release, record; no I/O) costs "
        f"{result['pool_machinery']['call_us']:.1f} us per `call` and "
        f"{result['pool_machinery']['acall_us']:.1f} us per `acall`.\n\n"
    )
    return note + table(headers, body)


def main(**options: Any) -> dict[str, Any]:
    return run(**options)
