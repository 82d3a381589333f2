"""Start, stop and inspect local ``ollama serve`` processes, one per port.

`InstanceManager` records every process it starts (PID, creation time and command
line) in a JSON state file, so that a later call, from another process too, stops
exactly those processes and never a process that reused one of their PIDs. It
contains no click code: the ``ollama-pool`` commands in ``ollama_pool.cli._manager``
and Python callers use the same methods.

Errors: every error raised here is a `ManagerError`, itself an
`ollama_pool.OllamaPoolError`. `write_instances_config` raises
`ollama_pool.ConfigError` for a config file it cannot update.

Subprocesses always get an argument list and never a shell, and model names
travel in JSON bodies, so shell metacharacters in them stay data.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from ollama_pool._errors import ConfigError, OllamaPoolError
from ollama_pool._urls import normalize_model, redact_url

__all__ = [
    "DEFAULT_COUNT",
    "DEFAULT_HOST",
    "DEFAULT_LOG_DIR",
    "DEFAULT_MODEL",
    "DEFAULT_PORT",
    "DEFAULT_STATE_DIR",
    "OLLAMA_BIN_ENV",
    "BinaryNotFoundError",
    "ChatRequestError",
    "ChatTiming",
    "CleanupReport",
    "InstanceDownError",
    "InstanceManager",
    "InstanceRecord",
    "InstanceStartError",
    "InstanceStatus",
    "ManagerError",
    "NoInstancesRecordedError",
    "PortInUseError",
    "PullError",
    "PullProgress",
    "PullReport",
    "StopOutcome",
    "check_instances_config",
    "follow_log",
    "read_last_lines",
    "send_test_chat",
    "write_instances_config",
]

logger = logging.getLogger(__name__)

DEFAULT_COUNT = 4
DEFAULT_PORT = 11434
DEFAULT_MODEL = "gpt-oss:latest"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_STATE_DIR = ".ollama-pool"
DEFAULT_LOG_DIR = "logs/ollama"
OLLAMA_BIN_ENV = "OLLAMA_POOL_OLLAMA_BIN"
STATE_FILE_NAME = "instances.json"

# psutil derives create_time from the boot time, which moves when the wall clock
# is set, so an exact comparison could disown a process after an NTP step. A
# reused PID must also match the full command line, so one second is still safe.
_CREATE_TIME_TOLERANCE = 1.0
_POLL_INTERVAL = 0.1
_CMDLINE_WAIT = 2.0
_KILL_WAIT = 5.0
_PROBE_TIMEOUT = httpx.Timeout(2.0)
_STREAM_TIMEOUT = httpx.Timeout(10.0, read=300.0)
_WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


# -- errors -----------------------------------------------------------------


class ManagerError(OllamaPoolError):
    """Base class of the errors raised by the instance manager."""


class BinaryNotFoundError(ManagerError):
    """The ``ollama`` executable is missing or not executable."""


class PortInUseError(ManagerError):
    """A port requested for a new instance is taken."""

    def __init__(self, message: str, port: int) -> None:
        super().__init__(message)
        self.port = port


class InstanceStartError(ManagerError):
    """An instance exited or did not respond in time after its start."""

    def __init__(self, message: str, port: int, log_path: Path) -> None:
        super().__init__(message)
        self.port = port
        self.log_path = log_path


class NoInstancesRecordedError(ManagerError):
    """The state file records no instance (on the requested port)."""


class InstanceDownError(ManagerError):
    """An instance that a command needs does not respond."""

    def __init__(self, message: str, port: int) -> None:
        super().__init__(message)
        self.port = port


class PullError(ManagerError):
    """A model pull failed on one or more instances.

    `failures` maps each failed port to the reason.
    """

    def __init__(self, model: str, failures: dict[int, str]) -> None:
        details = "; ".join(
            f"port {port}: {reason}" for port, reason in sorted(failures.items())
        )
        super().__init__(f"pull of model {model!r} failed on {details}")
        self.model = model
        self.failures = failures


class ChatRequestError(ManagerError):
    """A test chat request returned an error or a broken stream."""


# -- records and results ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InstanceRecord:
    """One started ``ollama serve`` process, as stored in the state file."""

    port: int
    host: str
    pid: int
    create_time: float
    cmdline: tuple[str, ...]
    log_path: str
    model: str
    models_dir: str | None
    gpu: str | None
    started_at: str
    # GPU ids given at start; `gpu` is the one this instance may use.
    gpus: tuple[str, ...] = ()

    @property
    def base_url(self) -> str:
        """URL that clients on this machine use to reach the instance."""
        return _base_url(self.host, self.port)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["cmdline"] = list(self.cmdline)
        data["gpus"] = list(self.gpus)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InstanceRecord:
        """Build a record; raise TypeError or ValueError for a field of a wrong type.

        The checks keep a hand-edited state file from reaching psutil and the
        process checks with a PID that is not a positive integer.
        """
        fields = {field.name for field in dataclasses.fields(cls)}
        values = {key: value for key, value in data.items() if key in fields}
        for name, kinds in (("port", int), ("pid", int), ("create_time", (int, float))):
            value = values.get(name)
            if not isinstance(value, kinds) or isinstance(value, bool):
                raise TypeError(f"{name} must be a number, got {value!r}")
        if values["pid"] < 1:
            raise ValueError(f"pid must be a positive integer, got {values['pid']}")
        values["cmdline"] = tuple(values.get("cmdline", ()))
        values["gpus"] = tuple(values.get("gpus", ()))
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class InstanceStatus:
    """State of one recorded instance at the time of the status call.

    `state` is ``up`` (process running and GET /api/version responds), ``down``
    (process gone, or its PID now belongs to another process) or ``unresponsive``
    (process running but no response). CPU percent and memory (RSS, bytes) sum the
    process and its children, because Ollama runs models in child processes.
    """

    port: int
    pid: int
    host: str
    url: str
    state: str
    detail: str
    version: str | None
    models: list[str]
    loaded: list[str]
    cpu_percent: float | None
    memory_bytes: int | None
    log_path: str
    gpu: str | None
    models_dir: str | None


@dataclasses.dataclass(frozen=True)
class StopOutcome:
    """Result of `InstanceManager.stop` for one recorded instance."""

    port: int
    pid: int
    result: str  # "stopped", "killed", "already exited" or "PID reused"


@dataclasses.dataclass(frozen=True)
class PullProgress:
    """One NDJSON line of a /api/pull stream, tagged with the instance port."""

    port: int
    status: str
    digest: str | None
    total: int | None
    completed: int | None


@dataclasses.dataclass(frozen=True)
class PullReport:
    """Ports a pull went through, and ports whose /api/tags lists the model."""

    model: str
    pulled_on: list[int]
    verified_on: list[int]
    shared_models_dir: bool


@dataclasses.dataclass(frozen=True)
class ChatTiming:
    """Timing of one streamed chat request.

    Times are wall-clock seconds measured by the client. `eval_count` and
    `eval_duration_ns` come from the last stream line, as the server reports them.
    """

    first_token_seconds: float | None
    total_seconds: float
    eval_count: int | None
    eval_duration_ns: int | None

    @property
    def tokens_per_second(self) -> float | None:
        if not self.eval_count or not self.eval_duration_ns:
            return None
        return self.eval_count / (self.eval_duration_ns / 1e9)


@dataclasses.dataclass(frozen=True)
class CleanupReport:
    """Entries and log files that `InstanceManager.cleanup` removed or kept."""

    removed_ports: list[int]
    removed_logs: list[Path]
    running_ports: list[int]


# -- state file -------------------------------------------------------------


class _StateFile:
    """JSON list of `InstanceRecord`, replaced atomically on every save."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / STATE_FILE_NAME

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold an exclusive lock so that two commands do not interleave updates."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / "lock", "w") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    def load(self) -> list[InstanceRecord]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        try:
            return [InstanceRecord.from_json(item) for item in json.loads(text)]
        except (ValueError, TypeError, AttributeError) as exc:
            raise ManagerError(
                f"state file {self.path} is invalid ({exc}); check the processes "
                "it lists by hand, then delete it"
            ) from exc

    def save(self, records: Sequence[InstanceRecord]) -> None:
        if not records:
            self.path.unlink(missing_ok=True)
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        ordered = sorted(records, key=lambda record: record.port)
        text = json.dumps([record.to_json() for record in ordered], indent=2)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(text + "\n", encoding="utf-8")
        os.replace(temporary, self.path)


# -- processes --------------------------------------------------------------


def _inspect_process(record: InstanceRecord) -> tuple[psutil.Process | None, str]:
    """Return the record's process if it is still running, with a one-word state.

    The state is ``running``, ``exited`` or ``reused`` (the PID now belongs to a
    process with another creation time or command line, which is never signalled).
    """
    try:
        process = psutil.Process(record.pid)
        if abs(process.create_time() - record.create_time) > _CREATE_TIME_TOLERANCE:
            return None, "reused"
        if process.status() == psutil.STATUS_ZOMBIE:
            _reap_child(record.pid)
            return None, "exited"
        if tuple(process.cmdline()) != record.cmdline:
            return None, "reused"
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None, "exited"
    except psutil.AccessDenied:
        # A process we started runs as our user, so we can always read it.
        return None, "reused"
    return process, "running"


def _reap_child(pid: int) -> None:
    """Collect the exit status of a zombie if it is our child, so its PID is freed."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _is_gone(process: psutil.Process) -> bool:
    try:
        if process.status() != psutil.STATUS_ZOMBIE:
            return not process.is_running()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return True
    _reap_child(process.pid)
    return True


def _wait_until_gone(
    processes: Sequence[psutil.Process], timeout: float
) -> list[psutil.Process]:
    """Wait until the processes exit and return the ones still alive.

    A zombie counts as gone. psutil.wait_procs would wait for the parent (often
    not us) to reap it, which some container init processes never do.
    """
    deadline = time.monotonic() + timeout
    alive = [process for process in processes if not _is_gone(process)]
    while alive and time.monotonic() < deadline:
        time.sleep(_POLL_INTERVAL)
        alive = [process for process in alive if not _is_gone(process)]
    return alive


def _process_tree(process: psutil.Process) -> list[psutil.Process]:
    try:
        return [process, *process.children(recursive=True)]
    except psutil.Error:
        return [process]


def _terminate(processes: Sequence[psutil.Process], grace: float) -> set[int]:
    """Send SIGTERM, then SIGKILL after `grace` seconds; return the PIDs killed.

    Children (the model runners of ``ollama serve``) are collected before the
    signal and killed too if they outlive the grace period. psutil refuses to
    signal a Process object whose PID was reused in the meantime.
    """
    tree = [member for process in processes for member in _process_tree(process)]
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    survivors = _wait_until_gone(tree, grace)
    for process in survivors:
        logger.warning(
            "PID %d outlived SIGTERM by %.1f s; sending SIGKILL", process.pid, grace
        )
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    _wait_until_gone(survivors, _KILL_WAIT)
    return {process.pid for process in survivors}


# -- ports and URLs ---------------------------------------------------------


def _base_url(host: str, port: int) -> str:
    connect_host = _WILDCARD_HOSTS.get(host, host)
    if ":" in connect_host:
        connect_host = f"[{connect_host}]"
    return f"http://{connect_host}:{port}"


def _ollama_host_value(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _validate_host(host: str) -> str:
    host = host.strip().removeprefix("[").removesuffix("]")
    if not host or any(char in host for char in "/@ \t"):
        # User info may carry a password, so the value is shown only without it.
        display_value = "with user info" if "@" in host else repr(host)
        raise ManagerError(
            f"invalid host {display_value}: give an address or name without a scheme, "
            "port or user, e.g. 127.0.0.1"
        )
    return host


def _port_is_free(host: str, port: int) -> bool:
    """Return whether ``ollama serve`` could listen on host:port now.

    SO_REUSEADDR matches what the Go listener of ``ollama serve`` sets, so a port
    whose old connections sit in TIME_WAIT counts as free, as it is for Ollama.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM
        )[0]
    except socket.gaierror as exc:
        raise ManagerError(f"cannot resolve host {host!r}: {exc}") from exc
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise ManagerError(f"cannot bind {host}:{port}: {exc}") from exc
    return True


def _describe_port_holder(port: int) -> str:
    """Name the process that uses a local TCP port, where psutil can tell."""
    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:
        return ""
    for connection in connections:
        if not connection.laddr or connection.laddr.port != port or not connection.pid:
            continue
        try:
            process = psutil.Process(connection.pid)
            command = " ".join(process.cmdline()) or process.name()
        except psutil.Error:
            return f" by PID {connection.pid}"
        return f" by PID {connection.pid} ({command[:120]})"
    return ""


# -- HTTP -------------------------------------------------------------------


def _http_client(timeout: httpx.Timeout) -> httpx.Client:
    # trust_env=False: a proxy from the environment must not carry local traffic.
    return httpx.Client(timeout=timeout, trust_env=False)


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("error"):
        return f"HTTP {response.status_code}: {body['error']}"
    return f"HTTP {response.status_code}: {response.text[:200]}"


def _fetch_json(client: httpx.Client, url: str) -> dict[str, Any] | None:
    try:
        response = client.get(url)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    try:
        data = response.json()
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _model_names(data: dict[str, Any] | None) -> list[str]:
    if not data:
        return []
    return [str(item.get("name", "")) for item in data.get("models", [])]


def _parse_ndjson_line(line: str, url: str) -> dict[str, Any]:
    try:
        data = json.loads(line)
    except ValueError as exc:
        raise ManagerError(
            f"{url} sent an invalid stream line: {line[:200]!r}"
        ) from exc
    if not isinstance(data, dict):
        raise ManagerError(
            f"{url} sent a stream line that is not an object: {line[:200]!r}"
        )
    return data


def _pull_through(
    record: InstanceRecord,
    model: str,
    on_progress: Callable[[PullProgress], None] | None,
) -> None:
    """Pull a model through one instance; raise PullError on any failure."""
    url = f"{record.base_url}/api/pull"
    last_status = ""
    try:
        with (
            _http_client(_STREAM_TIMEOUT) as client,
            client.stream(
                "POST", url, json={"model": model, "stream": True}
            ) as response,
        ):
            if response.status_code != 200:
                response.read()
                raise PullError(model, {record.port: _error_text(response)})
            for line in response.iter_lines():
                if not line.strip():
                    continue
                data = _parse_ndjson_line(line, redact_url(url))
                if "error" in data:
                    raise PullError(model, {record.port: str(data["error"])})
                last_status = str(data.get("status", ""))
                if on_progress is not None:
                    on_progress(_progress_from_line(record.port, data))
    except httpx.HTTPError as exc:
        raise PullError(model, {record.port: f"request failed: {exc!r}"}) from exc
    except ManagerError as exc:
        if isinstance(exc, PullError):
            raise
        raise PullError(model, {record.port: str(exc)}) from exc
    if last_status != "success":
        raise PullError(
            model,
            {record.port: f"stream ended after status {last_status!r}, not 'success'"},
        )


def _progress_from_line(port: int, data: dict[str, Any]) -> PullProgress:
    def optional_int(key: str) -> int | None:
        value = data.get(key)
        return int(value) if isinstance(value, (int, float)) else None

    return PullProgress(
        port=port,
        status=str(data.get("status", "")),
        digest=data.get("digest"),
        total=optional_int("total"),
        completed=optional_int("completed"),
    )


def send_test_chat(
    base_url: str,
    model: str,
    prompt: str,
    *,
    on_text: Callable[[str], None] | None = None,
) -> ChatTiming:
    """Send one streamed chat request and time it.

    `on_text` receives each piece of the reply as it arrives. Raises
    InstanceDownError when nothing responds at `base_url`, and ChatRequestError for
    an HTTP error, an error line in the stream or a stream without ``done``.
    """
    url = f"{base_url.rstrip('/')}/api/chat"
    shown_url = redact_url(url)
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
    }
    started = time.perf_counter()
    first_token: float | None = None
    try:
        with (
            _http_client(_STREAM_TIMEOUT) as client,
            client.stream("POST", url, json=body) as response,
        ):
            if response.status_code != 200:
                response.read()
                raise ChatRequestError(
                    f"chat request to {shown_url} with model {model!r} failed: "
                    f"{_error_text(response)}"
                )
            for line in response.iter_lines():
                if not line.strip():
                    continue
                data = _parse_ndjson_line(line, shown_url)
                if "error" in data:
                    raise ChatRequestError(
                        f"chat stream from {shown_url} with model {model!r} failed: "
                        f"{data['error']}"
                    )
                message = data.get("message") or {}
                text = str(message.get("content") or "")
                if first_token is None and (text or message.get("thinking")):
                    first_token = time.perf_counter() - started
                if text and on_text is not None:
                    on_text(text)
                if data.get("done"):
                    return ChatTiming(
                        first_token_seconds=first_token,
                        total_seconds=time.perf_counter() - started,
                        eval_count=data.get("eval_count"),
                        eval_duration_ns=data.get("eval_duration"),
                    )
    except httpx.ConnectError as exc:
        raise InstanceDownError(
            f"no Ollama server responds at {redact_url(base_url)} ({exc}); start one "
            "with `ollama-pool start` or check the port",
            port=httpx.URL(base_url).port or 0,
        ) from exc
    except httpx.HTTPError as exc:
        raise ChatRequestError(f"chat request to {shown_url} failed: {exc!r}") from exc
    raise ChatRequestError(
        f"chat stream from {shown_url} ended without a line with done=true"
    )


# -- logs -------------------------------------------------------------------


def read_last_lines(path: Path, count: int) -> list[str]:
    """Return the last `count` lines of a text file, without reading all of it."""
    if count <= 0:
        return []
    block = 8192
    with open(path, "rb") as file:
        file.seek(0, os.SEEK_END)
        position = file.tell()
        data = b""
        while position > 0 and data.count(b"\n") <= count:
            step = min(block, position)
            position -= step
            file.seek(position)
            data = file.read(step) + data
    lines = data.decode("utf-8", errors="replace").splitlines()
    return lines[-count:]


def follow_log(
    path: Path,
    *,
    poll_interval: float = 0.5,
    stop: threading.Event | None = None,
) -> Iterator[str]:
    """Yield lines appended to a file from now on, like ``tail -f``.

    Runs until `stop` is set (or forever without it). Starts over from the top
    when the file shrinks, because a new instance truncated or replaced it.
    """
    with open(path, "rb") as file:
        file.seek(0, os.SEEK_END)
        pending = b""
        while stop is None or not stop.is_set():
            chunk = file.read()
            if chunk:
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    yield line.decode("utf-8", errors="replace")
                continue
            if os.stat(path).st_size < file.tell():
                file.seek(0)
                pending = b""
            time.sleep(poll_interval)


# -- config file ------------------------------------------------------------


def check_instances_config(path: str | os.PathLike[str]) -> None:
    """Raise ConfigError unless `write_instances_config` can update this file.

    Run it before starting instances, so that a bad config file fails the command
    before any process starts.
    """
    _read_instances_section(Path(path))


def write_instances_config(
    path: str | os.PathLike[str], records: Sequence[InstanceRecord]
) -> None:
    """Set ``llm.ollama.multiple_instances`` of a YAML config to these instances.

    Writes ``enabled: true`` and ``instances: [{base_url, model}]`` and keeps every
    other key. Creates the file if it is missing.
    NOTE: PyYAML drops comments and may change quoting, so a commented file loses
    its comments.
    """
    config_path = Path(path)
    data, section = _read_instances_section(config_path)
    section["enabled"] = True
    section["instances"] = [
        {"base_url": record.base_url, "model": record.model}
        for record in sorted(records, key=lambda record: record.port)
    ]

    temporary = config_path.with_name(config_path.name + ".tmp")
    temporary.write_text(
        yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8"
    )
    os.replace(temporary, config_path)
    logger.info("wrote %d instances to %s", len(records), config_path)


def _read_instances_section(
    config_path: Path,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load a config and return it with its ``llm.ollama.multiple_instances``.

    Missing keys on that path are added as empty mappings to the returned data.
    """
    data: Any = {}
    if config_path.exists():
        try:
            data = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read it ({exc})", path=str(config_path)) from exc
    if not isinstance(data, dict):
        raise ConfigError(
            "the top level is not a mapping, so the instances cannot be added",
            path=str(config_path),
        )

    section = data
    dotted = []
    for key in ("llm", "ollama", "multiple_instances"):
        dotted.append(key)
        value = section.get(key)
        if value is None:
            value = section[key] = {}
        if not isinstance(value, dict):
            raise ConfigError(
                f"expected a mapping, found {type(value).__name__}; fix the key "
                "or remove it",
                path=str(config_path),
                key=".".join(dotted),
            )
        section = value
    return data, section


# -- manager ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _LaunchSettings:
    """Settings that every instance of one start call shares."""

    binary: str
    host: str
    model: str
    models_dir: str | None
    gpus: tuple[str, ...]


class InstanceManager:
    """Starts, stops and inspects ``ollama serve`` processes on consecutive ports.

    Args:
        state_dir: folder of the state file (``instances.json``) and its lock.
        ollama_bin: executable to run as ``BIN serve``; defaults to the
            ``OLLAMA_POOL_OLLAMA_BIN`` environment variable, then ``ollama`` on
            PATH. Only `start` and `restart` need it.
        log_dir: folder of the logs, one ``ollama_PORT.log`` per instance.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str] = DEFAULT_STATE_DIR,
        ollama_bin: str | None = None,
        log_dir: str | os.PathLike[str] = DEFAULT_LOG_DIR,
    ) -> None:
        self._state = _StateFile(Path(state_dir))
        self.ollama_bin = ollama_bin or os.environ.get(OLLAMA_BIN_ENV) or "ollama"
        self.log_dir = Path(log_dir)

    def __repr__(self) -> str:
        return (
            f"InstanceManager(state_dir={str(self.state_dir)!r}, "
            f"ollama_bin={self.ollama_bin!r}, log_dir={str(self.log_dir)!r})"
        )

    @property
    def state_dir(self) -> Path:
        return self._state.directory

    @property
    def state_file(self) -> Path:
        return self._state.path

    def instances(self) -> list[InstanceRecord]:
        """Return the recorded instances, ordered by port, running or not."""
        return self._state.load()

    # -- start ---------------------------------------------------------------

    def start(
        self,
        count: int = DEFAULT_COUNT,
        *,
        port: int = DEFAULT_PORT,
        host: str = DEFAULT_HOST,
        model: str = DEFAULT_MODEL,
        gpus: Sequence[str] = (),
        models_dir: str | os.PathLike[str] | None = None,
        timeout: float = 60.0,
    ) -> list[InstanceRecord]:
        """Start `count` instances on ports port, port+1, ... and wait for each.

        All instances share one models folder: `models_dir`, else the
        OLLAMA_MODELS of this environment, else Ollama's default. With `gpus`,
        instance i may use only GPU ``gpus[i % len(gpus)]`` (CUDA_VISIBLE_DEVICES).
        `model` is recorded for the config file and for commands that default to
        it; starting does not pull it.

        Every port is checked before any process starts, and if one instance fails
        to come up within `timeout` seconds, the ones already started are stopped.

        Raises:
            BinaryNotFoundError, PortInUseError, InstanceStartError, ManagerError.
        """
        if count < 1:
            raise ManagerError(f"invalid instance count {count}: start at least 1")
        ports = list(range(port, port + count))
        if port < 1 or ports[-1] > 65535:
            raise ManagerError(
                f"invalid port range {port}-{ports[-1]}: ports must be in 1-65535"
            )
        gpu_list = tuple(gpu.strip() for gpu in gpus)
        if any(not gpu for gpu in gpu_list):
            raise ManagerError(
                f"invalid GPU list {','.join(gpus)!r}: an entry is empty"
            )
        settings = _LaunchSettings(
            binary=self._resolve_binary(),
            host=_validate_host(host),
            model=model,
            models_dir=self._resolve_models_dir(models_dir),
            gpus=gpu_list,
        )
        self.log_dir.mkdir(parents=True, exist_ok=True)

        with self._state.locked():
            records = self._drop_exited_on_ports(self._state.load(), ports)
            for candidate in ports:
                self._check_port_free(settings.host, candidate)

            launched: list[tuple[InstanceRecord, subprocess.Popen[bytes], float]] = []
            try:
                for index, instance_port in enumerate(ports):
                    record, process = self._launch(settings, instance_port, index)
                    launched.append((record, process, time.monotonic()))
                    records.append(record)
                    self._state.save(records)
                for record, process, launched_at in launched:
                    self._wait_until_up(record, process, launched_at + timeout)
            except BaseException:
                self._roll_back(launched)
                started_ports = {record.port for record, _, _ in launched}
                self._state.save([r for r in records if r.port not in started_ports])
                raise
            started = [self._confirm_identity(record) for record, _, _ in launched]
            started_ports = {record.port for record in started}
            self._state.save(
                [r for r in records if r.port not in started_ports] + started
            )
        return started

    def _resolve_binary(self) -> str:
        if os.sep in self.ollama_bin or (os.altsep and os.altsep in self.ollama_bin):
            path = Path(self.ollama_bin)
            if path.is_file() and os.access(path, os.X_OK):
                return str(path.resolve())
            raise BinaryNotFoundError(
                f"Ollama executable {self.ollama_bin!r} is missing or not executable; "
                f"pass the right path with --ollama-bin or {OLLAMA_BIN_ENV}"
            )
        found = shutil.which(self.ollama_bin)
        if found is None:
            raise BinaryNotFoundError(
                f"Ollama executable {self.ollama_bin!r} not found on PATH; install "
                f"Ollama or pass its path with --ollama-bin or {OLLAMA_BIN_ENV}"
            )
        return found

    @staticmethod
    def _resolve_models_dir(models_dir: str | os.PathLike[str] | None) -> str | None:
        chosen = (
            models_dir if models_dir is not None else os.environ.get("OLLAMA_MODELS")
        )
        if not chosen:
            return None
        path = Path(chosen).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    def _drop_exited_on_ports(
        self, records: list[InstanceRecord], ports: Sequence[int]
    ) -> list[InstanceRecord]:
        """Reject ports of running recorded instances and forget exited ones."""
        remaining = []
        for record in records:
            if record.port not in ports:
                remaining.append(record)
                continue
            process, _ = _inspect_process(record)
            if process is not None:
                raise PortInUseError(
                    f"port {record.port} is used by an instance that ollama-pool "
                    f"started (PID {record.pid}); stop it first with "
                    f"`ollama-pool stop --port {record.port}` or use "
                    "`ollama-pool restart`",
                    port=record.port,
                )
            logger.info(
                "forgetting exited instance on port %d (PID %d)",
                record.port,
                record.pid,
            )
        return remaining

    @staticmethod
    def _check_port_free(host: str, port: int) -> None:
        if _port_is_free(host, port):
            return
        holder = _describe_port_holder(port)
        raise PortInUseError(
            f"port {port} on {host} is already in use{holder}; stop that process "
            "or choose another start port with --port",
            port=port,
        )

    def _launch(
        self, settings: _LaunchSettings, port: int, index: int
    ) -> tuple[InstanceRecord, subprocess.Popen[bytes]]:
        """Start one ``BIN serve`` process that logs to ollama_PORT.log."""
        host = settings.host
        gpu = settings.gpus[index % len(settings.gpus)] if settings.gpus else None
        env = dict(os.environ)
        env["OLLAMA_HOST"] = _ollama_host_value(host, port)
        if settings.models_dir is not None:
            env["OLLAMA_MODELS"] = settings.models_dir
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu

        argv = [settings.binary, "serve"]
        log_path = self.log_dir / f"ollama_{port}.log"
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        with open(log_path, "ab") as log_file:
            header = f"==> ollama-pool: {' '.join(argv)} on {host}:{port} at {now}\n"
            log_file.write(header.encode())
            log_file.flush()
            # A new session keeps the instance alive after this command exits and
            # out of reach of a Ctrl-C sent to the terminal's process group.
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

        create_time, cmdline = self._identify(process.pid, argv)
        record = InstanceRecord(
            port=port,
            host=host,
            pid=process.pid,
            create_time=create_time,
            cmdline=cmdline,
            log_path=str(log_path),
            model=settings.model,
            models_dir=settings.models_dir,
            gpu=gpu,
            started_at=now,
            gpus=settings.gpus,
        )
        logger.info(
            "started %s serve on port %d (PID %d, log %s)",
            settings.binary,
            port,
            process.pid,
            log_path,
        )
        return record, process

    @staticmethod
    def _identify(pid: int, argv: list[str]) -> tuple[float, tuple[str, ...]]:
        """Return the creation time and command line that later prove ownership.

        Linux closes the close-on-exec pipe that Popen waits on before the new
        program's arguments are in place, so /proc/PID/cmdline can read empty for
        a moment after Popen returns. Retry until it is filled in.
        """
        process = psutil.Process(pid)
        create_time = process.create_time()
        deadline = time.monotonic() + _CMDLINE_WAIT
        try:
            cmdline = tuple(process.cmdline())
            while not cmdline and time.monotonic() < deadline:
                time.sleep(0.01)
                cmdline = tuple(process.cmdline())
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            # It already exited; _wait_until_up reports that with its exit code.
            cmdline = ()
        return create_time, cmdline or tuple(argv)

    def _confirm_identity(self, record: InstanceRecord) -> InstanceRecord:
        """Read the command line again once the instance responds.

        The process is our unreaped child, so its PID cannot have been reused.
        """
        create_time, cmdline = self._identify(record.pid, list(record.cmdline))
        if cmdline == record.cmdline and create_time == record.create_time:
            return record
        return dataclasses.replace(record, create_time=create_time, cmdline=cmdline)

    @staticmethod
    def _wait_until_up(
        record: InstanceRecord, process: subprocess.Popen[bytes], deadline: float
    ) -> str:
        """Poll GET /api/version until it returns 200; return the server version."""
        url = f"{record.base_url}/api/version"
        with _http_client(httpx.Timeout(1.0)) as client:
            while True:
                exit_code = process.poll()
                if exit_code is not None:
                    raise InstanceStartError(
                        f"Ollama instance on port {record.port} exited with code "
                        f"{exit_code} before it responded; see its log "
                        f"{record.log_path}{_log_excerpt(Path(record.log_path))}",
                        port=record.port,
                        log_path=Path(record.log_path),
                    )
                data = _fetch_json(client, url)
                if data is not None:
                    return str(data.get("version", ""))
                if time.monotonic() > deadline:
                    raise InstanceStartError(
                        f"Ollama instance on port {record.port} did not respond to "
                        f"GET /api/version in time; see its log "
                        f"{record.log_path}{_log_excerpt(Path(record.log_path))}",
                        port=record.port,
                        log_path=Path(record.log_path),
                    )
                time.sleep(_POLL_INTERVAL * 2)

    @staticmethod
    def _roll_back(
        launched: Sequence[tuple[InstanceRecord, subprocess.Popen[bytes], float]],
    ) -> None:
        processes = []
        for record, popen, _ in launched:
            if popen.poll() is None:
                with contextlib.suppress(psutil.NoSuchProcess):
                    processes.append(psutil.Process(popen.pid))
            logger.warning(
                "stopping instance on port %d because the start failed", record.port
            )
        _terminate(processes, grace=5.0)
        for _, popen, _ in launched:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=_KILL_WAIT)

    # -- stop and restart ----------------------------------------------------

    def stop(
        self, port: int | None = None, *, grace: float = 10.0
    ) -> list[StopOutcome]:
        """Stop the recorded instances (or the one on `port`) and forget them.

        Sends SIGTERM, then SIGKILL to whatever is left after `grace` seconds. A
        PID that now belongs to another process is left alone and its entry is
        dropped.

        Raises:
            NoInstancesRecordedError: nothing is recorded (on `port`).
        """
        with self._state.locked():
            records = self._require_records(port)
            targets = [
                record for record in records if port is None or record.port == port
            ]
            outcomes: dict[int, str] = {}
            running: dict[int, psutil.Process] = {}
            for record in targets:
                process, state = _inspect_process(record)
                if process is None:
                    outcomes[record.port] = (
                        "already exited" if state == "exited" else "PID reused"
                    )
                    if state == "reused":
                        logger.warning(
                            "PID %d of port %d now belongs to another process; "
                            "leaving it alone",
                            record.pid,
                            record.port,
                        )
                else:
                    running[record.port] = process
            killed = _terminate(list(running.values()), grace)
            for instance_port, process in running.items():
                outcomes[instance_port] = (
                    "killed" if process.pid in killed else "stopped"
                )
                logger.info(
                    "stopped instance on port %d (PID %d)", instance_port, process.pid
                )
            target_ports = {record.port for record in targets}
            self._state.save([r for r in records if r.port not in target_ports])
        return [
            StopOutcome(port=record.port, pid=record.pid, result=outcomes[record.port])
            for record in targets
        ]

    def restart(
        self,
        count: int | None = None,
        *,
        grace: float = 10.0,
        timeout: float = 60.0,
        **overrides: Any,
    ) -> list[InstanceRecord]:
        """Stop every recorded instance and start `count` again with their settings.

        The start port, host, model, models folder and GPUs come from the recorded
        instances (the lowest port first) unless given in `overrides`, which takes
        the keyword arguments of `start`. `count` defaults to the recorded number.
        """
        records = self._require_records(None)
        first = records[0]
        settings: dict[str, Any] = {
            "port": first.port,
            "host": first.host,
            "model": first.model,
            "models_dir": first.models_dir,
            "gpus": first.gpus,
        }
        settings.update(
            {key: value for key, value in overrides.items() if value is not None}
        )
        self.stop(grace=grace)
        return self.start(count or len(records), timeout=timeout, **settings)

    def _require_records(self, port: int | None) -> list[InstanceRecord]:
        records = self._state.load()
        if not records:
            raise NoInstancesRecordedError(
                f"no instances recorded in {self.state_file}; start some with "
                "`ollama-pool start` (or pass the --state-dir used to start them)"
            )
        if port is not None and all(record.port != port for record in records):
            recorded = ", ".join(str(record.port) for record in records)
            raise NoInstancesRecordedError(
                f"no instance recorded on port {port}; recorded ports: {recorded}"
            )
        return records

    # -- status --------------------------------------------------------------

    def status(self, *, cpu_sample: float = 0.2) -> list[InstanceStatus]:
        """Query every recorded instance: process, version, models, CPU and memory.

        CPU percent is measured over at least `cpu_sample` seconds.

        Raises:
            NoInstancesRecordedError: nothing is recorded.
        """
        records = self._require_records(None)
        inspected = [(record, *_inspect_process(record)) for record in records]
        trees = {
            record.port: _process_tree(process)
            for record, process, _ in inspected
            if process is not None
        }
        sample_started = time.monotonic()
        for tree in trees.values():
            for member in tree:
                with contextlib.suppress(psutil.Error):
                    member.cpu_percent(interval=None)

        server_info = {}
        with _http_client(_PROBE_TIMEOUT) as client:
            for record, process, _ in inspected:
                if process is not None:
                    server_info[record.port] = self._query_server(
                        client, record.base_url
                    )

        remaining = cpu_sample - (time.monotonic() - sample_started)
        if remaining > 0:
            time.sleep(remaining)
        return [
            self._status_row(
                record, state, server_info.get(record.port), trees.get(record.port)
            )
            for record, _, state in inspected
        ]

    @staticmethod
    def _query_server(client: httpx.Client, base_url: str) -> dict[str, Any] | None:
        version = _fetch_json(client, f"{base_url}/api/version")
        if version is None:
            return None
        return {
            "version": str(version.get("version", "")),
            "models": _model_names(_fetch_json(client, f"{base_url}/api/tags")),
            "loaded": _model_names(_fetch_json(client, f"{base_url}/api/ps")),
        }

    @staticmethod
    def _status_row(
        record: InstanceRecord,
        process_state: str,
        info: dict[str, Any] | None,
        tree: list[psutil.Process] | None,
    ) -> InstanceStatus:
        if tree is None:
            state = "down"
            detail = (
                "process exited"
                if process_state == "exited"
                else "PID now belongs to another process"
            )
        elif info is None:
            state, detail = "unresponsive", "process running, GET /api/version failed"
        else:
            state, detail = "up", ""
        cpu, memory = _tree_usage(tree) if tree else (None, None)
        return InstanceStatus(
            port=record.port,
            pid=record.pid,
            host=record.host,
            url=redact_url(record.base_url),
            state=state,
            detail=detail,
            version=info["version"] if info else None,
            models=info["models"] if info else [],
            loaded=info["loaded"] if info else [],
            cpu_percent=cpu,
            memory_bytes=memory,
            log_path=record.log_path,
            gpu=record.gpu,
            models_dir=record.models_dir,
        )

    # -- pull ----------------------------------------------------------------

    def pull(
        self,
        model: str,
        *,
        parallel: bool = False,
        on_progress: Callable[[PullProgress], None] | None = None,
    ) -> PullReport:
        """Pull a model so that every recorded instance lists it in /api/tags.

        When all instances share one models folder, the pull goes through the
        first instance only, and any instance that still does not list the model
        pulls it itself. Otherwise each instance pulls, one after another or, with
        `parallel`, all at once. `on_progress` receives every stream line and may
        be called from worker threads.

        Raises:
            NoInstancesRecordedError, InstanceDownError, PullError.
        """
        if not model.strip():
            raise ManagerError("invalid model name: it is empty")
        records = self._require_records(None)
        self._require_all_up(records)
        shared = len({record.models_dir for record in records}) == 1

        if shared:
            _pull_through(records[0], model, on_progress)
            pulled = [records[0]]
            missing = [r for r in records[1:] if not self._lists_model(r, model)]
            if missing:
                logger.warning(
                    "ports %s do not list %r after a pull into their shared models "
                    "folder; pulling through each of them",
                    [r.port for r in missing],
                    model,
                )
                self._pull_each(missing, model, parallel, on_progress)
                pulled += missing
        else:
            self._pull_each(records, model, parallel, on_progress)
            pulled = list(records)

        not_listed = [r.port for r in records if not self._lists_model(r, model)]
        if not_listed:
            raise PullError(
                model,
                dict.fromkeys(
                    not_listed, "pull finished but /api/tags does not list the model"
                ),
            )
        return PullReport(
            model=model,
            pulled_on=[record.port for record in pulled],
            verified_on=[record.port for record in records],
            shared_models_dir=shared,
        )

    def _require_all_up(self, records: Sequence[InstanceRecord]) -> None:
        with _http_client(_PROBE_TIMEOUT) as client:
            for record in records:
                if _fetch_json(client, f"{record.base_url}/api/version") is None:
                    raise InstanceDownError(
                        f"instance on port {record.port} "
                        f"({redact_url(record.base_url)}) does not respond; see "
                        f"{record.log_path}, then run `ollama-pool restart`, or "
                        "`ollama-pool cleanup` to forget it",
                        port=record.port,
                    )

    @staticmethod
    def _lists_model(record: InstanceRecord, model: str) -> bool:
        with _http_client(_PROBE_TIMEOUT) as client:
            names = _model_names(_fetch_json(client, f"{record.base_url}/api/tags"))
        return normalize_model(model) in {normalize_model(name) for name in names}

    @staticmethod
    def _pull_each(
        records: Sequence[InstanceRecord],
        model: str,
        parallel: bool,
        on_progress: Callable[[PullProgress], None] | None,
    ) -> None:
        """Pull through each instance and raise one PullError for all failures."""
        failures: dict[int, str] = {}
        if not parallel:
            for record in records:
                try:
                    _pull_through(record, model, on_progress)
                except PullError as exc:
                    failures.update(exc.failures)
            if failures:
                raise PullError(model, failures)
            return
        with concurrent.futures.ThreadPoolExecutor(
            max_workers=len(records)
        ) as executor:
            futures = {
                executor.submit(_pull_through, record, model, on_progress): record
                for record in records
            }
            for future in concurrent.futures.as_completed(futures):
                error = future.exception()
                if isinstance(error, PullError):
                    failures.update(error.failures)
                elif error is not None:
                    raise error
        if failures:
            raise PullError(model, failures)

    # -- test chat, logs, cleanup, config -----------------------------------

    def base_url(self, port: int, host: str = DEFAULT_HOST) -> str:
        """Return the URL of the recorded instance on `port`, else of host:port."""
        for record in self._state.load():
            if record.port == port:
                return record.base_url
        return _base_url(_validate_host(host), port)

    def log_path(self, port: int) -> Path:
        """Return the log file of the instance on `port` (recorded or not)."""
        for record in self._state.load():
            if record.port == port:
                return Path(record.log_path)
        return self.log_dir / f"ollama_{port}.log"

    def cleanup(self) -> CleanupReport:
        """Forget exited instances and delete the logs of stopped instances.

        A log ``ollama_PORT.log`` in the log folder stays when a recorded instance
        runs on that port, or when something else listens on it (for example an
        instance started by hand that still writes to it).
        """
        with self._state.locked():
            records = self._state.load()
            running = [r for r in records if _inspect_process(r)[0] is not None]
            removed_ports = sorted(
                {r.port for r in records} - {r.port for r in running}
            )
            self._state.save(running)
        running_ports = {record.port for record in running}
        stale_logs = [
            Path(record.log_path) for record in records if record.port in removed_ports
        ]
        if self.log_dir.is_dir():
            stale_logs += sorted(self.log_dir.glob("ollama_*.log"))
        removed_logs = []
        for path in dict.fromkeys(stale_logs):
            port = _port_from_log_name(path)
            if port is None or port in running_ports or not path.exists():
                continue
            if not _port_is_free("0.0.0.0", port):
                continue
            path.unlink()
            removed_logs.append(path)
        logger.info(
            "cleanup forgot ports %s and deleted %d logs",
            removed_ports,
            len(removed_logs),
        )
        return CleanupReport(
            removed_ports=removed_ports,
            removed_logs=removed_logs,
            running_ports=sorted(running_ports),
        )

    def write_config(self, path: str | os.PathLike[str]) -> list[InstanceRecord]:
        """Write the running recorded instances into a config file; return them."""
        running = [r for r in self._state.load() if _inspect_process(r)[0] is not None]
        if not running:
            raise NoInstancesRecordedError(
                f"no running instances recorded in {self.state_file}; nothing to write "
                f"to {path}"
            )
        write_instances_config(path, running)
        return running


def _port_from_log_name(path: Path) -> int | None:
    suffix = path.stem.removeprefix("ollama_")
    if not suffix.isdigit() or not 1 <= int(suffix) <= 65535:
        return None
    return int(suffix)


def _tree_usage(tree: Sequence[psutil.Process]) -> tuple[float | None, int | None]:
    cpu = 0.0
    memory = 0
    for member in tree:
        with contextlib.suppress(psutil.Error):
            cpu += member.cpu_percent(interval=None)
            memory += member.memory_info().rss
    return round(cpu, 1), memory


def _log_excerpt(path: Path, count: int = 5) -> str:
    try:
        lines = read_last_lines(path, count)
    except OSError:
        return ""
    if not lines:
        return ""
    return "; last lines:\n" + "\n".join(f"  {line}" for line in lines)
