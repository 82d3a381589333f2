"""Mixed fleet: instances of different speeds, every strategy.

Each stand-in serves one request at a time. The ideal throughput is the sum of
the instances' rates (1 / service time each), reached only when no instance
ever sits idle and no request waits behind the slow one while a fast one is free.
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

NAME = "mixed"
STRATEGIES = ("round_robin", "random", "least_active", "power_of_two", "peak_ewma")
PEER_STRATEGIES = ("simple-shuffle", "least-busy")


def _clients(urls: Sequence[str], peers: bool) -> list[Callable[[], Client]]:
    makers: list[Callable[[], Client]] = [
        partial(PoolClient, urls, strategy=strategy, max_in_flight_per_instance=limit)
        for limit in (None, 1)
        for strategy in STRATEGIES
    ]
    # A limit of 2 keeps one request waiting at each server (parallel=1), so an
    # instance that finishes can start the next request without a client round
    # trip.
    makers += [
        partial(PoolClient, urls, strategy=strategy, max_in_flight_per_instance=2)
        for strategy in ("round_robin", "least_active")
    ]
    makers.append(partial(DirectClient, urls))
    if peers:
        makers += [
            partial(LiteLLMClient, urls, routing_strategy=strategy)
            for strategy in PEER_STRATEGIES
        ]
    return makers


async def run(
    service_times: Sequence[float] = (0.05, 0.05, 0.05, 0.15),
    requests: int = 800,
    concurrency: int | None = None,
    peers: bool = True,
) -> dict[str, Any]:
    concurrency = concurrency or 2 * len(service_times)
    ideal = sum(1 / seconds for seconds in service_times)
    spec = [{"first_token_delay": seconds, "parallel": 1} for seconds in service_times]
    rows = []
    with FleetProcess(spec) as fleet:
        for make in _clients(fleet.urls, peers):
            client = make()
            try:
                row = await measure_batch(
                    client, fleet, requests, concurrency, warmup=concurrency
                )
            finally:
                await client.aclose()
            row["ideal_throughput"] = ideal
            row["ratio"] = row["throughput"] / ideal
            rows.append(row)
            print(
                f"  {row['client']}: {row['throughput']:.1f} req/s, "
                f"ratio {row['ratio']:.3f}, per instance "
                f"{row['served']['per_server']}, failed {row['failed']}",
                flush=True,
            )
    best = max(rows, key=lambda row: row["ratio"])
    return {
        "name": NAME,
        "params": {
            "service_times": list(service_times),
            "requests": requests,
            "concurrency": concurrency,
            "ideal_throughput": ideal,
            "target": "best strategy >= 0.92 of ideal",
        },
        "rows": rows,
        "best": {"client": best["client"], "ratio": best["ratio"]},
    }


def markdown(result: dict[str, Any]) -> str:
    headers = [
        "client",
        "req/s",
        "ratio to ideal",
        "requests per instance",
        "client CPU ms/req",
        "other work (cores)",
        "failed",
    ]
    body = [
        [
            row["client"],
            fmt(row["throughput"], 1),
            fmt(row["ratio"], 3),
            " / ".join(str(count) for count in row["served"]["per_server"]),
            fmt(row["client_cpu_ms_per_request"], 2),
            fmt(row["other_cores"], 2),
            row["failed"],
        ]
        for row in result["rows"]
    ]
    ideal = result["params"]["ideal_throughput"]
    return f"Ideal: {ideal:.1f} req/s.\n\n" + table(headers, body)


def main(**options: Any) -> dict[str, Any]:
    return asyncio.run(run(**options))
