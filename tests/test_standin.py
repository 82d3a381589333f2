"""The Ollama stand-in server, driven over real HTTP by the ollama client,
ChatOllama and httpx."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest
from click.testing import CliRunner
from langchain_core.tools import tool
from langchain_ollama import ChatOllama
from pydantic import BaseModel

from ollama_pool.testing import (
    Behavior,
    ChatRequest,
    StandInFleet,
    StandInServer,
    TokenCounts,
)
from ollama_pool.testing.__main__ import load_responder, main, parse_ollama_host

MODEL = "llama3.2"
HELLO = [{"role": "user", "content": "hello there world"}]


@pytest.fixture
def server() -> Iterator[StandInServer]:
    standin = StandInServer(behavior=Behavior(models=[MODEL]))
    standin.start()
    try:
        yield standin
    finally:
        standin.stop()


@pytest.fixture
def client(server: StandInServer) -> Iterator[ollama.Client]:
    ollama_client = ollama.Client(host=server.url)
    try:
        yield ollama_client
    finally:
        ollama_client._client.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def chat_body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": HELLO, **fields}


def collect_content(stream: Iterator[ollama.ChatResponse], received: list[str]) -> None:
    """Append each chunk's content to `received`, so it survives an exception."""
    for part in stream:
        received.append(part.message.content or "")


# Chat and generate


def test_chat_stream_chunks_and_final_metrics(client: ollama.Client) -> None:
    parts = list(client.chat(model=MODEL, messages=HELLO, stream=True))

    content = "".join(part.message.content or "" for part in parts)
    assert content == "echo: hello there world"
    assert len(parts) == 5  # four word chunks and the final chunk
    assert all(not part.done for part in parts[:-1])
    final = parts[-1]
    assert final.done is True
    assert final.done_reason == "stop"
    assert final.model == "llama3.2:latest"
    assert final.prompt_eval_count == 3
    assert final.eval_count == 4
    for metric in (
        "total_duration",
        "load_duration",
        "prompt_eval_duration",
        "eval_duration",
    ):
        assert isinstance(getattr(final, metric), int), metric
        assert getattr(final, metric) > 0, metric


def test_chat_stream_content_type(server: StandInServer) -> None:
    response = httpx.post(f"{server.url}/api/chat", json=chat_body())

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert lines[-1]["done"] is True
    assert "created_at" in lines[0]


def test_chat_without_stream(client: ollama.Client) -> None:
    response = client.chat(model=MODEL, messages=HELLO, stream=False)

    assert response.message.content == "echo: hello there world"
    assert response.done is True
    assert response.done_reason == "stop"
    assert response.eval_count == 4


def test_chat_ollama_invoke_and_usage(server: StandInServer) -> None:
    llm = ChatOllama(base_url=server.url, model=MODEL, temperature=0)

    message = llm.invoke("what is up")

    assert message.content == "echo: what is up"
    assert message.usage_metadata is not None
    assert message.usage_metadata["input_tokens"] == 3
    assert message.usage_metadata["output_tokens"] == 4
    assert message.response_metadata["done_reason"] == "stop"
    assert server.stats.requests["/api/chat"] == 1
    assert server.stats.recent_requests[-1].options["temperature"] == 0


async def test_async_client_streams(server: StandInServer) -> None:
    client = ollama.AsyncClient(host=server.url)
    chunks = [
        part.message.content
        async for part in await client.chat(model=MODEL, messages=HELLO, stream=True)
    ]

    assert "".join(chunk or "" for chunk in chunks) == "echo: hello there world"


def test_generate_stream_and_whole(client: ollama.Client) -> None:
    parts = list(client.generate(model=MODEL, prompt="say hi", stream=True))
    whole = client.generate(model=MODEL, prompt="say hi", system="be brief")

    assert "".join(part.response or "" for part in parts) == "echo: say hi"
    assert parts[-1].done is True
    assert parts[-1].done_reason == "stop"
    assert whole.response == "echo: say hi"
    assert whole.eval_count == 3


def test_num_predict_stops_with_length(client: ollama.Client) -> None:
    response = client.chat(
        model=MODEL, messages=HELLO, options={"num_predict": 2}, stream=False
    )

    assert response.message.content == "echo: hello"
    assert response.done_reason == "length"
    assert response.eval_count == 2


def test_stop_sequence_cuts_reply(client: ollama.Client) -> None:
    response = client.chat(model=MODEL, messages=HELLO, options={"stop": [" there"]})

    assert response.message.content == "echo: hello"
    assert response.done_reason == "stop"


def test_embedding_model_rejects_chat(
    server: StandInServer, client: ollama.Client
) -> None:
    server.update(models=["nomic-embed-text"])

    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="nomic-embed-text", messages=HELLO)
    vectors = client.embed(model="nomic-embed-text", input="text")

    assert caught.value.status_code == 400
    assert caught.value.error == '"nomic-embed-text" does not support chat'
    assert len(vectors.embeddings) == 1


def test_load_delay_reported_once(server: StandInServer, client: ollama.Client) -> None:
    server.update(load_delay=0.2)

    first = client.chat(model=MODEL, messages=HELLO)
    client.chat(model=MODEL, messages=HELLO)

    assert first.load_duration is not None
    assert first.load_duration >= 200_000_000
    assert [model.model for model in client.ps().models] == ["llama3.2:latest"]


def test_empty_messages_only_load(client: ollama.Client) -> None:
    loaded = client.chat(model=MODEL, messages=[])
    unloaded = client.chat(model=MODEL, messages=[], keep_alive=0)

    assert loaded.done_reason == "load"
    assert loaded.message.content == ""
    assert unloaded.done_reason == "unload"
    assert client.ps().models == []


def test_reply_string_and_callable(
    server: StandInServer, client: ollama.Client
) -> None:
    server.update(reply="fixed  text ")
    fixed = "".join(
        part.message.content or ""
        for part in client.chat(model=MODEL, messages=HELLO, stream=True)
    )
    server.update(reply=lambda messages: str(len(messages)))
    counted = client.chat(model=MODEL, messages=HELLO * 2)

    assert fixed == "fixed  text "
    assert counted.message.content == "2"


def test_tool_calls_then_text(server: StandInServer) -> None:
    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    server.update(tool_calls=[{"name": "add", "arguments": {"a": 2, "b": 3}}])
    llm = ChatOllama(base_url=server.url, model=MODEL).bind_tools([add])

    call = llm.invoke("add 2 and 3")
    answer = llm.invoke(
        [
            ("human", "add 2 and 3"),
            call,
            {"role": "tool", "content": "5", "tool_call_id": call.tool_calls[0]["id"]},
        ]
    )

    assert call.tool_calls[0]["name"] == "add"
    assert call.tool_calls[0]["args"] == {"a": 2, "b": 3}
    assert answer.tool_calls == []
    assert answer.content.startswith("echo: ")


def test_tool_calls_without_stream(
    server: StandInServer, client: ollama.Client
) -> None:
    server.update(tool_calls=[{"name": "lookup", "arguments": {"key": "x"}}])
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]

    response = client.chat(model=MODEL, messages=HELLO, tools=tools, stream=False)
    without_tools = client.chat(model=MODEL, messages=HELLO, stream=False)

    assert response.message.tool_calls is not None
    assert response.message.tool_calls[0].function.name == "lookup"
    assert response.message.tool_calls[0].function.arguments == {"key": "x"}
    assert without_tools.message.tool_calls is None


async def test_chat_ollama_ainvoke(server: StandInServer) -> None:
    llm = ChatOllama(base_url=server.url, model=MODEL)

    message = await llm.ainvoke("async hello")

    assert message.content == "echo: async hello"


def test_thinking_streams_before_content(
    server: StandInServer, client: ollama.Client
) -> None:
    server.update(thinking="let me think")

    parts = list(client.chat(model=MODEL, messages=HELLO, think=True, stream=True))
    plain = client.chat(model=MODEL, messages=HELLO)

    thinking = "".join(part.message.thinking or "" for part in parts)
    assert thinking == "let me think"
    assert parts[0].message.thinking == "let"
    assert plain.message.thinking is None


def test_json_schema_format(server: StandInServer) -> None:
    class Answer(BaseModel):
        text: str
        score: int

    llm = ChatOllama(base_url=server.url, model=MODEL)

    answer = llm.with_structured_output(Answer).invoke("rate this")

    assert isinstance(answer, Answer)
    assert answer.score == 0
    assert answer.text.startswith("echo: ")


def test_responder_runs_in_worker_thread(
    server: StandInServer, client: ollama.Client
) -> None:
    threads: list[str] = []

    def responder(request: ChatRequest) -> Iterator[str]:
        threads.append(threading.current_thread().name)
        yield "one"
        yield " two"
        return TokenCounts(prompt_tokens=7, completion_tokens=9)

    server.update(responder=responder)
    response = client.chat(model=MODEL, messages=HELLO)

    assert response.message.content == "one two"
    assert response.prompt_eval_count == 7
    assert response.eval_count == 9
    assert threads[0].startswith("ollama-standin-responder")


def test_responder_error_mid_stream(
    server: StandInServer, client: ollama.Client
) -> None:
    def responder(request: ChatRequest) -> Iterator[str]:
        yield "partial"
        raise RuntimeError("model crashed")

    server.update(responder=responder)

    with pytest.raises(ollama.ResponseError, match="model crashed"):
        list(client.chat(model=MODEL, messages=HELLO, stream=True))


# Discovery endpoints


def test_version_tags_show_and_root(
    server: StandInServer, client: ollama.Client
) -> None:
    server.update(version="0.9.1")

    root = httpx.get(server.url)
    head = httpx.head(server.url)
    tags = httpx.get(f"{server.url}/api/tags").json()
    details = client.show(MODEL)

    assert root.text == "Ollama is running"
    assert head.status_code == 200
    assert httpx.get(f"{server.url}/api/version").json() == {"version": "0.9.1"}
    entry = tags["models"][0]
    assert entry["name"] == "llama3.2:latest"
    assert entry["model"] == "llama3.2:latest"
    assert entry["size"] > 0
    assert len(entry["digest"]) == 64
    assert set(entry["details"]) == {
        "parent_model",
        "format",
        "family",
        "families",
        "parameter_size",
        "quantization_level",
    }
    assert details.details is not None
    assert details.details.family == "llama"
    assert "completion" in (details.capabilities or [])


def test_show_missing_model_is_404(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.show("missing")

    assert caught.value.status_code == 404


def test_ps_lists_loaded_models_latest_first(
    server: StandInServer, client: ollama.Client
) -> None:
    server.update(models=["llama3.2", "qwen2.5:7b"])
    assert client.ps().models == []

    client.chat(model="qwen2.5:7b", messages=HELLO, keep_alive="10m")
    client.chat(model=MODEL, messages=HELLO, options={"num_ctx": 8192})
    loaded = client.ps().models

    assert [model.model for model in loaded] == ["qwen2.5:7b", "llama3.2:latest"]
    assert loaded[1].context_length == 8192
    assert loaded[0].size_vram == loaded[0].size
    assert loaded[0].expires_at is not None
    assert loaded[1].expires_at is not None
    assert loaded[0].expires_at > loaded[1].expires_at


def test_missing_model_is_404(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="nope", messages=HELLO)

    assert caught.value.status_code == 404
    assert caught.value.error == "model 'nope' not found"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "invalid JSON"),
        (b"", "missing request body"),
        (b'{"messages": []}', "model is required"),
        (b"[1, 2]", "JSON object"),
    ],
)
def test_invalid_request_is_400(
    server: StandInServer, body: bytes, message: str
) -> None:
    response = httpx.post(f"{server.url}/api/chat", content=body)

    assert response.status_code == 400
    assert message in response.json()["error"]


# Pull and embed


def test_pull_progress_and_shared_models_dir(tmp_path: Path) -> None:
    first = StandInServer(behavior=Behavior(models=[]), models_dir=tmp_path)
    second = StandInServer(behavior=Behavior(models=[]), models_dir=tmp_path)
    first.start()
    second.start()
    try:
        progress = list(ollama.Client(host=first.url).pull("phi3", stream=True))
        listed = ollama.Client(host=second.url).list().models
        answer = ollama.Client(host=second.url).chat(model="phi3", messages=HELLO)
        whole = ollama.Client(host=second.url).pull("gemma3:1b")
    finally:
        first.stop()
        second.stop()

    statuses = [line.status for line in progress]
    assert statuses[0] == "pulling manifest"
    assert statuses[-1] == "success"
    downloads = [line for line in progress if line.digest]
    assert len(downloads) >= 3
    assert downloads[-1].completed == downloads[-1].total
    assert downloads[0].completed == 0
    assert [model.model for model in listed] == ["phi3:latest"]
    assert answer.message.content == "echo: hello there world"
    assert whole.status == "success"
    manifests = tmp_path / "manifests" / "registry.ollama.ai" / "library"
    assert (manifests / "phi3" / "latest").is_file()
    assert (manifests / "gemma3" / "1b").is_file()


@pytest.mark.parametrize("name", ["../../escaped", "a/../../b", "/absolute"])
def test_pull_rejects_path_escape(tmp_path: Path, name: str) -> None:
    models_dir = tmp_path / "models"
    with StandInServer(port=0, models_dir=models_dir) as server:
        response = httpx.post(f"{server.url}/api/pull", json={"model": name})
    assert response.status_code == 400
    assert "invalid model name" in response.json()["error"]
    escaped = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert escaped == []


def test_pull_unknown_model_fails(server: StandInServer, client: ollama.Client) -> None:
    server.update(pullable=["phi3"])

    with pytest.raises(ollama.ResponseError, match="file does not exist"):
        list(client.pull("other", stream=True))
    assert "other:latest" not in [model.model for model in client.list().models]


def test_embed_deterministic_unit_vectors(
    server: StandInServer, client: ollama.Client
) -> None:
    first = client.embed(model=MODEL, input=["alpha", "beta"])
    again = client.embed(model=MODEL, input="alpha")
    server.update(embed_dim=16)
    short = client.embed(model=MODEL, input="alpha")

    assert len(first.embeddings) == 2
    assert len(first.embeddings[0]) == 64
    assert first.embeddings[0] == again.embeddings[0]
    assert first.embeddings[0] != first.embeddings[1]
    assert sum(value * value for value in first.embeddings[1]) == pytest.approx(1.0)
    assert len(short.embeddings[0]) == 16
    assert server.stats.embed_requests == 3


# Scripted failures


def test_scripted_failure_first_requests_only(
    server: StandInServer, client: ollama.Client
) -> None:
    server.update(fail_status=500, fail_first=2)
    statuses = []
    for _ in range(2):
        with pytest.raises(ollama.ResponseError) as caught:
            client.chat(model=MODEL, messages=HELLO)
        statuses.append(caught.value.status_code)
        assert "llama runner" in caught.value.error
    recovered = client.chat(model=MODEL, messages=HELLO)

    assert statuses == [500, 500]
    assert recovered.message.content == "echo: hello there world"
    assert server.stats.scripted_failures == 2


def test_scripted_client_error_keeps_message(
    server: StandInServer, client: ollama.Client
) -> None:
    server.update(fail_status=400, fail_message='"llama3.2" does not support tools')

    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model=MODEL, messages=HELLO)

    assert caught.value.status_code == 400
    assert caught.value.error == '"llama3.2" does not support tools'


def test_busy_when_queue_full(server: StandInServer) -> None:
    server.update(parallel=1, max_queue=1, first_token_delay=0.5)

    def chat(_: int) -> tuple[int, str]:
        with ollama.Client(host=server.url) as client:
            try:
                response = client.chat(model=MODEL, messages=HELLO)
            except ollama.ResponseError as exc:
                return exc.status_code, exc.error
            return 200, response.message.content or ""

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(chat, range(4)))

    busy = (503, "server busy, please try again.  maximum pending requests exceeded")
    assert results.count(busy) == 2
    assert results.count((200, "echo: hello there world")) == 2
    assert server.stats.rejected_busy == 2
    assert server.stats.max_active_generations == 1


def test_error_after_chunks_raises_mid_stream(
    server: StandInServer, client: ollama.Client
) -> None:
    server.update(error_after_chunks=2)
    received = []

    stream = client.chat(model=MODEL, messages=HELLO, stream=True)

    with pytest.raises(ollama.ResponseError, match="unexpected EOF") as caught:
        collect_content(stream, received)

    assert received == ["echo:", " hello"]
    assert caught.value.status_code == -1


def test_close_after_chunks_breaks_stream(
    server: StandInServer, client: ollama.Client
) -> None:
    server.update(close_after_chunks=1)
    received = []

    stream = client.chat(model=MODEL, messages=HELLO, stream=True)

    with pytest.raises(httpx.RemoteProtocolError):
        collect_content(stream, received)

    assert received == ["echo:"]


def test_stall_times_out_and_stop_closes(server: StandInServer) -> None:
    server.update(stall_after_headers=True)
    errors: list[BaseException] = []

    def wait_forever() -> None:
        with httpx.Client(timeout=None) as http:
            try:
                with http.stream(
                    "POST", f"{server.url}/api/chat", json=chat_body()
                ) as r:
                    r.read()
            except httpx.HTTPError as exc:
                errors.append(exc)

    waiter = threading.Thread(target=wait_forever)
    waiter.start()
    with (
        httpx.Client(timeout=httpx.Timeout(5.0, read=0.5)) as http,
        http.stream("POST", f"{server.url}/api/chat", json=chat_body()) as response,
    ):
        status = response.status_code
        with pytest.raises(httpx.ReadTimeout):
            response.read()

    server.stop()
    waiter.join(10)

    assert status == 200
    assert not waiter.is_alive()
    assert len(errors) == 1
    assert isinstance(errors[0], httpx.RemoteProtocolError)


def test_restart_same_port(server: StandInServer) -> None:
    port = server.port
    server.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url)

    server.restart()

    assert server.port == port
    assert httpx.get(f"{server.url}/api/version").status_code == 200


def test_raised_parallel_admits_waiting_requests(server: StandInServer) -> None:
    server.update(parallel=0)
    with ThreadPoolExecutor(3) as pool:
        futures = [
            pool.submit(httpx.post, f"{server.url}/api/chat", json=chat_body())
            for _ in range(3)
        ]
        for _ in range(200):
            if server.stats.waiting_requests == 3:
                break
            time.sleep(0.02)
        waiting = server.stats.waiting_requests
        server.update(parallel=3)
        statuses = [future.result().status_code for future in futures]

    assert waiting == 3
    assert statuses == [200, 200, 200]
    assert server.stats.chat_requests == 3
    assert server.stats.waiting_requests == 0


def test_start_on_busy_port_raises(server: StandInServer) -> None:
    other = StandInServer(port=server.port)

    with pytest.raises(OSError, match="in use"):
        other.start()

    assert not other.running
    assert httpx.get(f"{server.url}/api/version").status_code == 200


def test_fleet_serves_each_url() -> None:
    with StandInFleet([Behavior(reply="a"), Behavior(reply="b")]) as fleet:
        replies = [
            httpx.post(f"{url}/api/chat", json=chat_body(stream=False)).json()
            for url in fleet.urls
        ]

    assert [reply["message"]["content"] for reply in replies] == ["a", "b"]
    assert len(set(fleet.urls)) == 2


# Command line


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, ("127.0.0.1", 11434)),
        ("", ("127.0.0.1", 11434)),
        ("127.0.0.1:11435", ("127.0.0.1", 11435)),
        ("http://127.0.0.1:11436", ("127.0.0.1", 11436)),
        ("127.0.0.2", ("127.0.0.2", 11434)),
        (":11437", ("127.0.0.1", 11437)),
        ("[::1]:11438", ("::1", 11438)),
    ],
)
def test_parse_ollama_host(value: str | None, expected: tuple[str, int]) -> None:
    assert parse_ollama_host(value) == expected


def test_load_responder_calls_factory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = tmp_path / "standin_responder_module.py"
    module.write_text(
        "def make():\n"
        "    def respond(request):\n"
        "        yield 'from module'\n"
        "    return respond\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))

    responder = load_responder("standin_responder_module:make")
    request = ChatRequest(model=MODEL, messages=HELLO)

    assert list(responder(request)) == ["from module"]


def test_version_option() -> None:
    result = CliRunner().invoke(main, ["--version"])

    assert result.exit_code == 0
    assert "0.12.3" in result.output


def wait_until_listening(url: str, process: subprocess.Popen[str]) -> httpx.Response:
    for _ in range(300):
        if process.poll() is not None:
            pytest.fail(f"the stand-in exited with {process.returncode}")
        try:
            return httpx.get(f"{url}/api/version", timeout=1.0)
        except httpx.TransportError:
            time.sleep(0.05)
    pytest.fail(f"the stand-in did not listen on {url}")


def test_serve_command_answers_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "OLLAMA_HOST": f"127.0.0.1:{port}",
        "OLLAMA_MODELS": str(tmp_path),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "ollama_pool.testing", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        response = wait_until_listening(f"http://127.0.0.1:{port}", process)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()

    assert response.json() == {"version": "0.12.3"}
    assert process.returncode == 0
    assert "GET /api/version" in stderr


def test_fleet_command_prints_ready_lines() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "ollama_pool.testing", "fleet", "--ports", "0", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline().strip() for _ in range(2)]
        urls = [line.removeprefix("ready ") for line in lines]
        versions = [httpx.get(f"{url}/api/version").status_code for url in urls]
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()

    assert all(line.startswith("ready http://127.0.0.1:") for line in lines)
    assert versions == [200, 200]
    assert process.returncode == 0


def test_serve_stops_when_parent_is_killed(tmp_path: Path) -> None:
    psutil = pytest.importorskip("psutil")
    port = free_port()
    parent_script = (
        "import os, subprocess, sys, time\n"
        "env = dict(os.environ, OLLAMA_HOST=sys.argv[1], OLLAMA_MODELS=sys.argv[2],"
        " OLLAMA_POOL_STANDIN_PARENT_PID=str(os.getpid()))\n"
        "child = subprocess.Popen([sys.executable, '-m', 'ollama_pool.testing',"
        " 'serve'], env=env)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_script, f"127.0.0.1:{port}", str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        child = psutil.Process(int(parent.stdout.readline()))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/version").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        parent.kill()
        parent.wait()
        child.wait(timeout=15)
        assert not child.is_running()
    finally:
        parent.kill()
        parent.wait()
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(child.pid).kill()
