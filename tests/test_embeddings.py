"""Pooled embeddings (LangChain and LlamaIndex faces) against stand-in servers."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from ollama_pool import (
    AllAttemptsFailedError,
    NoInstanceError,
    OllamaPool,
    PooledChatOllama,
    PooledOllamaEmbedding,
    PooledOllamaEmbeddings,
)

MODELS = ["llama3.2", "nomic-embed-text"]
TEXTS = [f"text number {n}" for n in range(10)]


def make_embeddings(servers: list[Any], **kwargs: Any) -> PooledOllamaEmbeddings:
    options: dict[str, Any] = {
        "model": "nomic-embed-text",
        "health_check_interval": 0.5,
        "batch_size": 3,
    }
    options.update(kwargs)
    embeddings = PooledOllamaEmbeddings(base_urls=[s.url for s in servers], **options)
    embeddings.pool.backoff_base = 0.01
    return embeddings


def embed_counts(servers: list[Any]) -> list[int]:
    return [s.stats.requests["/api/embed"] for s in servers]


async def wait_until(condition: Any, limit: float = 5.0) -> bool:
    """Poll `condition` until it is true or `limit` seconds pass; return its value."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.01)
    return bool(condition())


# -- LangChain face ----------------------------------------------------------------


def test_embed_documents_in_batches(start_servers):
    servers = start_servers(3, models=MODELS, embed_dim=16)
    with make_embeddings(servers) as embeddings:
        vectors = embeddings.embed_documents(TEXTS)
        query = embeddings.embed_query(TEXTS[7])
    assert len(vectors) == 10
    assert all(len(vector) == 16 for vector in vectors)
    # The stand-in's vectors depend on the text only, so order is checkable.
    assert vectors[7] == query
    assert len({tuple(vector) for vector in vectors}) == 10
    # 10 texts in batches of 3 are 4 requests, plus the query.
    assert sorted(embed_counts(servers)) == [1, 2, 2]


async def test_aembed_documents_matches_sync(start_servers):
    servers = start_servers(2, models=MODELS)
    async with make_embeddings(servers, batch_size=4) as embeddings:
        vectors = await embeddings.aembed_documents(TEXTS)
        query = await embeddings.aembed_query(TEXTS[0])
        sync_vectors = await asyncio.to_thread(embeddings.embed_documents, TEXTS)
    assert vectors == sync_vectors
    assert query == vectors[0]
    assert sum(embed_counts(servers)) == 3 + 1 + 3


def test_empty_input_sends_nothing(start_servers):
    servers = start_servers(1, models=MODELS)
    with make_embeddings(servers) as embeddings:
        assert embeddings.embed_documents([]) == []
    assert embed_counts(servers) == [0]


async def test_async_batches_run_concurrently(start_servers):
    # parallel=0 keeps every request in the server's queue, so each server's
    # waiting count shows how many batches are in flight at once.
    servers = start_servers(3, models=MODELS, parallel=0)
    async with make_embeddings(servers, batch_size=2) as embeddings:
        task = asyncio.create_task(embeddings.aembed_documents(TEXTS[:6]))
        waiting = await wait_until(
            lambda: [s.stats.waiting_requests for s in servers] == [1, 1, 1]
        )
        for server in servers:
            server.update(parallel=None)
        vectors = await task
    assert waiting
    assert len(vectors) == 6


async def test_sync_batches_run_in_threads(start_servers):
    servers = start_servers(2, models=MODELS, parallel=0)
    async with make_embeddings(servers, batch_size=1, max_concurrency=2) as embeddings:
        task = asyncio.create_task(asyncio.to_thread(embeddings.embed_documents, TEXTS))
        waiting = await wait_until(
            lambda: sum(s.stats.waiting_requests for s in servers) == 2
        )
        for server in servers:
            server.update(parallel=None)
        vectors = await task
    assert waiting
    assert len(vectors) == 10


def test_failed_batch_retried_elsewhere(start_servers):
    failing = start_servers(1, models=MODELS, fail_status=500, fail_first=1)
    healthy = start_servers(1, models=MODELS)
    with make_embeddings([*failing, *healthy], batch_size=10) as embeddings:
        vectors = embeddings.embed_documents(TEXTS)
        failures = embeddings.pool.instances[0].failures
    assert len(vectors) == 10
    assert failing[0].stats.scripted_failures == 1
    assert healthy[0].stats.embed_requests == 1
    assert failures == 1


def test_embedding_model_next_to_chat_model(start_servers):
    lacks = start_servers(1, models=["llama3.2"])
    has = start_servers(2, models=MODELS)
    servers = [*lacks, *has]
    instances = [{"base_url": s.url, "model": "llama3.2"} for s in servers]
    with PooledChatOllama(instances=instances, health_check_interval=0.5) as chat:
        embeddings = PooledOllamaEmbeddings(
            pool=chat.pool, model="nomic-embed-text", batch_size=2
        )
        vectors = embeddings.embed_documents(TEXTS)
        answer = chat.invoke("chat still works")
        missing = chat.pool.instances[0].missing_models
        healthy = chat.pool.instances[0].healthy
        embeddings.close()
        assert not chat.pool.closed
    assert len(vectors) == 10
    assert answer.content == "echo: chat still works"
    # One 404 teaches the pool that the first server lacks the embedding model.
    assert embed_counts(lacks) == [1]
    assert "nomic-embed-text:latest" in missing
    assert healthy


def test_all_attempts_failed(start_servers):
    servers = start_servers(2, models=MODELS, fail_status=500)
    embeddings = make_embeddings(servers, max_retries=1)
    with embeddings, pytest.raises(AllAttemptsFailedError) as info:
        embeddings.embed_documents(TEXTS[:2])
    # Each of the two rounds tries each instance once.
    assert len(info.value.attempts) == 4
    assert embed_counts(servers) == [2, 2]


def test_model_missing_everywhere(start_servers):
    servers = start_servers(2)
    pool = OllamaPool(
        [{"base_url": s.url, "model": "llama3.2"} for s in servers],
        health_check_interval=0,
    )
    embeddings = PooledOllamaEmbeddings(pool=pool, model="nomic-embed-text")
    with pool, embeddings, pytest.raises(NoInstanceError, match="nomic-embed-text"):
        embeddings.embed_query("anything")
    assert embed_counts(servers) == [1, 1]


def test_dimensions_sent_to_server(start_servers):
    servers = start_servers(1, models=MODELS)
    with make_embeddings(servers, dimensions=8, keep_alive="1m") as embeddings:
        vector = embeddings.embed_query("short")
    assert len(vector) == 8


def test_needs_instances():
    with pytest.raises(ValueError, match="base_urls"):
        PooledOllamaEmbeddings(model="nomic-embed-text")


# -- LlamaIndex face ---------------------------------------------------------------


def make_embedding(servers: list[Any], **kwargs: Any) -> PooledOllamaEmbedding:
    return PooledOllamaEmbedding(
        base_urls=[s.url for s in servers],
        model_name="nomic-embed-text",
        health_check_interval=0.5,
        **kwargs,
    )


def test_llama_index_batches(start_servers):
    servers = start_servers(3, models=MODELS, embed_dim=12)
    embedding = make_embedding(servers, embed_batch_size=4)
    try:
        vectors = embedding.get_text_embedding_batch(TEXTS)
        single = embedding.get_text_embedding(TEXTS[3])
        query = embedding.get_query_embedding(TEXTS[3])
    finally:
        embedding.close()
    assert len(vectors) == 10
    assert all(len(vector) == 12 for vector in vectors)
    assert vectors[3] == single
    assert query == single
    # 3 batches of at most 4, then two single texts, round robin over 3 servers.
    assert embed_counts(servers) == [2, 2, 1]


async def test_llama_index_async_batches(start_servers):
    servers = start_servers(2, models=MODELS)
    embedding = make_embedding(servers, embed_batch_size=5)
    try:
        vectors = await embedding.aget_text_embedding_batch(TEXTS)
        query = await embedding.aget_query_embedding(TEXTS[9])
        await embedding.aclose()
    finally:
        embedding.close()
    assert len(vectors) == 10
    assert query == vectors[9]
    assert embed_counts(servers) == [2, 1]


def test_llama_index_instructions(start_servers):
    servers = start_servers(1, models=MODELS)
    embedding = make_embedding(
        servers, query_instruction="search_query: ", text_instruction="doc: "
    )
    with make_embeddings(servers) as plain:
        try:
            query = embedding.get_query_embedding("capital of Peru")
            text = embedding.get_text_embedding("Lima")
            expected = plain.embed_documents(
                ["search_query: capital of Peru", "doc: Lima"]
            )
        finally:
            embedding.close()
    assert [query, text] == expected
