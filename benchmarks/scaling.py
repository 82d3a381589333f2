"""Scaling: N identical instances, each serving one request at a time.

Each stand-in serves one request at a time (`parallel=1`) with a fixed service
time, so N instances can serve at most N / service_time requests per second.
Every client sends its requests with at most 2N in flight. The client and the
fleet run in separate processes, and the fleet's CPU is measured apart.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from benchmarks._clients import DirectClient, LiteLLMClient, PoolClient
from benchmarks._fleet import FleetProcess
from benchmarks._measure import Client, measure_batch
from benchmarks._report import fmt, table

NAME = "scaling"
STRATEGIES = ("round_robin", "least_active")
PEER_STRATEGIES = ("simple-shuffle", "least-busy")


def request_count(instances: int, per_instance: int, maximum: int) -> int:
    """Return the requests of one run: `per_instance` per instance, capped."""
    return min(maximum, per_instance * instances)


def _clients(urls: Sequence[str], peers: bool) -> list[Callable[[], Client]]:
    makers: list[Callable[[], Client]] = [
        partial(PoolClient, urls, strategy=strategy) for strategy in STRATEGIES
    ]
    makers.append(partial(DirectClient, urls))
    if peers:
        makers += [
            partial(LiteLLMClient, urls, routing_strategy=strategy)
            for strategy in PEER_STRATEGIES
        ]
    return makers


async def _run_one(
    make: Callable[[], Client],
    fleet: FleetProcess,
    count: int,
    concurrency: int,
    ideal: float,
) -> dict[str, Any]:
    client = make()
    try:
        row = await measure_batch(client, fleet, count, concurrency, warmup=concurrency)
    finally:
        await client.aclose()
    row["ideal_throughput"] = ideal
    row["ratio"] = row["throughput"] / ideal
    # Cores the client would need to keep up with the ideal rate.
    row["client_cores_at_ideal"] = row["client_cpu_seconds"] / row["requests"] * ideal
    return row


async def run(
    instance_counts: Sequence[int] = (1, 2, 4, 8, 16),
    service_time: float = 0.05,
    per_instance: int = 200,
    max_requests: int = 2000,
    peers: bool = True,
) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for instances in instance_counts:
        spec = [{"first_token_delay": service_time, "parallel": 1}] * instances
        count = request_count(instances, per_instance, max_requests)
        ideal = instances / service_time
        with FleetProcess(spec) as fleet:
            makers = _clients(fleet.urls, peers)
            # Rotate the order at each N, so no client always runs first.
            shift = len(rows) % len(makers)
            for make in makers[shift:] + makers[:shift]:
                row = await _run_one(make, fleet, count, 2 * instances, ideal)
                row["instances"] = instances
                rows.append(row)
                print(f"  N={instances} {_line(row)}", flush=True)
    return {
        "name": NAME,
        "params": {
            "instance_counts": list(instance_counts),
            "service_time": service_time,
            "requests": f"min({max_requests}, {per_instance} * N)",
            "concurrency": "2N",
            "target": "throughput / ideal >= 0.97 at every N",
        },
        "rows": sorted(rows, key=lambda row: (row["client"], row["instances"])),
    }


def _line(row: dict[str, Any]) -> str:
    return (
        f"{row['client']}: {row['throughput']:.1f} req/s, ratio {row['ratio']:.3f}, "
        f"client {row['client_cpu_ms_per_request']:.2f} ms CPU/req, "
        f"failed {row['failed']}"
    )


def markdown(result: dict[str, Any]) -> str:
    headers = [
        "client",
        "N",
        "requests",
        "req/s",
        "ideal",
        "ratio",
        "client CPU ms/req",
        "client cores",
        "client cores at ideal",
        "fleet cores",
        "other work (cores)",
        "failed",
    ]
    body = [
        [
            row["client"],
            row["instances"],
            row["requests"],
            fmt(row["throughput"], 1),
            fmt(row["ideal_throughput"], 0),
            fmt(row["ratio"], 3),
            fmt(row["client_cpu_ms_per_request"], 2),
            fmt(row["client_cpu_share"], 2),
            fmt(row["client_cores_at_ideal"], 2),
            fmt(row["fleet_cpu_share"], 2),
            fmt(row["other_cores"], 2),
            row["failed"],
        ]
        for row in result["rows"]
    ]
    return table(headers, body)


def main(**options: Any) -> dict[str, Any]:
    return asyncio.run(run(**options))
