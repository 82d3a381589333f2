"""PooledOllamaLLM and PooledOllamaEmbedding against stand-in servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.agent.workflow import FunctionAgent
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ImageBlock,
    MessageRole,
    TextBlock,
    ToolCallBlock,
)
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.prompts import PromptTemplate
from llama_index.core.tools import FunctionTool
from pydantic import BaseModel

from ollama_pool import (
    PooledChatOllama,
    PooledOllamaEmbedding,
    PooledOllamaLLM,
    StreamInterruptedError,
)

MUSIQUE = Path(__file__).parent.parent / "data" / "musique" / "musique_dev_200.jsonl"
MODELS = ["llama3.2", "nomic-embed-text"]


def make_llm(servers: list[Any], **kwargs: Any) -> PooledOllamaLLM:
    options: dict[str, Any] = {"model": "llama3.2", "health_check_interval": 0.5}
    options.update(kwargs)
    llm = PooledOllamaLLM(base_urls=[s.url for s in servers], **options)
    llm.pool.backoff_base = 0.01
    return llm


def user(text: str) -> list[ChatMessage]:
    return [ChatMessage(role=MessageRole.USER, content=text)]


def monitor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ollama-pool-health"]


def dead_ports(count: int) -> list[int]:
    """Return ports on 127.0.0.1 that were free a moment ago and have no listener."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture
def llama_settings() -> Iterator[None]:
    """Restore LlamaIndex's global Settings after the test."""
    saved = (Settings._llm, Settings._embed_model)
    try:
        yield
    finally:
        Settings._llm, Settings._embed_model = saved


def musique_documents(records: int) -> tuple[list[Document], list[str]]:
    documents = []
    questions = []
    with MUSIQUE.open(encoding="utf-8") as file:
        for line, _ in zip(file, range(records), strict=False):
            record = json.loads(line)
            questions.append(record["question"])
            documents.extend(
                Document(text=p["paragraph_text"], metadata={"title": p["title"]})
                for p in record["paragraphs"]
            )
    return documents, questions


# -- RAG ---------------------------------------------------------------------------


def test_vector_index_rag_spreads_requests(start_servers, llama_settings):
    servers = start_servers(3, models=MODELS)
    documents, questions = musique_documents(2)
    with make_llm(servers) as llm:
        Settings.llm = llm
        Settings.embed_model = PooledOllamaEmbedding(
            pool=llm.pool, model_name="nomic-embed-text", embed_batch_size=8
        )
        index = VectorStoreIndex.from_documents(documents)
        engine = index.as_query_engine(similarity_top_k=3)
        answers = [engine.query(question) for question in questions]

    for answer, question in zip(answers, questions, strict=True):
        # The stand-in echoes the last user message: the prompt with the question.
        assert str(answer).startswith("echo: ")
        assert question in str(answer)
        assert len(answer.source_nodes) == 3
    embeds = [s.stats.requests["/api/embed"] for s in servers]
    chats = [s.stats.requests["/api/chat"] for s in servers]
    # 40 paragraphs in batches of 8, then one query embedding per question.
    assert sum(embeds) == 40 // 8 + len(questions)
    assert sum(chats) == len(questions)
    assert all(e + c > 0 for e, c in zip(embeds, chats, strict=True))
    assert max(embeds) - min(embeds) <= 1


def test_settings_accept_pooled_faces(start_servers, llama_settings):
    servers = start_servers(1, models=MODELS)
    with make_llm(servers) as llm:
        embedding = PooledOllamaEmbedding(pool=llm.pool, model_name="nomic-embed-text")
        Settings.llm = llm
        Settings.embed_model = embedding
        assert Settings.llm is llm
        assert Settings.embed_model is embedding
        assert isinstance(llm, FunctionCallingLLM)


# -- Both faces of one pool --------------------------------------------------------


def write_config(path: Path, urls: list[str]) -> Path:
    instances = "\n".join(
        f'            - base_url: "{url}"\n              model: "llama3.2"'
        for url in urls
    )
    path.write_text(
        f"""llm:
  ollama:
    model: "llama3.2"
    temperature: 0.2
    num_ctx: 8192
    max_tokens: 512
    multiple_instances:
      enabled: true
      load_balancing: "round_robin"
      health_check_interval: 0.5
      instances:
{instances}
""",
        encoding="utf-8",
    )
    return path


def test_faces_from_one_config_share_pool(start_servers, tmp_path):
    servers = start_servers(3)
    config = write_config(tmp_path / "config.yaml", [s.url for s in servers])
    chat = PooledChatOllama.from_config(config)
    try:
        llm = PooledOllamaLLM.from_langchain(chat)
        assert llm.pool is chat.pool
        assert llm.metadata.context_window == 8192
        assert llm.metadata.num_output == 512
        assert llm.temperature == 0.2

        assert chat.invoke("from langchain").content == "echo: from langchain"
        assert llm.complete("from llama-index").text == "echo: from llama-index"
        assert len(monitor_threads()) == 1
        assert chat.pool.monitor_running
        assert sum(i.requests for i in llm.pool.instances) == 2

        # Closing the face that did not build the pool leaves the pool open.
        llm.close()
        assert not chat.pool.closed
        assert chat.invoke("still open").content == "echo: still open"
    finally:
        chat.close()
    assert chat.pool.closed
    assert monitor_threads() == []


def test_as_langchain_shares_pool(start_servers, tmp_path):
    servers = start_servers(2)
    config = write_config(tmp_path / "config.yaml", [s.url for s in servers])
    with PooledOllamaLLM.from_config(config) as llm:
        chat = llm.as_langchain()
        assert chat.pool is llm.pool
        assert chat.num_ctx == 8192
        assert chat.num_predict == 512
        assert chat.temperature == 0.2
        answers = [*chat.batch(["a", "b"]), llm.complete("c"), llm.complete("d")]
        assert len(monitor_threads()) == 1
        chat.close()
        assert not llm.pool.closed
    assert [a.content for a in answers[:2]] == ["echo: a", "echo: b"]
    assert llm.pool.closed
    assert [s.stats.requests["/api/chat"] for s in servers] == [2, 2]


def test_generation_settings_reach_server(start_servers):
    servers = start_servers(1, thinking="let me see")
    llm = make_llm(
        servers,
        temperature=0.3,
        context_window=2048,
        thinking=True,
        keep_alive="10m",
        additional_kwargs={"num_predict": 64, "seed": 7},
    )
    with llm:
        response = llm.chat(user("hi"), options={"seed": 8})
    request = servers[0].stats.recent_requests[-1]
    assert request.options == {
        "temperature": 0.3,
        "num_ctx": 2048,
        "num_predict": 64,
        "seed": 8,
    }
    assert request.think is True
    assert response.message.content == "echo: hi"
    assert response.message.blocks[0].content == "let me see"


# -- Metadata ----------------------------------------------------------------------


def test_metadata_needs_no_server():
    urls = [f"http://127.0.0.1:{port}" for port in dead_ports(2)]
    instances = [
        {"base_url": urls[0], "model": "llama3.2"},
        {"base_url": urls[1], "model": "qwen3"},
    ]
    llm = PooledOllamaLLM(
        instances=instances,
        context_window=16384,
        additional_kwargs={"num_predict": 300},
        is_function_calling_model=False,
    )
    with llm:
        metadata = llm.metadata
        assert not llm.pool.monitor_running
    assert metadata.context_window == 16384
    assert metadata.num_output == 300
    assert metadata.is_chat_model is True
    assert metadata.is_function_calling_model is False
    assert metadata.model_name == "llama3.2:latest,qwen3:latest"
    assert all(i.requests == 0 for i in llm.pool.instances)


def test_serialized_settings_hide_secrets():
    port = dead_ports(1)[0]
    url = f"http://user:s3cret@127.0.0.1:{port}"
    llm = PooledOllamaLLM(
        base_urls=[url],
        model="llama3.2",
        headers={"Authorization": "Bearer t0ken"},
        health_check_interval=0,
    )
    embedding = PooledOllamaEmbedding(
        instances=[{"base_url": url, "model": "nomic-embed-text"}],
        model_name="nomic-embed-text",
        client_kwargs={"headers": {"Authorization": "Bearer t0ken"}},
        health_check_interval=0,
    )
    with llm:
        shown = [llm.to_json(), repr(llm), str(embedding.to_dict()), repr(embedding)]
        embedding.close()
    for text in shown:
        assert "s3cret" not in text
        assert "t0ken" not in text
    assert f"http://user:***@127.0.0.1:{port}" in shown[0]


def test_metadata_defaults():
    urls = [f"http://127.0.0.1:{port}" for port in dead_ports(1)]
    with PooledOllamaLLM(base_urls=urls, model="llama3.2") as llm:
        metadata = llm.metadata
    assert metadata.context_window == 3900
    assert metadata.num_output == 256
    assert metadata.model_name == "llama3.2"


# -- Chat, completion and streaming ------------------------------------------------


def test_chat_and_complete_sync(start_servers):
    servers = start_servers(2)
    urls = {s.url for s in servers}
    with make_llm(servers) as llm:
        response = llm.chat(user("hello there"))
        completion = llm.complete("plain prompt")
    assert response.message.content == "echo: hello there"
    assert response.message.role == MessageRole.ASSISTANT
    assert response.additional_kwargs["instance"] in urls
    assert response.raw["instance"] == response.additional_kwargs["instance"]
    assert response.raw["done"] is True
    assert response.raw["usage"]["completion_tokens"] > 0
    assert completion.text == "echo: plain prompt"
    assert completion.additional_kwargs["instance"] in urls


async def test_chat_and_complete_async(start_servers):
    servers = start_servers(2)
    async with make_llm(servers) as llm:
        responses = await asyncio.gather(*(llm.achat(user(f"q{n}")) for n in range(6)))
        completion = await llm.acomplete("async prompt")
    assert [r.message.content for r in responses] == [f"echo: q{n}" for n in range(6)]
    served = Counter(r.additional_kwargs["instance"] for r in responses)
    assert sorted(served.values()) == [3, 3]
    assert completion.text == "echo: async prompt"


def test_stream_chat_yields_deltas(start_servers):
    servers = start_servers(2)
    with make_llm(servers) as llm:
        responses = list(llm.stream_chat(user("one two three")))
        completions = list(llm.stream_complete("four five"))
    assert len(responses) > 2
    assert "".join(r.delta or "" for r in responses) == "echo: one two three"
    assert responses[-1].message.content == "echo: one two three"
    assert responses[-1].raw["usage"]["total_tokens"] > 0
    assert "".join(c.delta or "" for c in completions) == "echo: four five"
    assert completions[-1].text == "echo: four five"


async def test_astream_chat_yields_deltas(start_servers):
    servers = start_servers(2)
    async with make_llm(servers) as llm:
        stream = await llm.astream_chat(user("one two three"))
        responses = [r async for r in stream]
        completion_stream = await llm.astream_complete("four five")
        completions = [c async for c in completion_stream]
    assert "".join(r.delta or "" for r in responses) == "echo: one two three"
    assert responses[-1].additional_kwargs["instance"] in {s.url for s in servers}
    assert completions[-1].text == "echo: four five"


def test_async_clients_survive_new_event_loops(start_servers):
    servers = start_servers(2)
    with make_llm(servers) as llm:
        first = asyncio.run(llm.achat(user("first loop")))
        second = asyncio.run(llm.achat(user("second loop")))
        third = asyncio.run(llm.achat(user("third loop")))
    assert first.message.content == "echo: first loop"
    assert second.message.content == "echo: second loop"
    assert third.message.content == "echo: third loop"


def test_image_blocks_reach_server(start_servers):
    servers = start_servers(1)
    message = ChatMessage(
        role=MessageRole.USER,
        blocks=[TextBlock(text="what is this?"), ImageBlock(image=b"\x89PNG fake")],
    )
    with make_llm(servers) as llm:
        llm.chat([message])
    sent = servers[0].stats.recent_requests[-1].messages[-1]
    assert sent["content"] == "what is this?"
    assert len(sent["images"]) == 1


# -- Failover ----------------------------------------------------------------------


def test_stream_stopped_early_frees_slot(start_servers):
    servers = start_servers(1, token_delay=0.01)
    with make_llm(servers) as llm:
        stream = llm.stream_chat(user("a b c d e f g h"))
        first = next(stream)
        assert llm.pool.in_flight == 1
        stream.close()
        assert llm.pool.in_flight == 0
        assert llm.complete("next").text == "echo: next"
    assert first.delta == "echo:"


def test_stream_fails_over_before_first_chunk(start_servers):
    failing = start_servers(1, fail_status=500)
    healthy = start_servers(1)
    with make_llm([*failing, *healthy]) as llm:
        responses = list(llm.stream_chat(user("still answered")))
    assert responses[-1].message.content == "echo: still answered"
    assert {r.additional_kwargs["instance"] for r in responses} == {healthy[0].url}
    assert failing[0].stats.requests["/api/chat"] == 1
    assert llm.pool.instances[0].failures == 1


async def test_astream_fails_over_before_first_chunk(start_servers):
    failing = start_servers(1, fail_status=500)
    healthy = start_servers(1)
    async with make_llm([*failing, *healthy]) as llm:
        stream = await llm.astream_chat(user("still answered"))
        responses = [r async for r in stream]
    assert responses[-1].message.content == "echo: still answered"
    assert responses[-1].additional_kwargs["instance"] == healthy[0].url
    assert failing[0].stats.requests["/api/chat"] == 1


def collect_deltas(stream: Iterator[ChatResponse], deltas: list[str | None]) -> None:
    for response in stream:
        deltas.append(response.delta)


async def acollect_deltas(
    stream: AsyncIterator[ChatResponse], deltas: list[str | None]
) -> None:
    async for response in stream:
        deltas.append(response.delta)


def test_stream_cut_after_chunks_raises(start_servers):
    servers = start_servers(2, error_after_chunks=2)
    deltas: list[str | None] = []
    with make_llm(servers) as llm, pytest.raises(StreamInterruptedError) as info:
        collect_deltas(llm.stream_chat(user("a b c d e f")), deltas)
    assert len(deltas) == 2
    assert info.value.instance_url == servers[0].url
    assert servers[1].stats.requests["/api/chat"] == 0


async def test_astream_cut_after_chunks_raises(start_servers):
    servers = start_servers(2, close_after_chunks=2)
    deltas: list[str | None] = []
    async with make_llm(servers) as llm:
        stream = await llm.astream_chat(user("a b c d e f"))
        with pytest.raises(StreamInterruptedError):
            await acollect_deltas(stream, deltas)
    assert len(deltas) == 2
    assert sum(s.stats.requests["/api/chat"] for s in servers) == 1


def test_chat_retries_broken_stream_elsewhere(start_servers):
    broken = start_servers(1, error_after_chunks=1)
    healthy = start_servers(1)
    with make_llm([*broken, *healthy]) as llm:
        response = llm.chat(user("whole answer"))
    assert response.message.content == "echo: whole answer"
    assert response.additional_kwargs["instance"] == healthy[0].url
    assert broken[0].stats.requests["/api/chat"] == 1


async def test_achat_retries_stream_without_done(start_servers):
    broken = start_servers(1, close_after_chunks=2)
    healthy = start_servers(1)
    async with make_llm([*broken, *healthy]) as llm:
        response = await llm.achat(user("whole answer"))
    assert response.message.content == "echo: whole answer"
    assert response.additional_kwargs["instance"] == healthy[0].url


# -- Tools and structured output ---------------------------------------------------


def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


TOOLS = [FunctionTool.from_defaults(fn=multiply), FunctionTool.from_defaults(fn=add)]


def test_chat_with_tools_returns_calls(start_servers):
    calls = [{"name": "multiply", "arguments": {"a": 3, "b": 4}}]
    servers = start_servers(1, tool_calls=calls)
    with make_llm(servers) as llm:
        response = llm.chat_with_tools(TOOLS, user_msg="What is 3 times 4?")
        selections = llm.get_tool_calls_from_response(response)
    assert len(selections) == 1
    assert selections[0].tool_name == "multiply"
    assert selections[0].tool_kwargs == {"a": 3, "b": 4}
    assert selections[0].tool_id == "multiply"
    sent = servers[0].stats.recent_requests[-1]
    assert [t["function"]["name"] for t in sent.tools] == ["multiply", "add"]
    assert sent.messages[-1]["content"] == "What is 3 times 4?"


def test_predict_and_call_runs_tool(start_servers):
    calls = [{"name": "add", "arguments": {"a": 2, "b": 5}}]
    servers = start_servers(2, tool_calls=calls)
    with make_llm(servers) as llm:
        output = llm.predict_and_call(TOOLS, user_msg="What is 2 plus 5?")
    assert output.response == "7"
    assert output.sources[0].tool_name == "add"


def test_parallel_tool_calls_kept_when_allowed(start_servers):
    calls = [
        {"name": "multiply", "arguments": {"a": 1, "b": 2}},
        {"name": "add", "arguments": {"a": 3, "b": 4}},
    ]
    servers = start_servers(1, tool_calls=calls)
    with make_llm(servers) as llm:
        single = llm.chat_with_tools(TOOLS, user_msg="go")
        both = llm.chat_with_tools(TOOLS, user_msg="go", allow_parallel_tool_calls=True)
        no_call = llm.chat(user("no tools here"))
        names = [s.tool_name for s in llm.get_tool_calls_from_response(both)]
        assert len(llm.get_tool_calls_from_response(single)) == 1
        assert llm.get_tool_calls_from_response(no_call, False) == []
        with pytest.raises(ValueError, match="expected at least one tool call"):
            llm.get_tool_calls_from_response(no_call)
    assert names == ["multiply", "add"]


def test_stream_chat_with_tools_ends_with_calls(start_servers):
    calls = [{"name": "multiply", "arguments": {"a": 6, "b": 7}}]
    servers = start_servers(1, tool_calls=calls)
    with make_llm(servers) as llm:
        responses = list(llm.stream_chat_with_tools(TOOLS, user_msg="6 times 7?"))
        selections = llm.get_tool_calls_from_response(responses[-1])
    assert [(s.tool_name, s.tool_kwargs) for s in selections] == [
        ("multiply", {"a": 6, "b": 7})
    ]


async def test_function_agent_calls_tool(start_servers):
    calls = [{"name": "multiply", "arguments": {"a": 6, "b": 7}}]
    servers = start_servers(2, tool_calls=calls)
    async with make_llm(servers) as llm:
        agent = FunctionAgent(tools=TOOLS, llm=llm)
        result = await agent.run("What is 6 times 7?")
    assert [call.tool_output.raw_output for call in result.tool_calls] == [42]
    sent = [r.messages[-1] for s in servers for r in s.stats.recent_requests]
    assert sorted(m["role"] for m in sent) == ["tool", "user"]
    assert {"role": "tool", "content": "42"} in sent
    # The stand-in echoes the last user message once the tool result is in.
    assert str(result) == "echo: What is 6 times 7?"


def test_tool_call_history_is_sent_back(start_servers):
    servers = start_servers(1)
    history = [
        ChatMessage(role=MessageRole.USER, content="3 times 4?"),
        ChatMessage(
            role=MessageRole.ASSISTANT,
            blocks=[
                ToolCallBlock(tool_name="multiply", tool_kwargs='{"a": 3, "b": 4}')
            ],
        ),
        ChatMessage(
            role=MessageRole.TOOL,
            content="12",
            additional_kwargs={"tool_name": "multiply"},
        ),
    ]
    with make_llm(servers) as llm:
        response = llm.chat(history)
    sent = servers[0].stats.recent_requests[-1].messages
    assert sent[1]["tool_calls"] == [
        {"function": {"name": "multiply", "arguments": {"a": 3, "b": 4}}}
    ]
    assert sent[2]["role"] == "tool"
    assert sent[2]["tool_name"] == "multiply"
    # The stand-in echoes the last user message.
    assert response.message.content == "echo: 3 times 4?"


class Capital(BaseModel):
    city: str
    population: int


async def test_structured_predict_sends_schema(start_servers):
    servers = start_servers(1)
    prompt = PromptTemplate("Name the capital of {country}.")
    async with make_llm(servers) as llm:
        capital = llm.structured_predict(Capital, prompt, country="France")
        async_capital = await llm.astructured_predict(Capital, prompt, country="Peru")
    assert isinstance(capital, Capital)
    assert isinstance(async_capital, Capital)
    sent = servers[0].stats.recent_requests[-1]
    assert sent.format == Capital.model_json_schema()
