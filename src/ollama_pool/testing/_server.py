"""Stand-in servers running on a background event loop thread."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import threading
from collections.abc import Coroutine, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, TypeVar

from aiohttp import web

from ollama_pool.testing._app import ServerStats, StandInApp
from ollama_pool.testing._behavior import Behavior
from ollama_pool.testing._catalog import ModelsDirectory

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Seconds that stop() grants running handlers before it cancels them.
SHUTDOWN_GRACE = 0.1
ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tfs'


def _new_executor() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(thread_name_prefix="ollama-standin-responder")


class LoopThread:
    """An asyncio event loop running forever in a daemon thread."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the event loop thread is not running; call start()")
        return self._loop

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        if self._thread is not None:
            return
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=run, name=self._name, daemon=True)
        self._thread.start()
        ready.wait()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run a coroutine on the loop and return its result."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout)

    def call_soon(self, callback: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(callback)

    def stop(self) -> None:
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
        self._thread = None
        self._loop = None


class StandInServer:
    """An Ollama stand-in HTTP server on a background thread.

    `port=0` picks a free port at the first start; `restart()` keeps it.
    `models_dir` is where pulled models are written; servers sharing it list the
    same models. Without it, pulled models live in memory only.
    """

    def __init__(
        self,
        port: int = 0,
        host: str = "127.0.0.1",
        behavior: Behavior | None = None,
        models_dir: str | os.PathLike[str] | None = None,
        *,
        access_log: logging.Logger | None = None,
        loop_thread: LoopThread | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self._access_log = access_log
        self._owns_loop = loop_thread is None
        self._loop_thread = loop_thread or LoopThread(f"ollama-standin-{port}")
        directory = ModelsDirectory(models_dir) if models_dir is not None else None
        self._app = StandInApp(behavior or Behavior(), directory, _new_executor())
        self._runner: web.AppRunner | None = None

    # Behaviour and state

    @property
    def behavior(self) -> Behavior:
        return self._app.behavior

    @behavior.setter
    def behavior(self, behavior: Behavior) -> None:
        self._app.behavior = behavior
        self._loop_thread.call_soon(self._app.wake_waiters)

    def update(self, **fields: Any) -> Behavior:
        """Replace some fields of the behaviour; return the new behaviour."""
        self.behavior = dataclasses.replace(self.behavior, **fields)
        return self.behavior

    @property
    def stats(self) -> ServerStats:
        return self._app.stats

    def reset_stats(self) -> None:
        self._app.stats = ServerStats()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._runner is not None

    # Lifecycle

    def start(self) -> StandInServer:
        """Start listening; return once the socket accepts connections.

        Raises OSError when the port cannot be bound.
        """
        self._loop_thread.start()
        try:
            self._loop_thread.run(self.astart())
        except BaseException:
            if self._owns_loop:
                self._loop_thread.stop()
            raise
        return self

    def stop(self) -> None:
        """Close the listening socket and every open connection."""
        if self._loop_thread.running:
            self._loop_thread.run(self.astop())
        if self._owns_loop:
            self._loop_thread.stop()

    def restart(self) -> None:
        """Stop, then start again on the same port."""
        self.stop()
        self.start()

    async def astart(self) -> None:
        """Start listening; call this on the loop thread."""
        if self._runner is not None:
            return
        sock = self._bind()
        self._app.stopping = asyncio.Event()
        self._app.executor = _new_executor()
        runner = web.AppRunner(
            self._app.build(),
            handle_signals=False,
            access_log=self._access_log,
            access_log_format=ACCESS_LOG_FORMAT,
            handler_cancellation=True,
            shutdown_timeout=SHUTDOWN_GRACE,
        )
        await runner.setup()
        site = web.SockSite(runner, sock)
        await site.start()
        self._runner = runner
        logger.info("stand-in server listening on %s", self.url)

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(1024)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        return sock

    async def astop(self) -> None:
        """Stop listening and close every connection; call this on the loop thread."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._app.stopping.set()
        await runner.cleanup()
        self._app.executor.shutdown(wait=False, cancel_futures=True)
        logger.info("stand-in server on %s stopped", self.url)

    def __enter__(self) -> StandInServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<StandInServer {self.url} {state}>"


class StandInFleet:
    """Several stand-in servers sharing one event loop thread.

    `servers` is a count of servers with the same behaviour or a list of
    behaviours, one a server. `ports` defaults to free ports.
    """

    def __init__(
        self,
        servers: int | Sequence[Behavior] = 2,
        *,
        ports: Iterable[int] | None = None,
        host: str = "127.0.0.1",
        behavior: Behavior | None = None,
        models_dir: str | os.PathLike[str] | None = None,
        access_log: logging.Logger | None = None,
    ) -> None:
        if isinstance(servers, int):
            template = behavior or Behavior()
            behaviors = [
                dataclasses.replace(template, models=list(template.models))
                for _ in range(servers)
            ]
        else:
            behaviors = list(servers)
        port_list = list(ports) if ports is not None else [0] * len(behaviors)
        if len(port_list) != len(behaviors):
            raise ValueError(
                f"got {len(port_list)} ports for {len(behaviors)} servers; "
                "give one port per server"
            )
        self._loop_thread = LoopThread("ollama-standin-fleet")
        self.servers = [
            StandInServer(
                port,
                host,
                server_behavior,
                models_dir,
                access_log=access_log,
                loop_thread=self._loop_thread,
            )
            for port, server_behavior in zip(port_list, behaviors, strict=True)
        ]

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.servers]

    def start(self) -> StandInFleet:
        self._loop_thread.start()
        try:
            for server in self.servers:
                server.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
        self._loop_thread.stop()

    def __enter__(self) -> StandInFleet:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __len__(self) -> int:
        return len(self.servers)

    def __getitem__(self, index: int) -> StandInServer:
        return self.servers[index]
