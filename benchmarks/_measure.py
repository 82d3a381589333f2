"""Timed batch runs: wall time, client CPU, fleet CPU and what the fleet served."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from benchmarks import _machine, _netguard
from benchmarks._fleet import FleetProcess


class Client(Protocol):
    name: str

    async def run(self, prompts: Sequence[str], concurrency: int) -> list[Any]: ...

    async def aclose(self) -> None: ...


def prompts(count: int, tag: str = "q") -> list[str]:
    return [f"{tag} {index}: what is {index} plus one?" for index in range(count)]


def _failures(results: Sequence[Any]) -> tuple[int, list[str]]:
    errors = [result for result in results if isinstance(result, BaseException)]
    kinds = Counter(f"{type(error).__name__}: {str(error)[:160]}" for error in errors)
    return len(errors), [f"{count} x {kind}" for kind, count in kinds.most_common(5)]


def served_by_fleet(stats: dict[str, Any]) -> dict[str, Any]:
    """Sum the fleet's counters; every server listens on 127.0.0.1."""
    hosts = {server["host"] for server in stats["servers"]}
    per_server = [server["chat_requests"] for server in stats["servers"]]
    paths: Counter[str] = Counter()
    for server in stats["servers"]:
        paths.update(server["requests"])
    return {
        "hosts": sorted(hosts),
        "chat_requests": sum(per_server),
        "per_server": per_server,
        "paths": dict(paths),
    }


async def measure_batch(
    client: Client,
    fleet: FleetProcess,
    count: int,
    concurrency: int,
    *,
    warmup: int = 0,
    on_start: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Send `count` requests through `client` and time them.

    It first waits for a quiet machine (see `_machine.settle`). A warm-up of
    `warmup` requests then opens the connections; the fleet's
    counters are reset after it, so they count the measured requests only.
    `on_start` runs after that reset, just before the timed requests.
    """
    busy_before = _machine.settle()
    if warmup:
        await client.run(prompts(warmup, "warm-up"), concurrency)
    fleet.command("reset")
    _netguard.check(client.name)
    if on_start is not None:
        on_start()

    load = _machine.MachineLoad()
    load.start()
    fleet_cpu_before = fleet.cpu_seconds()
    cpu_before = time.process_time()
    started = time.perf_counter()
    results = await client.run(prompts(count), concurrency)
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu_before
    fleet_cpu = fleet.cpu_seconds() - fleet_cpu_before
    busy_cores = load.busy_cores()

    _netguard.check(client.name)
    failed, errors = _failures(results)
    served = served_by_fleet(fleet.stats())
    return {
        "client": client.name,
        "requests": count,
        "concurrency": concurrency,
        "failed": failed,
        "errors": errors,
        "wall_seconds": wall,
        "throughput": count / wall,
        "client_cpu_seconds": cpu,
        "client_cpu_ms_per_request": 1000 * cpu / count,
        "client_cpu_share": cpu / wall,
        "fleet_cpu_seconds": fleet_cpu,
        "fleet_cpu_share": fleet_cpu / wall,
        "served": served,
        "busy_cores_before": busy_before,
        "machine_busy_cores": busy_cores,
        # Cores used by other processes on the machine while the batch ran.
        "other_cores": max(0.0, busy_cores - (cpu + fleet_cpu) / wall),
    }
