"""config.yaml loading: the shipped file, shorthand forms and every error."""

from __future__ import annotations

from pathlib import Path

import pytest

from ollama_pool import ConfigError, OllamaPool, PooledChatOllama, load_config

ROOT = Path(__file__).resolve().parent.parent

VALID = """
llm:
  ollama:
    base_url: "http://127.0.0.1:11434"
    model: "llama3.2"
    temperature: 0.2
    max_tokens: 64
    num_ctx: 2048
    max_async: 6
    timeout: 120
    multiple_instances:
      enabled: true
      load_balancing: "least_active"
      health_check_interval: 5
      max_retries: 2
      instances:
        - base_url: "http://127.0.0.1:11434"
          model: "llama3.2"
        - base_url: "http://127.0.0.1:11435"
performance:
  num_workers: 4
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_shipped_config_loads():
    config = load_config(ROOT / "config.yaml")
    assert len(config.instances) == 2
    assert config.num_workers == 8
    assert config.chat_kwargs()["num_predict"] == 4096
    assert config.pool_kwargs()["strategy"] == "round_robin"


def test_valid_config_maps_every_key(tmp_path):
    config = load_config(write(tmp_path, VALID))
    pool_kwargs = config.pool_kwargs()
    assert pool_kwargs["strategy"] == "least_active"
    assert pool_kwargs["health_check_interval"] == 5
    assert pool_kwargs["max_retries"] == 2
    assert pool_kwargs["read_timeout"] == 120
    assert pool_kwargs["max_in_flight"] == 6
    assert [i["base_url"] for i in pool_kwargs["instances"]] == [
        "http://127.0.0.1:11434",
        "http://127.0.0.1:11435",
    ]
    # The second instance inherits llm.ollama.model.
    assert pool_kwargs["instances"][1]["model"] == "llama3.2"
    assert config.chat_kwargs() == {
        "model": "llama3.2",
        "temperature": 0.2,
        "num_ctx": 2048,
        "num_predict": 64,
    }
    assert config.num_workers == 4


def test_single_base_url_when_disabled(tmp_path):
    text = VALID.replace("enabled: true", "enabled: false")
    config = load_config(write(tmp_path, text))
    assert [i.base_url for i in config.instances] == ["http://127.0.0.1:11434"]


def test_from_config_builds_pool(tmp_path):
    llm = PooledChatOllama.from_config(write(tmp_path, VALID), temperature=0)
    try:
        assert llm.pool.strategy == "least_active"
        assert len(llm.pool.instances) == 2
        assert llm.model == "llama3.2"
        assert llm.temperature == 0
        assert llm.num_predict == 64
    finally:
        llm.close()
    assert llm.pool.closed


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ('"least_active"', '"fastest"', "multiple_instances.load_balancing"),
        (
            "health_check_interval: 5",
            "health_check_interval: -1",
            "health_check_interval",
        ),
        (
            '- base_url: "http://127.0.0.1:11435"',
            '- base_url: "127.0.0.1 11435"',
            "instances[1].base_url",
        ),
        (
            '- base_url: "http://127.0.0.1:11435"',
            '- base_url: "http://127.0.0.1:port"',
            "instances[1].base_url",
        ),
        (
            '    model: "llama3.2"\n    temperature',
            "    temperature",
            "instances[1].model",
        ),
        ("max_retries: 2", "max_retries: two", "max_retries"),
        ("num_workers: 4", "num_workers: 0", "performance.num_workers"),
        ("timeout: 120", "timeout: 0", "llm.ollama.timeout"),
        (
            "max_retries: 2",
            "max_retries: 2\n      retries_per_minute: 3",
            "retries_per_minute",
        ),
    ],
)
def test_invalid_values_name_file_and_key(tmp_path, old, new, key):
    assert old in VALID
    path = write(tmp_path, VALID.replace(old, new))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert key in str(info.value)


def test_empty_instance_list(tmp_path):
    text = VALID.split("      instances:")[0] + "      instances: []\n"
    with pytest.raises(ConfigError, match=r"instances.*non-empty"):
        load_config(write(tmp_path, text))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write(tmp_path, "llm: [unclosed"))
    with pytest.raises(ConfigError, match=r"llm\.ollama"):
        load_config(write(tmp_path, "performance: {}\n"))


def test_pool_arguments_are_checked():
    with pytest.raises(ConfigError, match="strategy"):
        OllamaPool(["http://127.0.0.1:1"], model="m", strategy="nope")
    with pytest.raises(ConfigError, match="empty"):
        OllamaPool([], model="m")
    with pytest.raises(ConfigError, match="read_timeout"):
        OllamaPool(["http://127.0.0.1:1"], model="m", read_timeout=0)
    with pytest.raises(ConfigError, match=r"instances\[0\]\.base_url"):
        OllamaPool(["ftp://127.0.0.1:1"], model="m")
    with pytest.raises(ConfigError, match=r"instances\[0\]\.base_url"):
        OllamaPool(["http://exa mple:9"], model="m")


def test_malformed_url_error_hides_password():
    with pytest.raises(ConfigError) as info:
        OllamaPool(["http://user:hunter2@127.0.0.1:notaport"], model="m")
    assert "hunter2" not in str(info.value)
