"""How the pool survives the ways real Ollama servers fail.

Each test scripts one fault on stand-in servers on 127.0.0.1 (see
docs/reliability.md for the list) and checks that callers get complete answers,
in order, and that the faulty instance is treated as the fault deserves.
Times are scaled down from what real servers show, keeping their ratios.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from click.testing import CliRunner
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage

from ollama_pool import (
    AllAttemptsFailedError,
    NoInstanceError,
    OllamaPool,
    PooledChatOllama,
    StreamInterruptedError,
)
from ollama_pool._manager import InstanceManager
from ollama_pool.cli import main as cli_main
from ollama_pool.testing import ChatRequest, StandInServer

StartServers = Callable[..., list[StandInServer]]

MODEL = "llama3.2"
BUSY_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"
RUNNER_START_TIMEOUT = "timed out waiting for llama runner to start"
# A reply that differs from the echo of a healthy server, so text from a failed
# attempt would show in the answer.
PARTIAL_REPLY = "partial words that never finish"
SOURCE = Path(__file__).resolve().parents[1] / "src" / "ollama_pool"


class Pooled:
    """A pool with short waits and a PooledChatOllama on it; closes both.

    `targets` are servers or URLs. Works as `with` and `async with`; keyword
    arguments override OllamaPool arguments.
    """

    def __init__(self, targets: list[StandInServer | str], **pool_options: Any):
        options: dict[str, Any] = {
            "model": MODEL,
            "health_check_interval": 0.5,
            "backoff_base": 0.01,
            "backoff_max": 0.05,
            "seed": 7,
        }
        options.update(pool_options)
        urls = [t if isinstance(t, str) else t.url for t in targets]
        self.pool = OllamaPool(urls, **options)
        self.llm = PooledChatOllama(pool=self.pool, model=MODEL)

    def __enter__(self) -> PooledChatOllama:
        return self.llm

    def __exit__(self, *exc_info: object) -> None:
        self.llm.close()
        self.pool.close()

    async def __aenter__(self) -> PooledChatOllama:
        return self.llm

    async def __aexit__(self, *exc_info: object) -> None:
        await self.llm.aclose()
        await self.pool.aclose()


def served_by(messages: list[Any]) -> Counter[str]:
    return Counter(m.response_metadata["instance"] for m in messages)


def prompt_of(request: ChatRequest) -> str:
    return str(request.messages[-1].get("content", ""))


def ejection_messages(caplog: pytest.LogCaptureFixture, url: str) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if "left the rotation" in record.getMessage() and url in record.getMessage()
    ]


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll `condition` every 10 ms for up to `timeout` seconds; return its value."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class InFlightSampler:
    """Records the pool's in-flight count of each instance every few ms."""

    def __init__(self, pool: OllamaPool):
        self._pool = pool
        self.samples: list[list[int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="in-flight-sampler")

    def _run(self) -> None:
        while not self._stop.is_set():
            counts = [instance.in_flight for instance in self._pool.instances]
            self.samples.append(counts)
            self._stop.wait(0.002)

    def __enter__(self) -> InFlightSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def maximum(self, index: int) -> int:
        return max(sample[index] for sample in self.samples)


# Case 1: one instance is busy beyond two requests in flight


async def test_busy_instance_stays_in_rotation(start_servers, caplog):
    busy = start_servers(1, parallel=2, max_queue=0, first_token_delay=0.05)[0]
    others = start_servers(2, first_token_delay=0.05)
    caplog.set_level(logging.DEBUG, logger="ollama_pool")
    prompts = [f"question {n}" for n in range(60)]
    async with Pooled([busy, *others]) as llm:
        answers = await llm.abatch(prompts, config={"max_concurrency": 20})
        instance = llm.pool.instances[0]
        assert instance.healthy
        assert instance.ejections == 0
        assert instance.busy_limit is not None
        assert instance.busy_limit >= 2
    assert [a.content for a in answers] == [f"echo: {p}" for p in prompts]
    assert busy.stats.rejected_busy >= 1
    assert busy.url in served_by(answers)
    assert ejection_messages(caplog, busy.url) == []


# Case 2: every instance returns 503 under a burst


async def test_burst_on_busy_fleet_all_answered(start_servers, caplog):
    # Each server holds 4 requests (2 generating, 2 queued) and rejects the rest;
    # the pool is configured with 8, as when OLLAMA_NUM_PARALLEL is lower than
    # the pool's setting assumes.
    servers = start_servers(4, parallel=2, max_queue=2, first_token_delay=0.05)
    caplog.set_level(logging.INFO, logger="ollama_pool")
    prompts = [f"burst {n}" for n in range(1000)]
    pooled = Pooled(servers, max_in_flight_per_instance=8, backoff_base=0.05)
    async with pooled as llm:
        with InFlightSampler(llm.pool) as sampler:
            answers = await llm.abatch(prompts, config={"max_concurrency": 1000})
        assert llm.pool.in_flight == 0
        assert all(instance.healthy for instance in llm.pool.instances)
    assert [a.content for a in answers] == [f"echo: {p}" for p in prompts]
    for index, server in enumerate(servers):
        assert server.stats.rejected_busy >= 1, f"server {index} was never busy"
        assert sampler.maximum(index) <= 8
    # The pool backs off: after a busy answer, requests wait in the pool for a
    # slot instead of bouncing between busy servers.
    rejected = sum(server.stats.rejected_busy for server in servers)
    assert rejected < 250
    assert not [r for r in caplog.records if "left the rotation" in r.getMessage()]


async def test_burst_without_limit_learns_busy_limit(start_servers):
    servers = start_servers(2, parallel=2, max_queue=2, first_token_delay=0.05)
    prompts = [f"burst {n}" for n in range(200)]
    async with Pooled(servers) as llm:
        answers = await llm.abatch(prompts, config={"max_concurrency": 200})
        limits = [instance.limit for instance in llm.pool.instances]
    assert [a.content for a in answers] == [f"echo: {p}" for p in prompts]
    for limit in limits:
        assert limit is not None
        assert limit < 50
    attempts = sum(server.stats.requests["/api/chat"] for server in servers)
    assert attempts < 3 * len(prompts)


# Case 3: a slow instance next to a fast one


async def test_least_active_avoids_slow_instance(start_servers):
    # 30 s against 0.1 s per request on real servers, scaled to 3 s and 0.05 s.
    slow = start_servers(1, parallel=2, max_queue=0, first_token_delay=3.0)[0]
    fast = start_servers(1, parallel=2, max_queue=0, first_token_delay=0.05)[0]
    pooled = Pooled([slow, fast], strategy="least_active", max_in_flight_per_instance=2)
    async with pooled as llm:
        answers = await asyncio.gather(*(llm.ainvoke(f"q{n}") for n in range(20)))
    assert [a.content for a in answers] == [f"echo: q{n}" for n in range(20)]
    counts = served_by(answers)
    assert counts[fast.url] >= 18
    assert slow.stats.requests["/api/chat"] <= 2
    # Requests waited in the pool: neither server queued or rejected one.
    assert slow.stats.rejected_busy == 0
    assert fast.stats.rejected_busy == 0


# Case 4: one instance lacks the model


def test_missing_model_skipped_after_404(start_servers, caplog):
    lacking = start_servers(1, models=["other:latest"])[0]
    having = start_servers(2)
    caplog.set_level(logging.INFO, logger="ollama_pool")
    with Pooled([lacking, *having], health_check_interval=0.1) as llm:
        answers = [llm.invoke(f"m{n}") for n in range(9)]
        assert lacking.stats.requests["/api/chat"] == 1
        assert [a.content for a in answers] == [f"echo: m{n}" for n in range(9)]
        assert lacking.url not in served_by(answers)
        instance = llm.pool.instances[0]
        # The monitor requests /api/tags of the lacking instance, and the model
        # stays missing until it is pulled there.
        assert wait_until(lambda: lacking.stats.requests["/api/tags"] >= 2, 5.0)
        assert instance.lacks("llama3.2:latest", time.monotonic())

        response = httpx.post(
            f"{lacking.url}/api/pull", json={"model": MODEL, "stream": False}
        )
        assert response.status_code == 200

        def now_listed() -> bool:
            return not instance.lacks("llama3.2:latest", time.monotonic())

        assert wait_until(now_listed, 5.0)
        later = llm.batch([f"r{n}" for n in range(6)], config={"max_concurrency": 1})
    assert lacking.url in served_by(later)
    assert any(
        "lists model llama3.2:latest again" in r.getMessage() for r in caplog.records
    )


def test_model_missing_everywhere_one_error(start_servers):
    servers = start_servers(2, models=["other:latest"])
    with Pooled(servers) as llm, pytest.raises(NoInstanceError) as info:
        llm.invoke("hi")
    message = str(info.value)
    assert "llama3.2" in message
    for server in servers:
        assert server.url in message
        assert server.stats.requests["/api/chat"] == 1


# Case 5: a stream breaks after two chunks


BROKEN_STREAMS = [
    pytest.param({"error_after_chunks": 2}, id="error-line"),
    pytest.param({"close_after_chunks": 2}, id="closed-socket"),
]


class TokenRecorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)


async def collect_astream(llm: PooledChatOllama, prompt: str, into: list[str]) -> None:
    async for chunk in llm.astream(prompt):
        into.append(str(chunk.content))


def collect_stream(llm: PooledChatOllama, prompt: str, into: list[str]) -> None:
    for chunk in llm.stream(prompt):
        into.append(str(chunk.content))


@pytest.mark.parametrize("fault", BROKEN_STREAMS)
def test_broken_stream_invoke_retries_whole(start_servers, fault):
    broken = start_servers(1, reply=PARTIAL_REPLY, **fault)[0]
    good = start_servers(1)[0]
    recorder = TokenRecorder()
    with Pooled([broken, good]) as llm:
        message = llm.invoke("complete me", config={"callbacks": [recorder]})
    assert broken.stats.requests["/api/chat"] == 1
    assert message.content == "echo: complete me"
    assert message.response_metadata["instance"] == good.url
    assert "".join(recorder.tokens) == "echo: complete me"


@pytest.mark.parametrize("fault", BROKEN_STREAMS)
async def test_broken_stream_ainvoke_retries_whole(start_servers, fault):
    broken = start_servers(1, reply=PARTIAL_REPLY, **fault)[0]
    good = start_servers(1)[0]
    async with Pooled([broken, good]) as llm:
        message = await llm.ainvoke("complete me")
    assert broken.stats.requests["/api/chat"] == 1
    assert message.content == "echo: complete me"


@pytest.mark.parametrize("fault", BROKEN_STREAMS)
async def test_broken_astream_raises_after_chunks(start_servers, fault):
    broken = start_servers(1, reply=PARTIAL_REPLY, **fault)[0]
    good = start_servers(1)[0]
    received: list[str] = []
    async with Pooled([broken, good]) as llm:
        with pytest.raises(StreamInterruptedError) as info:
            await collect_astream(llm, "x", received)
        assert llm.pool.in_flight == 0
    assert len(received) == 2
    assert info.value.chunks == 2
    assert good.stats.requests["/api/chat"] == 0


@pytest.mark.parametrize("fault", BROKEN_STREAMS)
def test_broken_stream_raises_after_chunks(start_servers, fault):
    broken = start_servers(1, reply=PARTIAL_REPLY, **fault)[0]
    received: list[str] = []
    with Pooled([broken]) as llm:
        with pytest.raises(StreamInterruptedError):
            collect_stream(llm, "x", received)
        assert llm.pool.in_flight == 0
    assert len(received) == 2


# Case 6: failures before the first byte of a stream


def test_stream_fails_over_on_refused_connection(start_servers):
    good = start_servers(1)[0]
    with Pooled([f"http://127.0.0.1:{free_port()}", good]) as llm:
        chunks = list(llm.stream("fresh stream"))
        refused = llm.pool.instances[0]
        assert refused.failures == 1
        assert not refused.healthy
    assert "".join(str(c.content) for c in chunks) == "echo: fresh stream"


async def test_astream_fails_over_on_refused_connection(start_servers):
    good = start_servers(1)[0]
    async with Pooled([f"http://127.0.0.1:{free_port()}", good]) as llm:
        chunks = [c async for c in llm.astream("fresh stream")]
        assert llm.pool.instances[0].failures == 1
    assert "".join(str(c.content) for c in chunks) == "echo: fresh stream"


async def test_astream_fails_over_on_503(start_servers):
    busy = start_servers(1, fail_status=503, fail_message=BUSY_MESSAGE)[0]
    good = start_servers(1)[0]
    async with Pooled([busy, good]) as llm:
        chunks = [c async for c in llm.astream("fresh stream")]
    assert busy.stats.scripted_failures == 1
    assert "".join(str(c.content) for c in chunks) == "echo: fresh stream"
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    assert merged.response_metadata["instance"] == good.url


# Case 7: headers, then silence


def test_stalled_instance_ejected_until_probe(start_servers, caplog):
    stalled = start_servers(1, stall_after_headers=True)[0]
    good = start_servers(1)[0]
    caplog.set_level(logging.INFO, logger="ollama_pool")
    pooled = Pooled(
        [stalled, good],
        read_timeout=0.5,
        health_check_interval=0.1,
        base_ejection_time=2.0,
    )
    with pooled as llm:
        instance = llm.pool.instances[0]
        first = llm.batch([f"s{n}" for n in range(20)], config={"max_concurrency": 4})
        sent_before_ejection = stalled.stats.requests["/api/chat"]
        assert not instance.healthy
        # While ejected, the instance gets nothing, although it answers probes.
        during = llm.batch([f"d{n}" for n in range(10)], config={"max_concurrency": 4})
        assert stalled.stats.requests["/api/chat"] == sent_before_ejection

        # After the ejection time, a successful probe lets it back on probation:
        # one trial request, which stalls, times out and ejects it for longer.
        assert wait_until(lambda: instance.healthy, 10.0)
        assert instance.on_probation
        trial = llm.batch([f"t{n}" for n in range(10)], config={"max_concurrency": 4})
        assert stalled.stats.requests["/api/chat"] == sent_before_ejection + 1
        assert not instance.healthy
    for name, answers, count in [("s", first, 20), ("d", during, 10), ("t", trial, 10)]:
        assert [a.content for a in answers] == [
            f"echo: {name}{n}" for n in range(count)
        ]
    assert 1 <= sent_before_ejection <= 4
    ejections = ejection_messages(caplog, stalled.url)
    assert len(ejections) == 2
    assert "for 2.0 s" in ejections[0]
    assert "ReadTimeout" in ejections[0]
    assert "for 4.0 s" in ejections[1]
    probed = "back in rotation on probation: a probe succeeded"
    assert any(probed in r.getMessage() for r in caplog.records)


# Case 8: a late first chunk, then a long steady stream


@pytest.mark.parametrize("mode", ["ainvoke", "astream"])
async def test_late_first_chunk_long_stream_finishes(start_servers, mode):
    # A real server: first chunk after 45 s, then minutes of steady chunks,
    # against the default read_timeout of 300 s. Scaled by 1/200: 0.225 s, 40
    # chunks 0.05 s apart, read_timeout 1.5 s, so the whole answer takes longer
    # than the read timeout while no gap between chunks does.
    words = " ".join(f"w{n}" for n in range(40))
    server = start_servers(1, first_token_delay=0.225, token_delay=0.05, reply=words)[0]
    pool = OllamaPool([server.url], model=MODEL, read_timeout=1.5)
    llm = PooledChatOllama(pool=pool, model=MODEL)
    try:
        if mode == "ainvoke":
            text = str((await llm.ainvoke("long answer")).content)
        else:
            text = "".join([str(c.content) async for c in llm.astream("long answer")])
        assert pool.instances[0].failures == 0
    finally:
        await llm.aclose()
        await pool.aclose()
    assert text == words
    assert server.stats.requests["/api/chat"] == 1


# Case 9: "timed out waiting for llama runner to start"


def test_runner_start_timeout_retried_elsewhere(start_servers, caplog):
    bad = start_servers(
        1, fail_status=500, fail_message=RUNNER_START_TIMEOUT, fail_delay=0.2
    )[0]
    good = start_servers(1)[0]
    caplog.set_level(logging.INFO, logger="ollama_pool")
    with Pooled([bad, good], health_check_interval=30) as llm:
        answers = llm.batch([f"r{n}" for n in range(6)], config={"max_concurrency": 1})
        assert not llm.pool.instances[0].healthy
    assert [a.content for a in answers] == [f"echo: r{n}" for n in range(6)]
    assert set(served_by(answers)) == {good.url}
    # Error answers eject after eject_after_failures (3) in a row.
    assert bad.stats.scripted_failures == 3
    ejections = ejection_messages(caplog, bad.url)
    assert len(ejections) == 1
    assert RUNNER_START_TIMEOUT in ejections[0]


async def test_runner_start_timeout_ainvoke(start_servers):
    bad = start_servers(
        1, fail_status=500, fail_message=RUNNER_START_TIMEOUT, fail_delay=0.2
    )[0]
    good = start_servers(1)[0]
    async with Pooled([bad, good]) as llm:
        message = await llm.ainvoke("x")
    assert bad.stats.scripted_failures == 1
    assert message.content == "echo: x"


# Case 10: event loops that come and go, and threads


def test_event_loops_and_threads_share_pool(start_servers):
    servers = start_servers(2, first_token_delay=0.02)
    results: dict[str, list[Any]] = {}
    # One slot per instance makes requests wait for slots across loops and threads.
    with Pooled(servers, max_in_flight_per_instance=1) as llm:
        first = asyncio.run(llm.abatch([f"a{n}" for n in range(6)]))
        second = asyncio.run(llm.abatch([f"b{n}" for n in range(6)]))

        def run_loop() -> None:
            results["async"] = asyncio.run(llm.abatch([f"t{n}" for n in range(8)]))

        thread = threading.Thread(target=run_loop)
        thread.start()
        sync = [llm.invoke(f"s{n}") for n in range(8)]
        thread.join()
        assert llm.pool.in_flight == 0
    assert [a.content for a in first] == [f"echo: a{n}" for n in range(6)]
    assert [a.content for a in second] == [f"echo: b{n}" for n in range(6)]
    assert [a.content for a in sync] == [f"echo: s{n}" for n in range(8)]
    assert [a.content for a in results["async"]] == [f"echo: t{n}" for n in range(8)]


# Case 11: per-input failures in abatch with return_exceptions


async def test_abatch_failures_stay_at_their_index(start_servers):
    seen: Counter[str] = Counter()
    lock = threading.Lock()

    def fail_if(request: ChatRequest) -> bool:
        prompt = prompt_of(request)
        with lock:
            seen[prompt] += 1
            count = seen[prompt]
        if prompt == "input 4":
            return True
        return prompt in ("input 1", "input 3") and count == 1

    servers = start_servers(
        2, fail_status=503, fail_message=BUSY_MESSAGE, fail_if=fail_if
    )
    inputs = [f"input {n}" for n in range(5)]
    async with Pooled(servers) as llm:
        outputs = await llm.abatch(inputs, return_exceptions=True)
    for index in range(4):
        assert isinstance(outputs[index], AIMessage)
        assert outputs[index].content == f"echo: input {index}"
    error = outputs[4]
    assert isinstance(error, AllAttemptsFailedError)
    assert {url for url, _ in error.attempts} == {s.url for s in servers}
    assert seen["input 0"] == 1
    assert seen["input 1"] == 2
    assert seen["input 3"] == 2


# Mechanisms: ejection, the retry budget


def test_repeated_ejections_last_longer():
    ports = [free_port(), free_port()]
    pool = OllamaPool(
        [f"http://127.0.0.1:{port}" for port in ports],
        model=MODEL,
        health_check_interval=0,
        base_ejection_time=0.05,
        max_ejection_time=0.12,
    )
    flapping = pool.instances[0]
    durations: list[float] = []

    def send(instance: Any) -> str:
        if instance is flapping:
            raise httpx.ConnectError("connection refused")
        return "ok"

    with pool:
        for _ in range(3):
            assert wait_until(lambda: time.monotonic() >= flapping.ejected_until, 1.0)
            ejections = flapping.ejections
            calls = 0
            while flapping.ejections == ejections and calls < 10:
                assert pool.call(send) == "ok"
                calls += 1
            durations.append(flapping.ejected_until - flapping.ejected_at)
    assert durations == pytest.approx([0.05, 0.10, 0.12])
    # A flapping instance costs one request per return.
    assert flapping.requests == 3


def test_every_instance_ejected_still_served():
    pool = OllamaPool(
        [f"http://127.0.0.1:{free_port()}" for _ in range(2)],
        model=MODEL,
        health_check_interval=0,
        base_ejection_time=60,
        max_retries=0,
    )
    recovered = threading.Event()

    def send(instance: Any) -> str:
        if not recovered.is_set():
            raise httpx.ConnectError("connection refused")
        return instance.url

    with pool:
        with pytest.raises(AllAttemptsFailedError):
            pool.call(send)
        assert [i.healthy for i in pool.instances] == [False, False]
        oldest = min(pool.instances, key=lambda i: i.last_failure_at)
        recovered.set()
        assert pool.call(send) == oldest.url
        assert oldest.healthy
        assert sum(i.healthy for i in pool.instances) == 1


async def test_retry_budget_caps_outage_load(start_servers):
    servers = start_servers(2, fail_status=500, fail_message="boom")
    pooled = Pooled(servers, retry_budget_min=5, retry_budget_ratio=0.1)
    async with pooled as llm:
        outputs = await llm.abatch(
            [f"o{n}" for n in range(40)],
            config={"max_concurrency": 40},
            return_exceptions=True,
        )
    assert all(isinstance(o, AllAttemptsFailedError) for o in outputs)
    assert any("retry budget exhausted" in str(o) for o in outputs)
    # 40 first attempts and at most 5 + 0.1 * 40 retries, where 8 attempts per
    # request (4 rounds on 2 instances) would send 320.
    attempts = sum(server.stats.requests["/api/chat"] for server in servers)
    assert attempts <= 40 + 9


# Secrets and processes


SECRET = "pa55-w0rd-7Qx"
ECHO_CHAIN = """\
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate


def build(llm):
    prompt = ChatPromptTemplate.from_messages([("human", "{question}")])
    return prompt | llm | StrOutputParser()
"""


def with_password(url: str) -> str:
    return url.replace("://", f"://alice:{SECRET}@")


def test_password_never_shown(start_servers, tmp_path, monkeypatch, caplog):
    servers = start_servers(2)
    lacking = start_servers(1, models=["other:latest"])[0]
    broken = start_servers(1, error_after_chunks=2, reply=PARTIAL_REPLY)[0]
    dead = with_password(f"http://127.0.0.1:{free_port()}")
    urls = [with_password(s.url) for s in servers]
    caplog.set_level(logging.DEBUG)
    shown: list[str] = []

    with Pooled([dead, *urls], health_check_interval=0.1) as llm:
        message = llm.invoke("hi")
        wait_until(lambda: servers[0].stats.requests["/api/version"] >= 2, 5.0)
        shown += [repr(llm.pool), repr(llm.pool.instances), str(llm.pool.stats())]
        shown.append(json.dumps(message.response_metadata, default=str))
    errors: list[BaseException] = []
    with (
        Pooled([dead], max_retries=0) as llm,
        pytest.raises(AllAttemptsFailedError) as info,
    ):
        llm.invoke("hi")
    errors.append(info.value)
    with (
        Pooled([with_password(lacking.url)]) as llm,
        pytest.raises(NoInstanceError) as missing,
    ):
        llm.invoke("hi")
    errors.append(missing.value)
    with (
        Pooled([with_password(broken.url)]) as llm,
        pytest.raises(StreamInterruptedError) as cut,
    ):
        list(llm.stream("hi"))
    errors.append(cut.value)
    for error in errors:
        shown += [str(error), repr(error), "".join(traceback.format_exception(error))]

    # The batch command, with DEBUG logs on stderr.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "echo_chain.py").write_text(ECHO_CHAIN)
    records = [{"id": f"q{n}", "question": f"question {n}"} for n in range(6)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = {
        "llm": {
            "ollama": {
                "model": MODEL,
                "multiple_instances": {
                    "enabled": True,
                    "health_check_interval": 0.2,
                    "instances": [{"base_url": url} for url in [dead, *urls]],
                },
            }
        }
    }
    (tmp_path / "pool.yaml").write_text(json.dumps(config))
    result = CliRunner().invoke(
        cli_main,
        [
            "batch",
            "in.jsonl",
            "out.jsonl",
            "--config",
            "pool.yaml",
            "--chain",
            "echo_chain:build",
            "--no-progress",
            "-vv",
            "--summary-json",
            "summary.json",
        ],
    )
    assert result.exit_code == 0, result.output
    output_lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert len(output_lines) == 6
    shown += [result.output, *output_lines, (tmp_path / "summary.json").read_text()]
    shown.append(caplog.text)

    assert "alice:***@" in message.response_metadata["instance"]
    assert any("alice:***@" in line for line in output_lines)
    for text in shown:
        assert SECRET not in text


def test_no_subprocess_goes_through_a_shell():
    shell_call = re.compile(
        r"shell\s*=\s*True|os\.system\(|os\.popen\(|subprocess\.getoutput"
        r"|subprocess\.getstatusoutput|create_subprocess_shell"
    )
    assert shell_call.search("subprocess.run(command, shell=True)")
    files = sorted(SOURCE.rglob("*.py"))
    assert len(files) > 10
    offenders = [
        f"{path.relative_to(SOURCE)}:{number}"
        for path in files
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if shell_call.search(line)
    ]
    assert offenders == []


def test_manager_instances_listen_on_loopback(tmp_path):
    standin = Path(sys.executable).with_name("ollama-pool-standin")
    manager = InstanceManager(
        tmp_path / "state", ollama_bin=str(standin), log_dir=tmp_path / "logs"
    )
    records = manager.start(1, port=free_port(), models_dir=tmp_path / "models")
    try:
        process = psutil.Process(records[0].pid)
        listening = [
            connection.laddr
            for member in [process, *process.children(recursive=True)]
            for connection in member.net_connections(kind="inet")
            if connection.status == psutil.CONN_LISTEN
        ]
    finally:
        manager.stop(grace=5.0)
    assert records[0].host == "127.0.0.1"
    assert listening
    assert {address.ip for address in listening} == {"127.0.0.1"}
