"""Regression tests for bugs found by trying to break the product."""

from __future__ import annotations

import base64
import gc
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ollama_pool import ConfigError, OllamaPool, PooledChatOllama, load_config
from ollama_pool._manager import InstanceManager, ManagerError
from ollama_pool.testing import StandInServer

StartServers = Callable[..., list[StandInServer]]

CONFIG_HEAD = """
llm:
  ollama:
    model: llama3.2
    base_url: "http://127.0.0.1:9"
"""


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_credentials_stay_on_their_instance(start_servers: StartServers) -> None:
    first, second = start_servers(2)
    secret_url = first.url.replace("http://", "http://alice:s3cret@")
    headers = {"X-Trace": "1"}
    llm = PooledChatOllama(
        base_urls=[secret_url, second.url],
        model="llama3.2",
        client_kwargs={"headers": headers},
        health_check_interval=0,
    )
    try:
        llm.invoke("one")
        llm.invoke("two")
        token = base64.b64encode(b"alice:s3cret").decode()
        assert headers == {"X-Trace": "1"}
        assert token not in repr(llm)
        plain = llm._sync_backends[1]._client._client.headers
        assert "authorization" not in plain
        assert plain["x-trace"] == "1"
    finally:
        llm.close()


def test_config_non_string_key(tmp_path: Path) -> None:
    path = write_config(tmp_path, CONFIG_HEAD + "    1: x\n    zz: y\n")
    config = load_config(path)
    assert config.model == "llama3.2"
    nested = CONFIG_HEAD + "    multiple_instances:\n      1: x\n      zz: y\n"
    with pytest.raises(ConfigError, match="multiple_instances") as info:
        load_config(write_config(tmp_path, nested))
    assert str(path) in str(info.value)
    with pytest.raises(ConfigError, match="unknown keys"):
        OllamaPool([{"base_url": "http://127.0.0.1:9", 1: "x", "zz": "y"}])


def test_config_yaml_error_masks_password(tmp_path: Path) -> None:
    text = 'llm:\n  ollama:\n    base_url: "http://u:hunter2@127.0.0.1:9\n'
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, text))
    assert "invalid YAML" in str(info.value)
    assert "hunter2" not in str(info.value)
    assert "hunter2" not in repr(info.value.__cause__)


@pytest.mark.parametrize(
    "line", ["timeout: .nan", "timeout: .inf", "temperature: .nan"]
)
def test_config_non_finite_number(tmp_path: Path, line: str) -> None:
    key = line.split(":")[0]
    with pytest.raises(ConfigError, match=f"llm.ollama.{key}"):
        load_config(write_config(tmp_path, CONFIG_HEAD + f"    {line}\n"))


@pytest.mark.parametrize(
    "name", ["read_timeout", "connect_timeout", "max_ejection_time", "backoff_base"]
)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_pool_non_finite_setting(name: str, value: float) -> None:
    with pytest.raises(ConfigError, match=name):
        OllamaPool(["http://127.0.0.1:9"], model="m", **{name: value})


@pytest.mark.parametrize(
    ("line", "key"),
    [("stop: 5", "llm.ollama.stop"), ("top_k: lots", "llm.ollama.top_k")],
)
def test_config_chat_option_type(tmp_path: Path, line: str, key: str) -> None:
    path = write_config(tmp_path, CONFIG_HEAD + f"    {line}\n")
    with pytest.raises(ConfigError, match=key) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_dropped_model_stops_monitor(start_servers: StartServers) -> None:
    (server,) = start_servers(1)
    before = set(threading.enumerate())
    llm = PooledChatOllama(base_urls=[server.url], model="llama3.2")
    llm.invoke("hi")
    monitors = [
        thread
        for thread in set(threading.enumerate()) - before
        if thread.name == "ollama-pool-health"
    ]
    assert len(monitors) == 1
    del llm
    gc.collect()
    monitors[0].join(timeout=30)
    assert not monitors[0].is_alive()


@pytest.mark.parametrize(
    "fields", [{"pid": -1}, {"pid": "123"}, {"pid": 12.5}, {"create_time": "x"}]
)
def test_state_file_field_types(tmp_path: Path, fields: dict[str, object]) -> None:
    record = {
        "port": 1,
        "host": "127.0.0.1",
        "pid": 999_999_999,
        "create_time": 0.0,
        "cmdline": ["ollama", "serve"],
        "log_path": str(tmp_path / "ollama_1.log"),
        "model": "llama3.2",
        "models_dir": None,
        "gpu": None,
        "started_at": "2026-01-01T00:00:00",
        **fields,
    }
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "instances.json").write_text(json.dumps([record]))
    manager = InstanceManager(state_dir=state_dir, log_dir=tmp_path / "logs")
    with pytest.raises(ManagerError, match="state file"):
        manager.status(cpu_sample=0)


@pytest.mark.parametrize(
    "name", ["library/llama3.2", "registry.ollama.ai/library/llama3.2:latest"]
)
def test_model_name_with_namespace(start_servers: StartServers, name: str) -> None:
    (llama,) = start_servers(1, models=["llama3.2:latest"])
    (qwen,) = start_servers(1, models=["qwen3:latest"])
    llm = PooledChatOllama(
        instances=[
            {"base_url": qwen.url, "model": "qwen3"},
            {"base_url": llama.url, "model": "llama3.2"},
        ],
        health_check_interval=0,
    )
    try:
        for _ in range(2):
            message = llm.invoke("hi", model=name)
            assert message.response_metadata["instance"] == llama.url
        assert qwen.stats.requests["/api/chat"] == 0
        assert all(not i.missing_models for i in llm.pool.instances)
    finally:
        llm.close()


class _BadTagsHandler(BaseHTTPRequestHandler):
    """Ollama look-alike: 404 for every chat, /api/tags with non-string names."""

    tags_requests = 0

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, status: int, payload: object) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/api/tags":
            type(self).tags_requests += 1
            self._send(200, {"models": [{"name": 5}, {"name": ["x"]}]})
        else:
            self._send(200, {"version": "0.12.3"})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._send(404, {"error": "model 'llama3.2' not found"})


def test_monitor_survives_bad_tags(start_servers: StartServers) -> None:
    (good,) = start_servers(1)
    bad = ThreadingHTTPServer(("127.0.0.1", 0), _BadTagsHandler)
    thread = threading.Thread(target=bad.serve_forever, daemon=True)
    thread.start()
    bad_url = f"http://127.0.0.1:{bad.server_address[1]}"
    llm = PooledChatOllama(
        base_urls=[bad_url, good.url], model="llama3.2", health_check_interval=0.05
    )
    try:
        llm.invoke("one")
        llm.invoke("two")
        assert llm.pool.instances[0].missing_models
        for _ in range(200):
            if _BadTagsHandler.tags_requests >= 3:
                break
            time.sleep(0.05)
        assert _BadTagsHandler.tags_requests >= 3
        assert llm.pool.monitor_running
    finally:
        llm.close()
        bad.shutdown()
        bad.server_close()
