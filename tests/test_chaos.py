"""A batch run through a fleet in trouble loses no record and keeps memory flat.

2,000 records go through the batch runner over four stand-in servers on
127.0.0.1 while every server rejects 10% of chat requests with 503 "server
busy", one server is stopped and later restarted, and another stalls after its
response headers for a while. The output must hold each id exactly once, with
no error line.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from ollama_pool import OllamaPool, PooledChatOllama
from ollama_pool.batch import BatchOptions, arun_batch
from ollama_pool.testing import ChatRequest, StandInServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

MODEL = "llama3.2"
RECORDS = 2000
BUSY_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"
# Output line counts at which the faults start and end.
KILL_AT, RESTART_AT = 300, 700
STALL_AT, UNSTALL_AT = 900, 1300
# Extra memory (RSS) the run may take after the first MEMORY_BASE_AT lines. A
# leak of 13 kB per record over the remaining 1,600 records would exceed it.
MEMORY_BASE_AT = 400
MEMORY_GROWTH_LIMIT = 20 * 1024 * 1024


def random_busy(seed: int, share: float) -> Callable[[ChatRequest], bool]:
    """Return a predicate that is true for a random `share` of requests.

    Each stand-in calls it from its own event loop thread only, so the
    generator needs no lock.
    """
    rng = random.Random(seed)
    return lambda request: rng.random() < share


def write_records(path: Path) -> None:
    with path.open("w", encoding="utf-8") as file:
        for index in range(RECORDS):
            record = {"id": f"r{index}", "question": f"question {index}"}
            file.write(json.dumps(record) + "\n")


def count_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


async def run_faults(
    servers: list[StandInServer], output: Path, memory: list[tuple[int, int]]
) -> list[str]:
    """Inject the faults as the output grows; record (lines, RSS) samples."""
    process = psutil.Process()
    victim, staller = servers[1], servers[2]
    steps: list[tuple[int, str, Callable[[], Any]]] = [
        (KILL_AT, "stopped", victim.stop),
        (RESTART_AT, "restarted", victim.start),
        (STALL_AT, "stalling", lambda: staller.update(stall_after_headers=True)),
        (UNSTALL_AT, "unstalled", lambda: staller.update(stall_after_headers=False)),
    ]
    done: list[str] = []
    next_sample = 0
    while steps or next_sample <= RECORDS:
        lines = count_lines(output)
        if lines >= next_sample:
            memory.append((lines, process.memory_info().rss))
            next_sample += 100
        if steps and lines >= steps[0][0]:
            _, name, action = steps.pop(0)
            await asyncio.to_thread(action)
            done.append(name)
        if lines >= RECORDS:
            break
        await asyncio.sleep(0.05)
    return done


async def test_chaos_batch_loses_nothing(start_servers, tmp_path):
    servers = start_servers(4, parallel=4)
    for seed, server in enumerate(servers):
        server.update(
            fail_status=503,
            fail_message=BUSY_MESSAGE,
            fail_if=random_busy(seed, 0.10),
        )
    input_path = tmp_path / "in.jsonl"
    output_path = tmp_path / "out.jsonl"
    write_records(input_path)

    pool = OllamaPool(
        [server.url for server in servers],
        model=MODEL,
        strategy="least_active",
        health_check_interval=0.2,
        read_timeout=1.0,
        connect_timeout=1.0,
        base_ejection_time=0.5,
        max_in_flight_per_instance=4,
        backoff_base=0.05,
        backoff_max=0.5,
        seed=11,
    )
    llm = PooledChatOllama(pool=pool, model=MODEL)
    prompt = ChatPromptTemplate.from_messages([("human", "{question}")])
    chain = prompt | llm | StrOutputParser()
    options = BatchOptions(input_path, output_path, workers=16, handle_signals=False)
    memory: list[tuple[int, int]] = []
    try:
        faults = asyncio.create_task(run_faults(servers, output_path, memory))
        summary = await arun_batch(chain, options, pool=pool)
        steps = await asyncio.wait_for(faults, timeout=30)
        stats = pool.stats()
    finally:
        await llm.aclose()
        await pool.aclose()

    assert steps == ["stopped", "restarted", "stalling", "unstalled"]
    lines = [json.loads(line) for line in output_path.read_text().splitlines()]
    assert len(lines) == RECORDS
    assert [line for line in lines if "error" in line] == []
    ids = Counter(line["id"] for line in lines)
    assert ids == Counter(f"r{index}" for index in range(RECORDS))
    for line in lines:
        number = int(line["id"][1:])
        assert line["answer"] == f"echo: question {number}"
    assert summary.stats.failed == 0

    # The faults happened: busy responses everywhere, and the stopped and the
    # stalled server left the rotation, then served again.
    assert all(server.stats.scripted_failures > 0 for server in servers)
    assert stats[1]["ejections"] >= 1
    assert stats[2]["ejections"] >= 1
    served = Counter(line["instance"] for line in lines)
    assert set(served) == {server.url for server in servers}

    base = next(rss for count, rss in memory if count >= MEMORY_BASE_AT)
    peak = max(rss for count, rss in memory if count >= MEMORY_BASE_AT)
    assert peak - base < MEMORY_GROWTH_LIMIT
