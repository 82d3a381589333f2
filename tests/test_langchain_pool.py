"""PooledChatOllama against stand-in servers over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from typing import Any

import ollama
import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage

from ollama_pool import (
    AllAttemptsFailedError,
    NoInstanceError,
    PooledChatOllama,
    StreamInterruptedError,
)

BUSY = "server busy, please try again.  maximum pending requests exceeded"
STRATEGIES = ["round_robin", "random", "least_active", "power_of_two", "peak_ewma"]


def make_llm(servers: list[Any], **kwargs: Any) -> PooledChatOllama:
    options: dict[str, Any] = {
        "model": "llama3.2",
        "health_check_interval": 0.5,
        "backoff_base": 0.01,
    }
    options.update(kwargs)
    backoff = options.pop("backoff_base")
    return PooledChatOllama(
        base_urls=[s.url for s in servers],
        pool_options={"backoff_base": backoff},
        **options,
    )


def served_by(messages: list[AIMessage]) -> Counter[str]:
    return Counter(m.response_metadata["instance"] for m in messages)


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_abatch_answers_in_order(start_servers, strategy):
    servers = start_servers(4)
    prompts = [f"question {n}" for n in range(200)]
    async with make_llm(servers, strategy=strategy) as llm:
        answers = await llm.abatch(prompts, config={"max_concurrency": 8})
    assert [a.content for a in answers] == [f"echo: {p}" for p in prompts]
    counts = served_by(answers)
    assert sum(counts.values()) == 200
    if strategy == "round_robin":
        assert sorted(counts.values()) == [50, 50, 50, 50]
    else:
        assert len(counts) == 4


async def test_abatch_respects_max_concurrency(start_servers):
    servers = start_servers(4, first_token_delay=0.02)
    seen: list[int] = []

    async def sample() -> None:
        while True:
            seen.append(sum(s.stats.active_generations for s in servers))
            await asyncio.sleep(0.002)

    async with make_llm(servers) as llm:
        sampler = asyncio.create_task(sample())
        prompts = [f"q{n}" for n in range(40)]
        await llm.abatch(prompts, config={"max_concurrency": 3})
        sampler.cancel()
        assert llm.pool.in_flight == 0
    assert max(seen) <= 3
    assert max(seen) >= 2


async def test_stopped_instance_leaves_and_returns(start_servers, caplog):
    servers = start_servers(4)
    down = servers[3]
    down.stop()
    caplog.set_level(logging.INFO, logger="ollama_pool")
    async with make_llm(servers, health_check_interval=0.3) as llm:
        answers = await llm.abatch(
            [f"q{n}" for n in range(200)], config={"max_concurrency": 8}
        )
        assert len(answers) == 200
        assert all(a.content.startswith("echo: q") for a in answers)
        instance = llm.pool.instances[3]
        assert not instance.healthy
        assert down.url not in served_by(answers)
        ejections = [r for r in caplog.records if "left the rotation" in r.getMessage()]
        assert len(ejections) == 1
        assert down.url in ejections[0].getMessage()

        down.restart()
        deadline = time.monotonic() + 2 * 0.3 + 0.5
        while not instance.healthy and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert instance.healthy
        later = await llm.abatch([f"r{n}" for n in range(8)])
        assert down.url in served_by(later)
    assert any("back in rotation" in r.getMessage() for r in caplog.records)


def test_invoke_sync_and_metadata(start_servers):
    servers = start_servers(2)
    with make_llm(servers) as llm:
        message = llm.invoke("hello there")
    assert message.content == "echo: hello there"
    assert message.response_metadata["instance"] in {s.url for s in servers}
    assert message.response_metadata["done"] is True
    assert message.usage_metadata is not None
    assert message.usage_metadata["output_tokens"] > 0


def test_stream_yields_whole_answer(start_servers):
    servers = start_servers(2)
    with make_llm(servers) as llm:
        chunks = list(llm.stream("one two three"))
    assert len(chunks) > 1
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    assert merged.content == "echo: one two three"
    assert merged.response_metadata["instance"] in {s.url for s in servers}
    assert merged.usage_metadata is not None


async def test_astream_yields_whole_answer(start_servers):
    servers = start_servers(2)
    async with make_llm(servers) as llm:
        chunks = [c async for c in llm.astream("one two three")]
    assert "".join(str(c.content) for c in chunks) == "echo: one two three"


def test_batch_from_threads(start_servers):
    servers = start_servers(3)
    with make_llm(servers) as llm:
        answers = llm.batch([f"t{n}" for n in range(30)], config={"max_concurrency": 6})
        assert llm.pool.in_flight == 0
    assert [a.content for a in answers] == [f"echo: t{n}" for n in range(30)]


def test_successive_asyncio_runs(start_servers):
    servers = start_servers(2)
    with make_llm(servers) as llm:
        first = asyncio.run(llm.ainvoke("a"))
        second = asyncio.run(llm.ainvoke("b"))
    assert first.content == "echo: a"
    assert second.content == "echo: b"


def test_invoke_while_other_thread_runs_loop(start_servers):
    servers = start_servers(2)
    results: list[str] = []
    with make_llm(servers) as llm:

        def run_loop() -> None:
            async def many() -> None:
                for n in range(5):
                    message = await llm.ainvoke(f"async {n}")
                    results.append(str(message.content))

            asyncio.run(many())

        thread = threading.Thread(target=run_loop)
        thread.start()
        sync_answers = [llm.invoke(f"sync {n}").content for n in range(5)]
        thread.join()
    assert sync_answers == [f"echo: sync {n}" for n in range(5)]
    assert results == [f"echo: async {n}" for n in range(5)]


def test_mixed_fleet_routes_by_model(start_servers):
    big = start_servers(2, models=["gpt-oss:7b"])
    small = start_servers(2, models=["llama3.2:latest"])
    instances = [{"base_url": s.url, "model": "gpt-oss:7b"} for s in big] + [
        {"base_url": s.url, "model": "llama3.2"} for s in small
    ]
    with PooledChatOllama(instances=instances, model="gpt-oss:7b") as llm:
        answers = llm.batch([f"x{n}" for n in range(8)])
    assert set(served_by(answers)) == {s.url for s in big}
    with PooledChatOllama(instances=instances) as llm:
        answers = llm.batch([f"y{n}" for n in range(8)])
    assert set(served_by(answers)) == {s.url for s in big + small}
    models = {a.response_metadata["model"] for a in answers}
    assert models == {"gpt-oss:7b", "llama3.2:latest", "llama3.2"} & models
    assert len(models) == 2


def test_unknown_model_raises_no_instance(start_servers):
    servers = start_servers(2)
    with make_llm(servers) as llm, pytest.raises(NoInstanceError) as info:
        llm.invoke("hi", model="mistral")
    assert "mistral" in str(info.value)
    assert servers[0].url in str(info.value)


def test_missing_model_404_marks_instance(start_servers):
    has = start_servers(2)
    lacks = start_servers(1, models=["other:latest"])
    servers = [*lacks, *has]
    with make_llm(servers) as llm:
        answers = llm.batch([f"m{n}" for n in range(9)], config={"max_concurrency": 1})
        assert "llama3.2:latest" in llm.pool.instances[0].missing_models
    assert all(a.content.startswith("echo: m") for a in answers)
    assert lacks[0].stats.requests["/api/chat"] == 1


def test_client_error_is_raised_unchanged(start_servers):
    message = '"llama3.2" does not support tools'
    servers = start_servers(3, fail_status=400, fail_message=message)
    with make_llm(servers) as llm, pytest.raises(ollama.ResponseError) as info:
        llm.invoke("hi")
    assert info.value.status_code == 400
    assert "does not support tools" in str(info.value)
    assert sum(s.stats.requests["/api/chat"] for s in servers) == 1


def test_all_instances_failing_lists_attempts(start_servers):
    servers = start_servers(2, fail_status=500, fail_message="boom")
    with (
        make_llm(servers, max_retries=1) as llm,
        pytest.raises(AllAttemptsFailedError) as info,
    ):
        llm.invoke("hi")
    error = info.value
    assert len(error.attempts) == 4
    assert {url for url, _ in error.attempts} == {s.url for s in servers}
    assert "boom" in str(error)


def test_server_error_retried_elsewhere(start_servers):
    bad = start_servers(
        1,
        fail_status=500,
        fail_message="timed out waiting for llama runner to start",
        fail_delay=0.1,
    )
    good = start_servers(1)
    with make_llm([*bad, *good]) as llm:
        answers = llm.batch(["a", "b", "c"], config={"max_concurrency": 1})
    assert [a.content for a in answers] == ["echo: a", "echo: b", "echo: c"]
    assert set(served_by(answers)) == {good[0].url}


def test_error_line_mid_stream_retried_in_invoke(start_servers):
    broken = start_servers(
        1, error_after_chunks=2, reply="partial words that never finish"
    )
    good = start_servers(1)
    with make_llm([*broken, *good], strategy="round_robin") as llm:
        message = llm.invoke("complete me")
    assert message.content == "echo: complete me"
    assert broken[0].stats.requests["/api/chat"] == 1


def test_closed_socket_mid_stream_retried_in_invoke(start_servers):
    broken = start_servers(
        1, close_after_chunks=2, reply="partial words that never finish"
    )
    good = start_servers(1)
    with make_llm([*broken, *good]) as llm:
        message = llm.invoke("complete me")
    assert message.content == "echo: complete me"


async def test_astream_raises_after_chunks(start_servers):
    broken = start_servers(
        1, error_after_chunks=2, reply="partial words that never finish"
    )
    async with make_llm(broken) as llm:
        received = []
        with pytest.raises(StreamInterruptedError):
            async for chunk in llm.astream("x"):
                received.append(chunk.content)
    assert len(received) == 2
    assert llm.pool.in_flight == 0


def test_stream_fails_over_before_first_chunk(start_servers):
    busy = start_servers(
        1,
        fail_status=503,
        fail_message=BUSY,
    )
    good = start_servers(1)
    with make_llm([*busy, *good]) as llm:
        chunks = list(llm.stream("fresh stream"))
    assert "".join(str(c.content) for c in chunks) == "echo: fresh stream"


def test_stall_after_headers_times_out_and_retries(start_servers):
    stalled = start_servers(1, stall_after_headers=True)
    good = start_servers(1)
    with make_llm([*stalled, *good], read_timeout=0.5, health_check_interval=30) as llm:
        answers = llm.batch([f"s{n}" for n in range(6)], config={"max_concurrency": 3})
        assert not llm.pool.instances[0].healthy
    assert all(a.content.startswith("echo: s") for a in answers)


def test_slow_stream_within_read_timeout_finishes(start_servers):
    slow = start_servers(
        1, first_token_delay=0.6, token_delay=0.3, reply="one two three four five"
    )
    with make_llm(slow, read_timeout=1.0) as llm:
        message = llm.invoke("x")
    assert message.content == "one two three four five"


def test_callbacks_fire_once_per_call(start_servers):
    class Counting(BaseCallbackHandler):
        def __init__(self) -> None:
            self.starts = 0
            self.ends = 0
            self.errors = 0
            self.tokens: list[str] = []

        def on_chat_model_start(self, *args: Any, **kwargs: Any) -> None:
            self.starts += 1

        def on_llm_end(self, *args: Any, **kwargs: Any) -> None:
            self.ends += 1

        def on_llm_error(self, *args: Any, **kwargs: Any) -> None:
            self.errors += 1

        def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
            self.tokens.append(token)

    bad = start_servers(2, fail_status=500, fail_message="boom")
    good = start_servers(1)
    handler = Counting()
    with make_llm([*bad, *good]) as llm:
        llm.invoke("hi", config={"callbacks": [handler]})
    assert handler.starts == 1
    assert handler.ends == 1
    assert handler.errors == 0
    assert "".join(handler.tokens) == "echo: hi"

    streamed = Counting()
    with make_llm([*bad, *good]) as llm:
        chunks = list(llm.stream("hi", config={"callbacks": [streamed]}))
    assert streamed.starts == 1
    assert streamed.ends == 1
    assert len(streamed.tokens) == len(chunks)
    assert "".join(streamed.tokens) == "echo: hi"


async def test_abatch_return_exceptions_keep_index(start_servers):
    servers = start_servers(2)
    inputs: list[Any] = ["a", "b", [("not-a-role", "c")], "d"]
    async with make_llm(servers) as llm:
        outputs = await llm.abatch(inputs, return_exceptions=True)
    assert [o.content for o in outputs if isinstance(o, AIMessage)] == [
        "echo: a",
        "echo: b",
        "echo: d",
    ]
    assert isinstance(outputs[2], ValueError)


def test_cancelled_requests_release_slots(start_servers):
    servers = start_servers(2, first_token_delay=5.0)

    async def cancel_some(llm: PooledChatOllama) -> None:
        tasks = [asyncio.create_task(llm.ainvoke(f"c{n}")) for n in range(6)]
        await asyncio.sleep(0.3)
        assert llm.pool.in_flight == 6
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    with make_llm(servers) as llm:
        asyncio.run(cancel_some(llm))
        assert llm.pool.in_flight == 0
        assert all(i.in_flight == 0 for i in llm.pool.instances)


def test_password_never_shown(start_servers, caplog):
    servers = start_servers(1)
    port = servers[0].port
    secret_url = f"http://alice:s3cr3t-pw@127.0.0.1:{port}"
    dead_url = f"http://bob:0th3r-pw@127.0.0.1:{_free_port()}"
    caplog.set_level(logging.DEBUG)
    with PooledChatOllama(
        base_urls=[dead_url, secret_url], model="llama3.2", health_check_interval=0.2
    ) as llm:
        message = llm.invoke("hi")
        shown = [repr(llm.pool), str(llm.pool.stats()), str(message.response_metadata)]
        time.sleep(0.5)
    with (
        PooledChatOllama(
            base_urls=[dead_url],
            model="llama3.2",
            max_retries=0,
            health_check_interval=0,
        ) as llm,
        pytest.raises(AllAttemptsFailedError) as info,
    ):
        llm.invoke("hi")
    shown += [str(info.value), repr(info.value), caplog.text]
    for text in shown:
        assert "s3cr3t-pw" not in text
        assert "0th3r-pw" not in text
    assert "alice:***@" in message.response_metadata["instance"]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_repr_and_dump_hide_password():
    urls = ["http://alice:pw-in-list@127.0.0.1:9"]
    instances = [{"base_url": "http://bob:pw-in-dict@127.0.0.1:9", "model": "m"}]
    for llm in (
        PooledChatOllama(base_urls=urls, model="m"),
        PooledChatOllama(instances=instances),
        PooledChatOllama(base_url="http://carol:pw-single@127.0.0.1:9", model="m"),
    ):
        texts = [repr(llm), str(llm), llm.model_dump_json(), str(llm.to_json())]
        for text in texts:
            assert "pw-" not in text
        assert ":***@" in repr(llm)
        llm.close()


def test_validate_model_on_init(start_servers):
    has = start_servers(1, models=["llama3.2:latest"])
    lacks = start_servers(1, models=["other:latest"])
    urls = [lacks[0].url, has[0].url]
    llm = PooledChatOllama(
        base_urls=urls, model="llama3.2", validate_model_on_init=True
    )
    llm.close()
    with pytest.raises(ValueError, match="not found on any instance") as info:
        PooledChatOllama(base_urls=urls, model="mistral", validate_model_on_init=True)
    assert lacks[0].url in str(info.value)


def test_invoke_merges_thinking_and_tools(start_servers):
    servers = start_servers(
        1,
        reply="final words here",
        thinking="step one then step two",
        tool_calls=[{"name": "lookup", "arguments": {"q": "x"}}],
    )
    with make_llm(servers, reasoning=True) as llm:
        thought = llm.invoke("think please")
        tools = [
            {
                "type": "function",
                "function": {
                    "name": "lookup",
                    "description": "Look a word up.",
                    "parameters": {
                        "type": "object",
                        "properties": {"q": {"type": "string"}},
                    },
                },
            }
        ]
        called = llm.bind_tools(tools).invoke("use the tool")
    assert thought.content == "final words here"
    reasoning = thought.additional_kwargs["reasoning_content"]
    assert reasoning == "step one then step two"
    assert [call["name"] for call in called.tool_calls] == ["lookup"]
    assert called.tool_calls[0]["args"] == {"q": "x"}
