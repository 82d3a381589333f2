"""Failure: one of the instances stops a third of the way in and returns at two thirds.

The fleet process itself stops the server once the fleet has admitted a third of
the requests and starts it again at two thirds, so the timing does not depend
on the client. The ideal counts only the instance-seconds when servers were up:
`(instances * wall - down_seconds) / service_time` requests.
"""

from __future__ import annotations

import asyncio
from typing import Any

from benchmarks._clients import PoolClient
from benchmarks._fleet import FleetProcess
from benchmarks._measure import measure_batch
from benchmarks._report import fmt, table

NAME = "failure"


def _attempts(client: PoolClient) -> int:
    return sum(stats["requests"] for stats in client.llm.pool.stats())


async def _run_strategy(
    strategy: str,
    instances: int,
    service_time: float,
    requests: int,
    health_check_interval: float,
) -> dict[str, Any]:
    spec = [{"first_token_delay": service_time, "parallel": 1}] * instances
    victim = instances - 1
    concurrency = 2 * instances
    with FleetProcess(spec) as fleet:
        client = PoolClient(
            fleet.urls, strategy=strategy, health_check_interval=health_check_interval
        )

        attempts_before = 0

        def schedule() -> None:
            nonlocal attempts_before
            attempts_before = _attempts(client)
            fleet.command(
                "schedule",
                index=victim,
                stop_at=requests // 3,
                start_at=2 * requests // 3,
            )

        try:
            row = await measure_batch(
                client,
                fleet,
                requests,
                concurrency,
                warmup=concurrency,
                on_start=schedule,
            )
            attempts = _attempts(client) - attempts_before
            failures = sum(stats["failures"] for stats in client.llm.pool.stats())
        finally:
            await client.aclose()
        schedule_report = fleet.stats()["schedules"][0]
    down = schedule_report["down_seconds"] or 0.0
    up_instance_seconds = instances * row["wall_seconds"] - down
    ideal_requests = up_instance_seconds / service_time
    row.update(
        strategy=strategy,
        down_seconds=down,
        restarted=schedule_report["restarted"],
        mean_instances_up=up_instance_seconds / row["wall_seconds"],
        ideal_throughput=ideal_requests / row["wall_seconds"],
        ratio=requests / ideal_requests,
        pool_failures=failures,
        pool_attempts=attempts,
    )
    return row


async def run(
    instances: int = 4,
    service_time: float = 0.05,
    requests: int = 2400,
    health_check_interval: float = 1.0,
    strategies: tuple[str, ...] = ("round_robin", "least_active"),
) -> dict[str, Any]:
    rows = []
    for strategy in strategies:
        row = await _run_strategy(
            strategy, instances, service_time, requests, health_check_interval
        )
        rows.append(row)
        print(
            f"  {row['client']}: failed {row['failed']}, ratio {row['ratio']:.3f}, "
            f"down {row['down_seconds']:.1f} s, attempts {row['pool_attempts']}",
            flush=True,
        )
    return {
        "name": NAME,
        "params": {
            "instances": instances,
            "service_time": service_time,
            "requests": requests,
            "concurrency": 2 * instances,
            "health_check_interval": health_check_interval,
            "target": "no failed request",
        },
        "rows": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    headers = [
        "client",
        "requests",
        "failed",
        "attempts (retries)",
        "down s",
        "wall s",
        "mean instances up",
        "req/s",
        "ideal while up",
        "ratio",
        "other work (cores)",
    ]
    body = [
        [
            row["client"],
            row["requests"],
            row["failed"],
            f"{row['pool_attempts']} ({row['pool_attempts'] - row['requests']})",
            fmt(row["down_seconds"], 1),
            fmt(row["wall_seconds"], 1),
            fmt(row["mean_instances_up"], 2),
            fmt(row["throughput"], 1),
            fmt(row["ideal_throughput"], 1),
            fmt(row["ratio"], 3),
            fmt(row["other_cores"], 2),
        ]
        for row in result["rows"]
    ]
    return table(headers, body)


def main(**options: Any) -> dict[str, Any]:
    return asyncio.run(run(**options))
