"""Loading and validation of config.yaml.

The file has the shape users of multi-instance Ollama setups already keep::

    llm:
      ollama:
        base_url: "http://localhost:11434"   # used when multiple_instances is off
        model: "gpt-oss:latest"
        temperature: 0.1
        max_tokens: 4096                     # sent as num_predict
        num_ctx: 8192
        max_async: 8                         # requests in flight across the pool
        timeout: 300                         # seconds between two chunks
        multiple_instances:
          enabled: true
          load_balancing: "round_robin"
          health_check_interval: 30
          max_retries: 3
          instances:
            - base_url: "http://localhost:11434"
              model: "gpt-oss:latest"
    performance:
      num_workers: 8

Every error names the file and the key.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ollama_pool._balancer import STRATEGIES
from ollama_pool._errors import ConfigError

logger = logging.getLogger(__name__)

# Keys of llm.ollama passed to ChatOllama as they are.
_CHAT_KEYS = (
    "temperature",
    "num_ctx",
    "num_predict",
    "top_k",
    "top_p",
    "seed",
    "stop",
    "keep_alive",
    "repeat_penalty",
    "reasoning",
    "format",
)
_OLLAMA_KEYS = {
    "base_url",
    "model",
    "max_tokens",
    "max_async",
    "timeout",
    "multiple_instances",
    *_CHAT_KEYS,
}
# Keys of multiple_instances and the OllamaPool argument each one sets.
_POOL_KEYS = {
    "load_balancing": "strategy",
    "health_check_interval": "health_check_interval",
    "max_retries": "max_retries",
    "connect_timeout": "connect_timeout",
    "max_in_flight_per_instance": "max_in_flight_per_instance",
    "eject_after_failures": "eject_after_failures",
    "base_ejection_time": "base_ejection_time",
    "max_ejection_time": "max_ejection_time",
    "retry_budget_ratio": "retry_budget_ratio",
}
_MULTI_KEYS = {"enabled", "instances", *_POOL_KEYS}


@dataclass(frozen=True)
class InstanceConfig:
    """One instance entry: where it listens and which model it serves."""

    base_url: str
    model: str | None = None
    max_in_flight: int | None = None


@dataclass(frozen=True)
class PoolConfig:
    """A validated config.yaml.

    `pool_kwargs()` gives the arguments of `OllamaPool`, `chat_kwargs()` those of
    `PooledChatOllama` / `ChatOllama`.
    """

    path: str | None
    instances: tuple[InstanceConfig, ...]
    model: str | None = None
    pool_options: Mapping[str, Any] = field(default_factory=dict)
    chat_options: Mapping[str, Any] = field(default_factory=dict)
    num_workers: int | None = None

    def pool_kwargs(self) -> dict[str, Any]:
        instances = [
            {
                key: value
                for key, value in (
                    ("base_url", item.base_url),
                    ("model", item.model),
                    ("max_in_flight", item.max_in_flight),
                )
                if value is not None
            }
            for item in self.instances
        ]
        return {"instances": instances, "model": self.model, **self.pool_options}

    def chat_kwargs(self) -> dict[str, Any]:
        return {"model": self.model, **self.chat_options}


def load_config(path: str | Path) -> PoolConfig:
    """Read and validate a config.yaml; raises `ConfigError` naming file and key."""
    path_text = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        message = f"cannot read the file: {exc.strerror}"
        raise ConfigError(message, path=path_text) from exc
    except UnicodeDecodeError as exc:
        message = f"the file is not valid UTF-8: {exc.reason} at byte {exc.start}"
        raise ConfigError(message, path=path_text) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # Not chained: the text of a YAML error quotes the offending line, which
        # may hold a base_url password.
        raise ConfigError(_describe_yaml_error(exc), path=path_text) from None
    return parse_config(data, path=path_text)


def _describe_yaml_error(exc: yaml.YAMLError) -> str:
    """Return where and why the YAML is invalid, without quoting the file."""
    parts = []
    if isinstance(exc, yaml.MarkedYAMLError):
        for text, mark in (
            (exc.context, exc.context_mark),
            (exc.problem, exc.problem_mark),
        ):
            if text and mark:
                parts.append(f"{text} (line {mark.line + 1}, column {mark.column + 1})")
            elif text:
                parts.append(text)
    return f"invalid YAML: {'; '.join(parts) or type(exc).__name__}"


def parse_config(data: object, *, path: str | None = None) -> PoolConfig:
    """Validate an already parsed config mapping; see `load_config`."""
    reader = _Reader(path)
    root = reader.mapping(data if data is not None else {}, "")
    llm = reader.mapping(root.get("llm", {}), "llm")
    ollama = reader.mapping(llm.get("ollama"), "llm.ollama", required=True)
    for key in sorted(set(ollama) - _OLLAMA_KEYS, key=str):
        logger.warning("%s: key llm.ollama.%s is not used by ollama-pool", path, key)

    model = reader.optional_str(ollama, "model", "llm.ollama.model")
    chat_options: dict[str, Any] = {
        key: ollama[key] for key in _CHAT_KEYS if ollama.get(key) is not None
    }
    if ollama.get("max_tokens") is not None:
        chat_options["num_predict"] = reader.positive_int(
            ollama["max_tokens"], "llm.ollama.max_tokens"
        )
    if "num_ctx" in chat_options:
        chat_options["num_ctx"] = reader.positive_int(
            chat_options["num_ctx"], "llm.ollama.num_ctx"
        )
    if "temperature" in chat_options:
        chat_options["temperature"] = reader.number(
            chat_options["temperature"], "llm.ollama.temperature", minimum=0
        )
    for key, value in chat_options.items():
        reader.chat_option(key, value, f"llm.ollama.{key}")

    pool_options: dict[str, Any] = {}
    if ollama.get("timeout") is not None:
        pool_options["read_timeout"] = reader.number(
            ollama["timeout"], "llm.ollama.timeout", minimum=0, strict=True
        )
    if ollama.get("max_async") is not None:
        pool_options["max_in_flight"] = reader.positive_int(
            ollama["max_async"], "llm.ollama.max_async"
        )

    multi = reader.mapping(
        ollama.get("multiple_instances", {}), "llm.ollama.multiple_instances"
    )
    prefix = "llm.ollama.multiple_instances"
    unknown = sorted(set(multi) - _MULTI_KEYS, key=str)
    if unknown:
        raise ConfigError(
            f"unknown key; expected one of {', '.join(sorted(_MULTI_KEYS))}",
            path=path,
            key=f"{prefix}.{unknown[0]}",
        )
    enabled = multi.get("enabled", False)
    if not isinstance(enabled, bool):
        raise ConfigError(
            f"must be true or false, got {enabled!r}",
            path=path,
            key=f"{prefix}.enabled",
        )
    if enabled:
        instances = _read_instances(reader, multi.get("instances"), model, prefix)
        pool_options.update(_read_pool_options(reader, multi, prefix))
    else:
        base_url = ollama.get("base_url")
        if base_url is None:
            raise ConfigError(
                "missing; give base_url, or enable multiple_instances with a list "
                "of instances",
                path=path,
                key="llm.ollama.base_url",
            )
        _check_instance_url(reader, base_url, "llm.ollama.base_url")
        instances = (InstanceConfig(base_url=base_url, model=model),)
    if model is None and any(item.model is None for item in instances):
        raise ConfigError(
            "missing model: set llm.ollama.model or a model on every instance",
            path=path,
            key="llm.ollama.model",
        )

    performance = reader.mapping(root.get("performance", {}), "performance")
    num_workers = performance.get("num_workers")
    if num_workers is not None:
        num_workers = reader.positive_int(num_workers, "performance.num_workers")
    return PoolConfig(
        path=path,
        instances=instances,
        model=model,
        pool_options=pool_options,
        chat_options=chat_options,
        num_workers=num_workers,
    )


def _read_instances(
    reader: _Reader, items: object, model: str | None, prefix: str
) -> tuple[InstanceConfig, ...]:
    key = f"{prefix}.instances"
    if not isinstance(items, list) or not items:
        raise ConfigError(
            "must be a non-empty list of {base_url, model} entries",
            path=reader.path,
            key=key,
        )
    result = []
    for index, item in enumerate(items):
        item_key = f"{key}[{index}]"
        entry = reader.mapping(item, item_key)
        unknown = set(entry) - {"base_url", "model", "max_in_flight"}
        if unknown:
            raise ConfigError(
                f"unknown keys {sorted(unknown, key=str)}; "
                f"expected base_url, model, max_in_flight",
                path=reader.path,
                key=item_key,
            )
        base_url = entry.get("base_url")
        _check_instance_url(reader, base_url, f"{item_key}.base_url")
        limit = entry.get("max_in_flight")
        if limit is not None:
            limit = reader.positive_int(limit, f"{item_key}.max_in_flight")
        instance_model = reader.optional_str(entry, "model", f"{item_key}.model")
        if instance_model is None and model is None:
            raise ConfigError(
                "missing model: set it here or in llm.ollama.model",
                path=reader.path,
                key=f"{item_key}.model",
            )
        result.append(
            InstanceConfig(
                base_url=str(base_url),
                model=instance_model or model,
                max_in_flight=limit,
            )
        )
    return tuple(result)


def _read_pool_options(
    reader: _Reader, multi: Mapping[str, Any], prefix: str
) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for key, argument in _POOL_KEYS.items():
        if multi.get(key) is None:
            continue
        value = multi[key]
        full_key = f"{prefix}.{key}"
        if key == "load_balancing":
            if value not in STRATEGIES:
                raise ConfigError(
                    f"unknown strategy {value!r}; "
                    f"choose one of {', '.join(STRATEGIES)}",
                    path=reader.path,
                    key=full_key,
                )
        elif key in (
            "max_retries",
            "max_in_flight_per_instance",
            "eject_after_failures",
        ):
            minimum = 0 if key == "max_retries" else 1
            value = reader.integer(value, full_key, minimum=minimum)
        else:
            value = reader.number(value, full_key, minimum=0)
        options[argument] = value
    return options


def _check_instance_url(reader: _Reader, url: object, key: str) -> None:
    from ollama_pool._pool import _check_url

    try:
        _check_url(url, key)
    except ConfigError as exc:
        raise ConfigError(
            str(exc).split(": ", 1)[1], path=reader.path, key=key
        ) from None


class _Reader:
    """Type checks that name the file and key of the value they reject."""

    def __init__(self, path: str | None):
        self.path = path

    def fail(self, message: str, key: str) -> ConfigError:
        return ConfigError(message, path=self.path, key=key or None)

    def mapping(
        self, value: object, key: str, *, required: bool = False
    ) -> dict[str, Any]:
        if value is None and required:
            raise self.fail("missing section", key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(f"must be a mapping, got {type(value).__name__}", key)
        return value

    def optional_str(
        self, mapping: Mapping[str, Any], name: str, key: str
    ) -> str | None:
        value = mapping.get(name)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise self.fail(f"must be a non-empty string, got {value!r}", key)
        return value

    def chat_option(self, name: str, value: object, key: str) -> None:
        """Check `value` against the type of ChatOllama's field `name`.

        Without this check a wrong type (`stop: 5`) passes loading and fails later
        as a pydantic error that names neither the file nor the key.
        """
        from langchain_ollama import ChatOllama
        from pydantic import TypeAdapter, ValidationError

        annotation: Any = ChatOllama.model_fields[name].annotation
        try:
            TypeAdapter(annotation).validate_python(value)
        except ValidationError as exc:
            reason = exc.errors()[0]["msg"]
            raise self.fail(f"{reason}, got {value!r}", key) from None

    def integer(self, value: object, key: str, *, minimum: int) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise self.fail(f"must be an integer >= {minimum}, got {value!r}", key)
        return value

    def positive_int(self, value: object, key: str) -> int:
        return self.integer(value, key, minimum=1)

    def number(
        self, value: object, key: str, *, minimum: float, strict: bool = False
    ) -> float:
        # YAML reads .nan and .inf as floats; neither is a usable setting.
        valid = (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
        )
        if not valid or value < minimum or (strict and value == minimum):  # type: ignore[operator]
            relation = ">" if strict else ">="
            raise self.fail(
                f"must be a finite number {relation} {minimum}, got {value!r}", key
            )
        return float(value)  # type: ignore[arg-type]
