"""Command line of the stand-in: `serve` like `ollama serve`, and `fleet`."""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click

from ollama_pool.testing._behavior import (
    DEFAULT_MODEL,
    DEFAULT_VERSION,
    Behavior,
    Responder,
)
from ollama_pool.testing._server import StandInFleet, StandInServer

logger = logging.getLogger("ollama_pool.testing")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11434
DEFAULT_MODELS_DIR = "~/.ollama-pool-standin/models"
DEFAULT_MAX_QUEUE = 512
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def parse_ollama_host(value: str | None) -> tuple[str, int]:
    """Return (host, port) from an OLLAMA_HOST value.

    Accepts "host:port", "http://host:port", "host", ":port" and "[::1]:port",
    like `ollama serve`; missing parts default to 127.0.0.1 and 11434.
    """
    text = (value or "").strip()
    if not text:
        return DEFAULT_HOST, DEFAULT_PORT
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise click.BadParameter(f"invalid OLLAMA_HOST {value!r}: {exc}") from exc
    return parts.hostname or DEFAULT_HOST, port or DEFAULT_PORT


def _env_int(name: str, default: int | None) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise click.BadParameter(f"{name} must be an integer, got {raw!r}") from exc


def load_responder(spec: str) -> Responder:
    """Import MODULE:FACTORY and return FACTORY()."""
    module_name, _, factory_name = spec.partition(":")
    if not module_name or not factory_name:
        raise click.BadParameter(
            f"invalid responder {spec!r}; expected MODULE:FACTORY",
            param_hint="--responder",
        )
    module = importlib.import_module(module_name)
    factory = getattr(module, factory_name)
    responder: Responder = factory()
    return responder


def _configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@contextmanager
def _blocked_stop_signals() -> Iterator[None]:
    """Block SIGINT and SIGTERM here and in every thread started inside this block.

    The main thread receives them with sigwait(), so server threads never see them.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _stop_with_parent() -> None:
    """Stop this server once the process named by OLLAMA_POOL_STANDIN_PARENT_PID ends.

    A parent that starts servers for its own run (such as `LocalFleet`) sets the
    variable, so that its servers do not outlive it when it is killed with
    SIGKILL and cannot stop them itself.
    """
    value = os.environ.get("OLLAMA_POOL_STANDIN_PARENT_PID")
    if not value:
        return
    parent = int(value)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        logger.info("parent process %d ended, stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _wait_for_stop_signal() -> int:
    received = signal.sigwait(_STOP_SIGNALS)
    logger.info("received %s, stopping", signal.Signals(received).name)
    return received


def _behavior(
    models: tuple[str, ...],
    delays: tuple[float, float, float],
    parallel: int | None,
    max_queue: int | None,
    responder: str | None,
) -> Behavior:
    load_delay, first_token_delay, token_delay = delays
    return Behavior(
        models=list(models or (DEFAULT_MODEL,)),
        load_delay=load_delay,
        first_token_delay=first_token_delay,
        token_delay=token_delay,
        parallel=parallel,
        max_queue=max_queue,
        responder=load_responder(responder) if responder else None,
    )


_model_option = click.option(
    "--model",
    "models",
    multiple=True,
    envvar="OLLAMA_POOL_STANDIN_MODELS",
    help="Model the server has from the start; repeat for several "
    f"[default: {DEFAULT_MODEL}]. Models pulled into the models directory are "
    "listed too.",
)
_load_delay_option = click.option(
    "--load-delay",
    type=float,
    default=0.0,
    show_default=True,
    help="Seconds to load a model at its first request or after keep_alive ends.",
)
_first_token_delay_option = click.option(
    "--first-token-delay",
    type=float,
    default=0.0,
    show_default=True,
    help="Seconds before the first chunk of a response.",
)
_token_delay_option = click.option(
    "--token-delay",
    type=float,
    default=0.0,
    show_default=True,
    help="Seconds between two chunks of a response.",
)
_responder_option = click.option(
    "--responder",
    metavar="MODULE:FACTORY",
    help="Generate text with FACTORY() from MODULE in place of the echo reply.",
)


@click.group()
@click.version_option(
    package_name="ollama-pool",
    message=f"%(prog)s %(version)s (reports Ollama version {DEFAULT_VERSION})",
)
def main() -> None:
    """Run an Ollama stand-in server for tests and benchmarks."""


@main.command()
@_model_option
@_load_delay_option
@_first_token_delay_option
@_token_delay_option
@_responder_option
def serve(
    models: tuple[str, ...],
    load_delay: float,
    first_token_delay: float,
    token_delay: float,
    responder: str | None,
) -> None:
    """Serve the Ollama API like `ollama serve`.

    OLLAMA_HOST sets the address (default 127.0.0.1:11434), OLLAMA_MODELS the
    models directory shared with other instances (default
    ~/.ollama-pool-standin/models), OLLAMA_NUM_PARALLEL the requests that
    generate at once (default unlimited) and OLLAMA_MAX_QUEUE the requests that
    may wait (default 512).
    """
    _configure_logging()
    host, port = parse_ollama_host(os.environ.get("OLLAMA_HOST"))
    models_dir = Path(os.environ.get("OLLAMA_MODELS") or DEFAULT_MODELS_DIR)
    behavior = _behavior(
        models,
        (load_delay, first_token_delay, token_delay),
        _env_int("OLLAMA_NUM_PARALLEL", None),
        _env_int("OLLAMA_MAX_QUEUE", DEFAULT_MAX_QUEUE),
        responder,
    )
    server = StandInServer(
        port,
        host,
        behavior,
        models_dir.expanduser(),
        access_log=logging.getLogger("ollama_pool.testing.access"),
    )
    with _blocked_stop_signals():
        _start_or_exit(server.start)
        logger.info("models directory %s", models_dir)
        _stop_with_parent()
        try:
            _wait_for_stop_signal()
        finally:
            server.stop()


def _parse_ports(values: tuple[str, ...]) -> list[int]:
    ports: list[int] = []
    for value in values:
        for part in value.split(","):
            if not part.strip():
                continue
            try:
                ports.append(int(part))
            except ValueError as exc:
                raise click.BadParameter(f"invalid port {part!r}") from exc
    if not ports:
        raise click.UsageError("give at least one port, e.g. --ports 11434 11435")
    return ports


@main.command(context_settings={"show_default": True})
@click.option(
    "--ports",
    "ports_flag",
    is_flag=True,
    help="Marks the ports that follow; they may also be given without it.",
)
@click.argument("ports", nargs=-1, required=True)
@click.option("--host", default=DEFAULT_HOST, help="Address every server binds.")
@_model_option
@click.option(
    "--parallel",
    type=int,
    default=None,
    help="Requests that generate at once per server [default: unlimited].",
)
@click.option(
    "--max-queue",
    type=int,
    default=DEFAULT_MAX_QUEUE,
    help="Requests that may wait per server before new ones get 503.",
)
@_load_delay_option
@_first_token_delay_option
@_token_delay_option
@_responder_option
@click.option(
    "--models-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Models directory shared by the servers [default: pulled models stay "
    "in memory].",
)
@click.option("--access-log", is_flag=True, help="Log one line per request.")
def fleet(
    ports_flag: bool,
    ports: tuple[str, ...],
    host: str,
    models: tuple[str, ...],
    parallel: int | None,
    max_queue: int,
    load_delay: float,
    first_token_delay: float,
    token_delay: float,
    responder: str | None,
    models_dir: Path | None,
    access_log: bool,
) -> None:
    """Run one server per port in this process, until SIGTERM or SIGINT.

    Port 0 picks a free port. Prints "ready URL" for each server once all listen.
    """
    _configure_logging()
    port_list = _parse_ports(ports)
    behaviors = [
        _behavior(
            models,
            (load_delay, first_token_delay, token_delay),
            parallel,
            max_queue,
            responder,
        )
        for _ in port_list
    ]
    servers = StandInFleet(
        behaviors,
        ports=port_list,
        host=host,
        models_dir=models_dir,
        access_log=logging.getLogger("ollama_pool.testing.access")
        if access_log
        else None,
    )
    with _blocked_stop_signals():
        _start_or_exit(servers.start)
        for url in servers.urls:
            click.echo(f"ready {url}")
        sys.stdout.flush()
        try:
            _wait_for_stop_signal()
        finally:
            servers.stop()


def _start_or_exit(start: Any) -> None:
    try:
        start()
    except OSError as exc:
        raise click.ClickException(f"cannot listen: {exc}") from exc


if __name__ == "__main__":
    main()
