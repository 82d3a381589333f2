"""Several stand-in servers with the llama.cpp model, each in its own process.

Each process is `ollama-pool-standin serve` with the llama responder, configured
through the same environment variables as `ollama serve` (OLLAMA_HOST,
OLLAMA_NUM_PARALLEL, OLLAMA_MODELS), so a fleet behaves like separate Ollama
servers on one machine.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO

import httpx

from ollama_pool.local._errors import LocalModelError
from ollama_pool.local._gguf import GGUF_ENV, resolve_gguf
from ollama_pool.local._responder import CONTEXT_ENV, MODEL_NAME, THREADS_ENV

__all__ = ["LocalFleet"]

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
RESPONDER = "ollama_pool.local:llama_responder"
# Attempts per instance when a free port is taken by another process between
# the check and the server's bind.
_PORT_ATTEMPTS = 3
_POLL_INTERVAL = 0.2


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


class _Instance:
    """One server process and its log file."""

    def __init__(self, port: int, log_path: Path, env: dict[str, str]) -> None:
        self.port = port
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("wb")
        command = [
            sys.executable,
            "-m",
            "ollama_pool.testing",
            "serve",
            "--model",
            MODEL_NAME,
            "--responder",
            RESPONDER,
        ]
        self.process = subprocess.Popen(
            command,
            env={
                **env,
                "OLLAMA_HOST": f"{HOST}:{port}",
                # The server stops by itself if this process dies without
                # stopping it, for example on SIGKILL.
                "OLLAMA_POOL_STANDIN_PARENT_PID": str(os.getpid()),
            },
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # A terminal's Ctrl-C reaches only the parent, which stops the fleet.
            start_new_session=True,
        )

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log_tail(self, max_chars: int = 2000) -> str:
        self._log.flush()
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return text[-max_chars:].strip()

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait_or_kill(self, deadline: float) -> None:
        try:
            self.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning(
                "instance %s did not stop after SIGTERM; sending SIGKILL", self.url
            )
            self.process.kill()
            self.process.wait()
        self._log.close()


class LocalFleet:
    """Start `count` stand-in processes serving Gemma 3 270M through llama.cpp.

    Use it as a context manager; the processes stop on exit, even on error:

        with LocalFleet(count=2) as fleet:
            llm = PooledChatOllama(base_urls=fleet.urls, model=fleet.model)

    Args:
        count: number of server processes.
        threads_per_instance: llama.cpp threads of each process. `count` times
            this should not exceed the CPU cores, or the processes slow each
            other down.
        ports: one port per process on 127.0.0.1; None picks free ports.
        model_path: GGUF file to serve; None takes $OLLAMA_POOL_GGUF, then the
            packaged Gemma 3 270M file.
        n_ctx: context length of each process, in tokens.
        startup_timeout: seconds to wait for every process to load the model and
            respond to /api/version.
        log_dir: directory for one log file per process; None uses a temporary
            directory that is removed on exit.

    Each process serves one request at a time (OLLAMA_NUM_PARALLEL=1) and loads
    the model before it listens, so its first request has no load delay.
    """

    model = MODEL_NAME

    def __init__(
        self,
        count: int = 2,
        threads_per_instance: int = 1,
        ports: list[int] | None = None,
        *,
        model_path: str | Path | None = None,
        n_ctx: int = 2048,
        startup_timeout: float = 120.0,
        log_dir: str | Path | None = None,
    ) -> None:
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count!r}")
        if threads_per_instance < 1:
            raise ValueError(
                f"threads_per_instance must be at least 1, got {threads_per_instance!r}"
            )
        if ports is not None and len(ports) != count:
            raise ValueError(f"expected {count} ports, got {len(ports)}: {ports!r}")
        self.count = count
        self.threads_per_instance = threads_per_instance
        self.ports = list(ports) if ports is not None else None
        self.model_path = model_path
        self.n_ctx = n_ctx
        self.startup_timeout = startup_timeout
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self._instances: list[_Instance] = []
        self._temporary_dir: tempfile.TemporaryDirectory[str] | None = None

    def __repr__(self) -> str:
        state = ", ".join(self.urls) if self._instances else "stopped"
        return f"LocalFleet(count={self.count}, model={self.model!r}, {state})"

    @property
    def urls(self) -> list[str]:
        """Base URLs of the running instances, in start order."""
        return [instance.url for instance in self._instances]

    @property
    def log_paths(self) -> list[Path]:
        """Log file of each running instance, in start order."""
        return [instance.log_path for instance in self._instances]

    def __enter__(self) -> LocalFleet:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start every process and return once each responds to /api/version."""
        if self._instances:
            raise RuntimeError("the fleet is already running; call stop() first")
        try:
            self._start_all()
        except BaseException:
            self.stop()
            raise

    def _start_all(self) -> None:
        # Resolve the GGUF here so that the processes do not all assemble it.
        gguf = resolve_gguf(self.model_path)
        self._temporary_dir = tempfile.TemporaryDirectory(prefix="ollama-pool-local-")
        work_dir = Path(self._temporary_dir.name)
        log_dir = self.log_dir or work_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            GGUF_ENV: str(gguf),
            THREADS_ENV: str(self.threads_per_instance),
            CONTEXT_ENV: str(self.n_ctx),
            "OLLAMA_NUM_PARALLEL": "1",
            # Pulled models stay inside the fleet's own temporary directory.
            "OLLAMA_MODELS": str(work_dir / "models"),
        }
        for index in range(self.count):
            port = self.ports[index] if self.ports else _free_port()
            log_path = log_dir / f"instance-{index}.log"
            self._instances.append(_Instance(port, log_path, env))
        logger.info("started %d llama.cpp stand-in processes", self.count)

        deadline = time.monotonic() + self.startup_timeout
        with httpx.Client(trust_env=False, timeout=2.0) as client:
            for index in range(self.count):
                self._wait_until_ready(client, index, deadline, env)
        logger.info("local fleet ready: %s", ", ".join(self.urls))

    def _wait_until_ready(
        self, client: httpx.Client, index: int, deadline: float, env: dict[str, str]
    ) -> None:
        attempts = 1
        while True:
            instance = self._instances[index]
            if _answers_version(client, instance.url):
                return
            exit_code = instance.process.poll()
            if exit_code is not None:
                log = instance.log_tail()
                port_taken = "cannot listen" in log and self.ports is None
                if port_taken and attempts < _PORT_ATTEMPTS:
                    # Another process took the free port before the server bound it.
                    attempts += 1
                    instance.wait_or_kill(deadline=time.monotonic())
                    self._instances[index] = _Instance(
                        _free_port(), instance.log_path, env
                    )
                    continue
                raise LocalModelError(
                    f"local instance {instance.url} exited with code {exit_code} "
                    f"before it was ready; its log ends with:\n{log}"
                )
            if time.monotonic() > deadline:
                raise LocalModelError(
                    f"local instance {instance.url} did not respond to /api/version "
                    f"within {self.startup_timeout:.0f} s; its log ends with:\n"
                    f"{instance.log_tail()}"
                )
            time.sleep(_POLL_INTERVAL)

    def stop(self, grace_seconds: float = 10.0) -> None:
        """Stop every process: SIGTERM, then SIGKILL after `grace_seconds`."""
        instances, self._instances = self._instances, []
        for instance in instances:
            instance.terminate()
        deadline = time.monotonic() + grace_seconds
        for instance in instances:
            instance.wait_or_kill(deadline)
        if instances:
            logger.info("stopped %d llama.cpp stand-in processes", len(instances))
        if self._temporary_dir is not None:
            self._temporary_dir.cleanup()
            self._temporary_dir = None


def _answers_version(client: httpx.Client, url: str) -> bool:
    try:
        response = client.get(f"{url}/api/version")
    except httpx.TransportError:
        return False
    return response.status_code == 200
