"""The pool core: in-flight accounting, balancing, backoff and the monitor.

Most tests drive `OllamaPool.call` / `acall` / `stream` / `astream` with small
send functions and no server, so they control exactly when an attempt fails or
finishes. The rest run against stand-in servers on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import ollama
import pytest

from ollama_pool import (
    AllAttemptsFailedError,
    Instance,
    OllamaPool,
    PoolClosedError,
    PooledChatOllama,
    StreamInterruptedError,
)
from ollama_pool._balancer import Balancer
from ollama_pool._retry import RetryBudget, backoff_delay

MODEL = "llama3.2"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TracedInstance(Instance):
    """An instance that records every value its in-flight count takes."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.seen: list[int] = []
        super().__init__(*args, **kwargs)

    @property  # type: ignore[override]
    def in_flight(self) -> int:
        return self._in_flight_count

    @in_flight.setter
    def in_flight(self, value: int) -> None:
        self._in_flight_count = value
        self.seen.append(value)


def traced_pool(count: int, **options: Any) -> OllamaPool:
    """A pool of `count` traced instances on unused local ports, without a monitor."""
    instances = [
        TracedInstance(f"http://127.0.0.1:{free_port()}", MODEL) for _ in range(count)
    ]
    settings: dict[str, Any] = {
        "health_check_interval": 0,
        "backoff_base": 0.001,
        "backoff_max": 0.005,
        "retry_budget_min": 1_000_000,
        "seed": 3,
    }
    settings.update(options)
    return OllamaPool(instances, **settings)


def assert_all_released(pool: OllamaPool) -> None:
    assert pool.in_flight == 0
    for instance in pool.instances:
        assert instance.in_flight == 0
        assert isinstance(instance, TracedInstance)
        assert min(instance.seen) >= 0


class Flaky:
    """Send functions that sleep a little and sometimes fail, seeded per worker."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.lock = threading.Lock()

    def outcome(self) -> tuple[float, str]:
        with self.lock:
            return self.rng.uniform(0, 0.003), self.rng.choice(
                ["ok", "ok", "ok", "ok", "503", "500", "refused", "mine"]
            )

    @staticmethod
    def fail(kind: str) -> None:
        if kind == "503":
            raise ollama.ResponseError("server busy", 503)
        if kind == "500":
            raise ollama.ResponseError("boom", 500)
        if kind == "refused":
            raise httpx.ConnectError("connection refused")
        if kind == "mine":
            raise KeyError("an error of the caller's own code")

    def send(self, instance: Instance) -> str:
        delay, kind = self.outcome()
        time.sleep(delay)
        self.fail(kind)
        return instance.url

    async def asend(self, instance: Instance) -> str:
        delay, kind = self.outcome()
        await asyncio.sleep(delay)
        self.fail(kind)
        return instance.url

    def open_stream(self, instance: Instance) -> Iterator[dict[str, Any]]:
        delay, kind = self.outcome()
        for index in range(3):
            time.sleep(delay)
            if index == 1:
                self.fail(kind)
            yield {"index": index, "done": index == 2}

    async def aopen_stream(self, instance: Instance) -> AsyncIterator[dict[str, Any]]:
        delay, kind = self.outcome()
        for index in range(3):
            await asyncio.sleep(delay)
            if index == 1:
                self.fail(kind)
            yield {"index": index, "done": index == 2}


def is_final(item: dict[str, Any]) -> bool:
    return bool(item["done"])


EXPECTED_ERRORS = (AllAttemptsFailedError, StreamInterruptedError, KeyError)


# In-flight accounting


def test_in_flight_exact_threads_and_tasks():
    pool = traced_pool(
        3,
        max_in_flight_per_instance=2,
        eject_after_failures=1000,
        base_ejection_time=0.01,
    )
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def count(name: str) -> None:
        with lock:
            outcomes[name] += 1

    def thread_worker(seed: int) -> None:
        flaky = Flaky(seed)
        for number in range(40):
            try:
                if number % 2:
                    pool.call(flaky.send)
                else:
                    list(pool.stream(flaky.open_stream, is_final=is_final))
                count("ok")
            except EXPECTED_ERRORS:
                count("error")

    async def task_worker(seed: int, counted: bool = True) -> None:
        flaky = Flaky(seed)
        for number in range(40):
            try:
                if number % 2:
                    await pool.acall(flaky.asend)
                else:
                    stream = pool.astream(flaky.aopen_stream, is_final=is_final)
                    _ = [item async for item in stream]
                outcome = "ok"
            except EXPECTED_ERRORS:
                outcome = "error"
            if counted:
                count(outcome)

    async def tasks_with_cancellation() -> None:
        tasks = [asyncio.create_task(task_worker(100 + n)) for n in range(6)]
        victims = [
            asyncio.create_task(task_worker(200 + n, counted=False)) for n in range(3)
        ]
        await asyncio.sleep(0.05)
        for victim in victims:
            victim.cancel()
        await asyncio.gather(*tasks)
        results = await asyncio.gather(*victims, return_exceptions=True)
        assert [type(r) for r in results] == [asyncio.CancelledError] * 3

    with pool:
        threads = [threading.Thread(target=thread_worker, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        asyncio.run(tasks_with_cancellation())
        for thread in threads:
            thread.join()
        assert_all_released(pool)
    assert outcomes["ok"] > 0
    assert outcomes["error"] > 0
    assert outcomes["ok"] + outcomes["error"] == 4 * 40 + 6 * 40
    for instance in pool.instances:
        assert isinstance(instance, TracedInstance)
        assert max(instance.seen) <= 2


async def test_cancelled_while_waiting_for_slot():
    pool = traced_pool(1, max_in_flight_per_instance=1)
    release = asyncio.Event()

    async def hold(instance: Instance) -> str:
        await release.wait()
        return "done"

    async with pool:
        holder = asyncio.create_task(pool.acall(hold))
        waiters = [asyncio.create_task(pool.acall(hold)) for _ in range(5)]
        await asyncio.sleep(0.05)
        assert pool.in_flight == 1
        for waiter in waiters[:3]:
            waiter.cancel()
        await asyncio.gather(*waiters[:3], return_exceptions=True)
        release.set()
        assert await holder == "done"
        assert await asyncio.gather(*waiters[3:]) == ["done", "done"]
        assert pool._async_waiters == []
        assert_all_released(pool)


async def test_abandoned_streams_release_slots():
    pool = traced_pool(2)

    async def endless(instance: Instance) -> AsyncIterator[dict[str, Any]]:
        while True:
            await asyncio.sleep(0)
            yield {"done": False}

    def endless_sync(instance: Instance) -> Iterator[dict[str, Any]]:
        while True:
            yield {"done": False}

    async with pool:
        stream = pool.astream(endless, is_final=is_final)
        await stream.__anext__()
        assert pool.in_flight == 1
        await stream.aclose()
        sync_stream = pool.stream(endless_sync, is_final=is_final)
        next(sync_stream)
        assert pool.in_flight == 1
        sync_stream.close()
        assert_all_released(pool)


def test_close_wakes_waiting_requests():
    pool = traced_pool(1, max_in_flight_per_instance=1)
    started = threading.Event()
    release = threading.Event()
    errors: list[BaseException] = []

    def hold(instance: Instance) -> str:
        started.set()
        release.wait(5)
        return "done"

    def wait_for_slot() -> None:
        try:
            pool.call(hold)
        except PoolClosedError as exc:
            errors.append(exc)

    holder = threading.Thread(target=pool.call, args=(hold,))
    holder.start()
    assert started.wait(5)
    waiter = threading.Thread(target=wait_for_slot)
    waiter.start()
    time.sleep(0.05)
    pool.close()
    waiter.join(5)
    release.set()
    holder.join(5)
    assert not waiter.is_alive()
    assert len(errors) == 1
    assert pool.in_flight == 0


def test_in_flight_exact_against_standins(start_servers):
    servers = start_servers(2, first_token_delay=0.05, token_delay=0.01)
    pool = OllamaPool(
        [server.url for server in servers],
        model=MODEL,
        health_check_interval=0.2,
        max_in_flight_per_instance=3,
    )
    llm = PooledChatOllama(pool=pool, model=MODEL)

    thread_errors: list[BaseException] = []

    def sync_worker(seed: int) -> None:
        try:
            for number in range(6):
                if number % 2:
                    assert llm.invoke(f"sync {seed} {number}").content
                else:
                    for _ in llm.stream(f"abandoned {seed} {number} one two three"):
                        break
        except BaseException as exc:
            thread_errors.append(exc)

    async def async_side() -> None:
        tasks = [asyncio.create_task(llm.ainvoke(f"task {n}")) for n in range(12)]
        await asyncio.sleep(0.08)
        for task in tasks[::3]:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        async for _ in llm.astream("abandoned async one two three"):
            break
        # aclose() also closes the clients the sync threads use, so it waits
        # for them: closing a model while other threads still call it is an error.
        for thread in threads:
            await asyncio.to_thread(thread.join)
        await llm.aclose()

    threads = [threading.Thread(target=sync_worker, args=(n,)) for n in range(3)]
    try:
        for thread in threads:
            thread.start()
        asyncio.run(async_side())
        assert thread_errors == []
        assert pool.in_flight == 0
        assert [i.in_flight for i in pool.instances] == [0, 0]
        assert all(i.successes > 0 for i in pool.instances)
    finally:
        llm.close()
        pool.close()


# Balancing


def idle_instances(count: int) -> list[Instance]:
    return [
        Instance(f"http://127.0.0.1:{11434 + n}", MODEL, index=n) for n in range(count)
    ]


def test_least_active_ties_spread_evenly():
    instances = idle_instances(4)
    balancer = Balancer("least_active", random.Random(1))
    picks = Counter(balancer.pick(instances).index for _ in range(400))
    assert picks == {0: 100, 1: 100, 2: 100, 3: 100}


def test_least_active_picks_fewest_in_flight():
    instances = idle_instances(3)
    for instance, load in zip(instances, [3, 1, 2], strict=True):
        instance.in_flight = load
    balancer = Balancer("least_active", random.Random(1))
    assert {balancer.pick(instances).index for _ in range(30)} == {1}


def test_pool_least_active_spreads_sequential_calls():
    pool = traced_pool(3, strategy="least_active")
    with pool:
        served = Counter(pool.call(lambda i: i.index) for _ in range(30))
    assert served == {0: 10, 1: 10, 2: 10}


def test_power_of_two_prefers_less_loaded():
    balancer = Balancer("power_of_two", random.Random(5))
    pair = idle_instances(2)
    pair[1].in_flight = 4
    assert {balancer.pick(pair).index for _ in range(50)} == {0}

    four = idle_instances(4)
    for instance in four[1:]:
        instance.in_flight = 4
    picks = Counter(balancer.pick(four).index for _ in range(2000))
    # The idle instance wins whenever it is one of the two sampled: 3 pairs of 6.
    assert 900 <= picks[0] <= 1100


def test_power_of_two_spreads_ties():
    balancer = Balancer("power_of_two", random.Random(5))
    instances = idle_instances(4)
    picks = Counter(balancer.pick(instances).index for _ in range(2000))
    assert set(picks) == {0, 1, 2, 3}
    assert min(picks.values()) >= 350


# Backoff and the retry budget


@pytest.mark.parametrize("round_number", range(2, 10))
def test_backoff_delay_within_bounds(round_number):
    rng = random.Random(round_number)
    ceiling = min(10.0, 0.5 * 2 ** (round_number - 2))
    delays = [backoff_delay(round_number, 0.5, 10.0, rng) for _ in range(500)]
    assert min(delays) >= ceiling / 2
    assert max(delays) <= ceiling
    # Jitter: the delays spread over the whole upper half.
    assert min(delays) < ceiling * 0.55
    assert max(delays) > ceiling * 0.95


def test_retry_budget_counts_window():
    budget = RetryBudget(ratio=0.2, minimum=2, window=10.0)
    for _ in range(10):
        budget.record_request(now=100.0)
    spent = [budget.try_spend(now=100.5) for _ in range(6)]
    assert spent == [True, True, True, True, False, False]
    # Once the window has passed, only the minimum is left.
    assert budget.try_spend(now=111.0)
    assert budget.try_spend(now=111.0)
    assert not budget.try_spend(now=111.0)


# Failure counting


def test_success_resets_failure_count():
    pool = traced_pool(1, eject_after_failures=3, max_retries=0)
    script = iter(["500", "500", "ok", "500", "500", "ok"])

    def send(instance: Instance) -> str:
        if next(script) == "500":
            raise ollama.ResponseError("boom", 500)
        return "ok"

    results = []
    with pool:
        for _ in range(6):
            try:
                results.append(pool.call(send))
            except AllAttemptsFailedError:
                results.append("failed")
        instance = pool.instances[0]
        assert instance.healthy
        assert instance.ejections == 0
    assert results == ["failed", "failed", "ok", "failed", "failed", "ok"]


def test_missing_model_mark_expires():
    pool = traced_pool(2, max_ejection_time=0.2)
    first = pool.instances[0]
    lacks = {"yes"}

    def send(instance: Instance) -> str:
        if instance is first and lacks:
            raise ollama.ResponseError("model 'llama3.2' not found", 404)
        return instance.url

    with pool:
        assert pool.call(send, model=MODEL) != first.url
        assert not first.serves("llama3.2:latest")
        served = {pool.call(send, model=MODEL) for _ in range(4)}
        assert first.url not in served
        lacks.clear()
        time.sleep(0.25)
        assert first.serves("llama3.2:latest")
        served = {pool.call(send, model=MODEL) for _ in range(4)}
    assert first.url in served


async def test_busy_answer_sets_limit_then_grows():
    pool = traced_pool(1, max_retries=5, backoff_base=0.01, backoff_max=0.02)
    instance = pool.instances[0]
    gate = asyncio.Event()
    rejected: list[int] = []

    async def send(instance: Instance) -> str:
        if instance.in_flight == 4 and not rejected:
            rejected.append(instance.in_flight)
            raise ollama.ResponseError("server busy", 503)
        await gate.wait()
        return "ok"

    async def slow(instance: Instance) -> str:
        await asyncio.sleep(0.01)
        return "ok"

    async with pool:
        tasks = [asyncio.create_task(pool.acall(send)) for _ in range(4)]
        await asyncio.sleep(0.05)
        assert rejected == [4]
        assert instance.busy_limit == 3
        assert instance.in_flight == 3
        assert instance.healthy
        gate.set()
        assert await asyncio.gather(*tasks) == ["ok"] * 4
        # Requests that fill the limit and succeed raise it by about one per
        # `limit` successes; requests below the limit do not.
        assert await pool.acall(send) == "ok"
        assert instance.busy_limit == 3
        more = [asyncio.create_task(pool.acall(slow)) for _ in range(12)]
        assert await asyncio.gather(*more) == ["ok"] * 12
        assert instance.busy_limit is not None
        assert 4 <= instance.busy_limit < 7
        assert_all_released(pool)


# The health monitor


def monitor_threads() -> list[threading.Thread]:
    return [
        thread
        for thread in threading.enumerate()
        if thread.name == "ollama-pool-health" and thread.is_alive()
    ]


def test_monitor_probes_only_version(start_servers):
    servers = start_servers(2)
    pool = OllamaPool([s.url for s in servers], model=MODEL, health_check_interval=0.05)
    llm = PooledChatOllama(pool=pool, model=MODEL)
    try:
        time.sleep(0.2)
        assert not pool.monitor_running
        assert all(s.stats.requests["/api/version"] == 0 for s in servers)
        llm.invoke("start the monitor")
        assert pool.monitor_running
        deadline = time.monotonic() + 5
        while any(s.stats.requests["/api/version"] < 3 for s in servers):
            assert time.monotonic() < deadline, "the monitor did not probe"
            time.sleep(0.02)
    finally:
        llm.close()
        pool.close()
    assert monitor_threads() == []
    probes = [s.stats.requests["/api/version"] for s in servers]
    time.sleep(0.2)
    assert [s.stats.requests["/api/version"] for s in servers] == probes
    for server in servers:
        assert set(server.stats.requests) <= {"/api/version", "/api/chat"}
    assert sum(s.stats.requests["/api/chat"] for s in servers) == 1


def run_one_call(pool: OllamaPool) -> None:
    pool.call(lambda instance: instance.url)


@pytest.mark.parametrize("ending", ["close", "with", "aclose", "async-with"])
def test_monitor_stops_with_pool(ending):
    pool = OllamaPool(
        [f"http://127.0.0.1:{free_port()}"], model=MODEL, health_check_interval=0.05
    )
    if ending == "close":
        run_one_call(pool)
        assert pool.monitor_running
        pool.close()
    elif ending == "with":
        with pool:
            run_one_call(pool)
            assert pool.monitor_running
    elif ending == "aclose":

        async def use_then_aclose() -> None:
            await pool.acall(_async_url)
            assert pool.monitor_running
            await pool.aclose()

        asyncio.run(use_then_aclose())
    else:

        async def use_in_block() -> None:
            async with pool:
                await pool.acall(_async_url)
                assert pool.monitor_running

        asyncio.run(use_in_block())
    assert not pool.monitor_running
    assert monitor_threads() == []
    with pytest.raises(PoolClosedError):
        run_one_call(pool)


async def _async_url(instance: Instance) -> str:
    return instance.url
